"""/generate and the control endpoints: request parsing (JSON -> GenerationRequest) and response shapes.

No I/O besides decoding media; every bad field becomes HttpError(400) naming the field and what was expected.
"""

import dataclasses
import math
import uuid
from collections.abc import Mapping
from typing import Any

from PIL import Image

from pixel_reasoner_jax.rollout.media import expand_pads, expanded_length
from pixel_reasoner_jax.rollout.policy import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    Video,
)
from pixel_reasoner_jax.serve.media import MediaError, load_frames, load_image
from pixel_reasoner_jax.serve.spec import ModelSpec


class HttpError(Exception):
    """An error answered with `status` and {"error": {"message": ...}} (or `payload` when given)."""

    def __init__(self, status: int, message: str, payload: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.payload = status, message, payload


def bad(message: str) -> HttpError:
    return HttpError(400, message)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One sample to generate and how to report it.

    Attributes:
      stop_strings: stop strings that are one token, by that token id (reported as `matched: str`).
      multi_stops: stop strings of several tokens, applied to the output afterwards.
    """

    request: GenerationRequest
    rid: str
    prompt_tokens: int
    return_logprob: bool
    text_in_logprobs: bool
    skip_special_tokens: bool
    no_stop_trim: bool
    stop_strings: Mapping[int, str]
    multi_stops: tuple[str, ...]
    prompt_token_ids: tuple[int, ...] | None = None  # the expanded prompt, when the request asked for it


# Top-level /generate fields: accepted, and (for the second group) accepted only at their default value.
GENERATE_FIELDS = {
    "text", "input_ids", "image_data", "video_data", "sampling_params", "rid", "return_logprob",
    "logprob_start_len", "return_text_in_logprobs", "modalities", "log_metrics", "data_parallel_rank",
    "priority", "lora_id", "bootstrap_host", "bootstrap_port", "bootstrap_room", "return_prompt_token_ids",
}  # fmt: skip
DEFAULT_ONLY = {
    "stream": False, "top_logprobs_num": 0, "token_ids_logprob": None, "return_hidden_states": False,
    "input_embeds": None, "lora_path": None, "custom_logit_processor": None, "audio_data": None,
    "session_params": None,
}  # fmt: skip
# Sampling parameters the policy cannot honour must stay neutral: the trainer does not model them.
NEUTRAL_SAMPLING = {
    "min_p": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
    "min_new_tokens": 0, "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
    "custom_params": None, "logit_bias": None, "stop_regex": None,
}  # fmt: skip
BOOL_SAMPLING = {"skip_special_tokens": True, "spaces_between_special_tokens": True, "no_stop_trim": False,
                 "ignore_eos": False}  # fmt: skip
OTHER_SAMPLING = {
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "stop_token_ids",
    "n",
    "sampling_seed",
}
UPDATE_FIELDS = {"model_path", "load_format", "weight_version", "abort_all_requests", "flush_cache"}
# Newer SGLang update options with no meaning here (no CUDA graphs, no async loading): accepted, ignored.
UPDATE_IGNORED = {
    "is_async",
    "keep_pause",
    "recapture_cuda_graph",
    "torch_empty_cache",
    "token_step",
    "manifest",
}
LOAD_FORMATS = (None, "auto", "safetensors")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_default(v, default) -> bool:
    return v is None or v == default or (isinstance(v, (list, dict)) and not v and default is None)


def check_fields(body: Mapping, allowed: set, default_only: Mapping, where: str) -> None:
    for k, v in body.items():
        if k in default_only:
            if not _is_default(v, default_only[k]):
                raise bad(f"{where}{k}={v!r} is not supported by this server; expected {default_only[k]!r}")
        elif k not in allowed:
            raise bad(f"unknown field {where}{k!r}; expected one of {sorted(allowed | set(default_only))}")


@dataclasses.dataclass
class _Sampling:
    params: SamplingParams
    n: int
    seed: int | None
    flags: dict[str, bool]
    stop_strings: dict[int, str]
    multi_stops: tuple[str, ...]


def parse_sampling(
    sp: Any, where: str, spec: ModelSpec, tokenizer, names: Mapping[str, str] | None = None
) -> _Sampling:
    """Validates one sampling_params dict. `names` maps our keys to the caller's (for chat fields)."""
    names = names or {}
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise bad(f"{where} must be an object, got {type(sp).__name__}")
    name = lambda k: names.get(k, f"{where}.{k}")
    for k, v in sp.items():
        if k in NEUTRAL_SAMPLING:
            if not _is_default(v, NEUTRAL_SAMPLING[k]):
                raise bad(
                    f"{name(k)}={v!r} is not supported (the policy samples without it); send {NEUTRAL_SAMPLING[k]!r}"
                )
        elif k in BOOL_SAMPLING:
            if not isinstance(v, bool):
                raise bad(f"{name(k)} must be a boolean, got {v!r}")
        elif k not in OTHER_SAMPLING:
            raise bad(f"unknown sampling parameter {name(k)}")

    def get(k, default, ok, expected):
        v = sp.get(k)
        if v is None:
            return default
        if not ok(v):
            raise bad(f"{name(k)} must be {expected}, got {v!r}")
        return v

    max_new = get("max_new_tokens", 128, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    temperature = get("temperature", 1.0, lambda v: _is_num(v) and v >= 0, "a number >= 0")
    top_p = get("top_p", 1.0, lambda v: _is_num(v) and 0 < v <= 1, "a number in (0, 1]")
    top_k = get("top_k", -1, lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 (off) or an integer >= 1")
    n = get("n", 1, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    seed = get("sampling_seed", None, _is_int, "an integer")
    ids = get("stop_token_ids", [], lambda v: isinstance(v, list) and all(_is_int(t) and t >= 0 for t in v),
              "a list of token ids")  # fmt: skip
    stop = get("stop", [], lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
               "a string or a list of strings")  # fmt: skip
    stop = [stop] if isinstance(stop, str) else stop
    flags = {k: sp.get(k, d) for k, d in BOOL_SAMPLING.items()}
    stop_ids = set(ids)
    if not flags["ignore_eos"]:
        stop_ids.update(spec.eos_token_ids)
    stop_strings, multi = {}, []
    for s in stop:
        if not s:
            raise bad(f"{name('stop')} holds an empty string")
        if tokenizer is None:
            raise bad(
                f"{name('stop')}: stop strings need a tokenizer and this server has none; use stop_token_ids"
            )
        toks = tokenizer.encode(s)
        if len(toks) == 1:
            stop_ids.add(toks[0])
            stop_strings[toks[0]] = s
        else:
            multi.append(s)
    params = SamplingParams(max_new, float(temperature), float(top_p), top_k, tuple(sorted(stop_ids)))
    return _Sampling(params, n, seed, flags, stop_strings, tuple(multi))


def _per_sample(value, batch: bool, size: int, name: str, ok, expected: str) -> list:
    """A per-sample field: one value for all samples, or (batch) a list with one value each."""
    if batch and isinstance(value, list):
        if len(value) != size:
            raise bad(f"length of {name} should be equal to the batch size ({size}), got {len(value)}")
        vals = value
    else:
        vals = [value] * size
    for i, v in enumerate(vals):
        if v is not None and not ok(v):
            raise bad(f"{name}{f'[{i}]' if batch else ''} must be {expected}, got {v!r}")
    return vals


def _media_items(value, batch: bool, size: int, n: int, name: str, kind: type) -> list[list]:
    """image_data / video_data -> one list of items per prompt (SGLang's shapes, strictly checked)."""
    if value is None:
        return [[] for _ in range(size)]
    if batch or n > 1:
        # SGLang turns n > 1 into a batch of one, so the field then needs one entry per prompt.
        if not isinstance(value, list) or len(value) != size:
            got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
            raise bad(f"length of {name} should be equal to the batch size ({size}), got {got}")
        per = [[] if v is None else [v] if isinstance(v, kind) else v for v in value]
    else:
        per = [[value] if isinstance(value, kind) else value]
    for b, items in enumerate(per):
        if not isinstance(items, list):
            raise bad(f"{name}[{b}] must be a list, got {type(items).__name__}")
        for k, item in enumerate(items):
            if not isinstance(item, kind):
                where = f"{name}[{b}][{k}]" if batch or n > 1 else f"{name}[{k}]"
                raise bad(
                    f"{where} must be a {'string' if kind is str else 'object'}, got {type(item).__name__}"
                )
    return per


def decode_image(item: str, where: str, spec: ModelSpec, allow_local_paths: bool) -> Image.Image:
    """Decoded and resized as SGLang does (multiples of 28 within the pixel bounds)."""
    try:
        return load_image(item, where, spec.image, allow_local_paths)
    except MediaError as e:
        raise bad(str(e)) from None


def _video(item: dict, where: str, spec: ModelSpec, allow_local_paths: bool) -> Video:
    """Extension: {"frames": [image items], "fps": x}; frames resized to the first frame's target size."""
    extra = set(item) - {"frames", "fps"}
    if extra:
        raise bad(f"{where} has unknown keys {sorted(extra)}; expected 'frames' and 'fps'")
    frames, fps = item.get("frames"), item.get("fps", 2.0)
    if not isinstance(frames, list) or not frames:
        raise bad(f"{where}.frames must be a non-empty list of image items")
    if not _is_num(fps) or fps <= 0:
        raise bad(f"{where}.fps must be a positive number, got {fps!r}")
    try:
        imgs = load_frames(frames, where, spec.image, allow_local_paths)
    except MediaError as e:
        raise bad(str(e)) from None
    return Video(tuple(imgs), float(fps))


def order_media(ids, images, videos, spec: ModelSpec, where: str) -> tuple:
    n_img = sum(1 for t in ids if t == spec.image_token_id)
    n_vid = sum(1 for t in ids if t == spec.video_token_id)
    if n_img != len(images):
        raise bad(
            f"{where} hold {n_img} <|image_pad|> (id {spec.image_token_id}) tokens but image_data has "
            f"{len(images)} items; send exactly one pad per image"
        )
    if n_vid != len(videos):
        raise bad(
            f"{where} hold {n_vid} <|video_pad|> (id {spec.video_token_id}) tokens but video_data has "
            f"{len(videos)} items; send exactly one pad per video"
        )
    it_img, it_vid = iter(images), iter(videos)
    return tuple(next(it_img) if t == spec.image_token_id else next(it_vid) for t in ids
                 if t in (spec.image_token_id, spec.video_token_id))  # fmt: skip


def check_context(expanded: int, max_new: int, ctx: int, where: str) -> None:
    if expanded >= ctx:
        raise bad(
            f"{where}: the input ({expanded} tokens with image pads expanded) is longer than the model's context "
            f"length ({ctx} tokens)"
        )
    if expanded + max_new >= ctx:
        raise bad(
            f"{where}: requested token count exceeds the model's maximum context length of {ctx} tokens: "
            f"{expanded} input tokens (image pads expanded) + {max_new} max_new_tokens; lower max_new_tokens"
        )


def make_units(
    ids, media, s: _Sampling, rid: str, return_logprob: bool, text_lp: bool, spec: ModelSpec, where: str
):
    expanded = expanded_length(len(ids), media, spec.image.factor, spec.image.temporal_patch_size)
    check_context(expanded, s.params.max_new_tokens, spec.context_length, where)
    out = []
    for j in range(s.n):
        seed = s.seed + j if s.seed is not None and s.n > 1 else s.seed
        r = rid if s.n == 1 else f"{rid}-{j}"
        out.append(
            Unit(
                GenerationRequest(tuple(ids), media, s.params, r, seed),
                r,
                expanded,
                return_logprob,
                text_lp,
                s.flags["skip_special_tokens"],
                s.flags["no_stop_trim"],
                s.stop_strings,
                s.multi_stops,
            )
        )
    return out


def parse_generate(
    body: dict, spec: ModelSpec, tokenizer, allow_local_paths: bool
) -> tuple[list[Unit], bool]:
    """A /generate body -> samples to run, and whether the answer is a list (batch or n > 1)."""
    check_fields(body, GENERATE_FIELDS, DEFAULT_ONLY, "")
    want_ids = body.get("return_prompt_token_ids", False)
    if not isinstance(want_ids, bool):
        raise bad(f"return_prompt_token_ids must be a boolean, got {want_ids!r}")
    ids_f, text_f = body.get("input_ids"), body.get("text")
    if (ids_f is None) == (text_f is None):
        raise bad("exactly one of input_ids and text is required (send input_ids: a list of token ids)")
    if ids_f is not None:
        if not isinstance(ids_f, list) or not ids_f:
            raise bad(
                f"input_ids must be a non-empty list of token ids or of lists of token ids, got {ids_f!r:.80}"
            )
        batch = all(isinstance(x, list) for x in ids_f)
        prompts = ids_f if batch else [ids_f]
        for b, p in enumerate(prompts):
            if not p or not all(_is_int(t) and t >= 0 for t in p):
                raise bad(
                    f"input_ids{f'[{b}]' if batch else ''} must be a non-empty list of non-negative ints"
                )
    else:
        if tokenizer is None:
            raise bad("text prompts need a tokenizer and this server has none; send input_ids")
        batch = isinstance(text_f, list)
        texts = text_f if batch else [text_f]
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise bad("text must be a non-empty string or a list of them")
        prompts = [tokenizer.encode(t) for t in texts]
    size = len(prompts)
    if batch and isinstance(body.get("sampling_params"), list):
        sps = _per_sample(
            body["sampling_params"], True, size, "sampling_params", lambda v: isinstance(v, dict), "an object"
        )
    else:
        sps = [body.get("sampling_params")] * size
    samplings = [parse_sampling(sp, "sampling_params" + (f"[{b}]" if batch else ""), spec, tokenizer)
                 for b, sp in enumerate(sps)]  # fmt: skip
    n = max(s.n for s in samplings)
    if batch and n > 1:
        raise bad(
            "sampling_params.n > 1 with a batch of prompts is not supported; send n copies of each prompt"
        )
    rids = _per_sample(body.get("rid"), batch, size, "rid", lambda v: isinstance(v, str), "a string")
    if batch and isinstance(body.get("rid"), str):
        raise bad("rid must be a list with one string per prompt for a batch")
    lps = _per_sample(
        body.get("return_logprob"), batch, size, "return_logprob", lambda v: isinstance(v, bool), "a boolean"
    )
    starts = _per_sample(
        body.get("logprob_start_len"), batch, size, "logprob_start_len", _is_int, "an integer"
    )
    for lp, st in zip(lps, starts):
        if lp and st is not None and st != -1:
            raise bad(
                f"logprob_start_len={st} asks for prompt log-probs, which this server does not compute; send -1"
            )
    text_lp = body.get("return_text_in_logprobs", False)
    if not isinstance(text_lp, bool):
        raise bad(f"return_text_in_logprobs must be a boolean, got {text_lp!r}")
    images = _media_items(body.get("image_data"), batch, size, n, "image_data", str)
    videos = _media_items(body.get("video_data"), batch, size, n, "video_data", dict)
    units = []
    for b in range(size):
        tag = f"[{b}]" if batch or n > 1 else ""
        imgs = [
            decode_image(it, f"image_data{tag}[{k}]", spec, allow_local_paths)
            for k, it in enumerate(images[b])
        ]
        vids = [
            _video(it, f"video_data{tag}[{k}]", spec, allow_local_paths) for k, it in enumerate(videos[b])
        ]
        where = f"input_ids{f'[{b}]' if batch else ''}"
        media = order_media(prompts[b], imgs, vids, spec, where)
        rid = rids[b] or uuid.uuid4().hex
        units += make_units(prompts[b], media, samplings[b], rid, bool(lps[b]), text_lp, spec, where)
    if want_ids:
        pads = (spec.image_token_id, spec.video_token_id)
        f, tp = spec.image.factor, spec.image.temporal_patch_size
        units = [
            dataclasses.replace(
                u, prompt_token_ids=tuple(expand_pads(u.request.input_ids, u.request.media, pads, f, tp))
            )
            for u in units
        ]
    return units, batch or n > 1


def parse_update(body: dict) -> dict:
    """An /update_weights_from_disk body -> model_path, weight_version, abort_all_requests, flush_cache."""
    check_fields(body, UPDATE_FIELDS | UPDATE_IGNORED, {}, "")
    path = body.get("model_path")
    if not isinstance(path, str) or not path:
        raise bad(f"model_path is required: the folder to load, as a string; got {path!r}")
    if body.get("load_format") not in LOAD_FORMATS:
        raise bad(f"load_format must be one of {LOAD_FORMATS}, got {body['load_format']!r}")
    version = body.get("weight_version")
    if version is not None and not isinstance(version, str):
        raise bad(f"weight_version must be a string, got {version!r}")
    out = {"model_path": path, "weight_version": version}
    for k, default in (("abort_all_requests", False), ("flush_cache", True)):
        v = body.get(k, default)
        if not isinstance(v, bool):
            raise bad(f"{k} must be a boolean, got {v!r}")
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------- responses


def _first_stop(ids: list[int], stops: tuple[str, ...], tokenizer, skip: bool) -> tuple[int, str] | None:
    """Shortest prefix whose text contains a stop string (binary search: containment grows with the prefix)."""
    text = lambda k: tokenizer.decode(ids[:k], skip_special_tokens=skip)
    hit = lambda k: any(s in text(k) for s in stops)
    if not ids or not hit(len(ids)):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
    t = text(lo)
    return lo, min((s for s in stops if s in t), key=t.find)


def generate_response(
    u: Unit, r: GenerationResult, abort_message: str | None, tokenizer, latency: float
) -> dict:
    """The SGLang /generate object for one sample: untrimmed output_ids, trimmed text, exact finish_reason."""
    ids, lps = list(r.output_ids), list(r.logprobs)
    cut_text = None  # a stop string to cut the text at
    if abort_message is not None or r.finish_reason == FINISH_ABORT:
        finish = {"type": "abort", "message": abort_message or "aborted"}
    else:
        found = _first_stop(ids, u.multi_stops, tokenizer, u.skip_special_tokens) if u.multi_stops else None
        if found is not None:
            k, s = found
            ids, lps, cut_text = ids[:k], lps[:k], s
            finish = {"type": "stop", "matched": s}
        elif r.finish_reason == FINISH_STOP:
            finish = {"type": "stop", "matched": u.stop_strings.get(r.matched_stop, r.matched_stop)}
        elif r.finish_reason == FINISH_LENGTH:
            finish = {"type": "length", "length": len(ids)}
        else:
            raise HttpError(500, f"policy returned finish reason {r.finish_reason!r}")
    out: dict[str, Any] = {}
    if tokenizer is not None:
        dec = lambda x: tokenizer.decode(x, skip_special_tokens=u.skip_special_tokens)
        if finish["type"] == "stop" and not u.no_stop_trim:
            # A stop token (int, or a one-token stop string) is the last id; a longer string is cut in the text.
            text = dec(ids) if cut_text else dec(ids[:-1])
            text = text[: text.find(cut_text)] if cut_text else text
        else:
            text = dec(ids)
        out["text"] = text
    out["output_ids"] = ids
    meta = {
        "id": u.rid,
        "finish_reason": finish,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": len(ids),
        "cached_tokens": 0,
        "weight_version": r.weight_version,
        "e2e_latency": round(latency, 6),
    }
    if finish["type"] == "abort":
        # SGLang's abort handler answers without prompt_tokens (reference/sglang.md §12): clients must
        # read finish_reason first, and so must ours.
        del meta["prompt_tokens"], meta["cached_tokens"]
    elif u.prompt_token_ids is not None:
        out["prompt_token_ids"] = list(u.prompt_token_ids)
    if u.return_logprob:
        tok_text = (
            (lambda t: tokenizer.decode([t]))
            if u.text_in_logprobs and tokenizer is not None
            else (lambda t: None)
        )
        meta["output_token_logprobs"] = [[float(lp), int(t), tok_text(t)] for lp, t in zip(lps, ids)]
    out["meta_info"] = meta
    return out
