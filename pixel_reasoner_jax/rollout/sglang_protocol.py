"""SGLang's native /generate on the wire, client side: request bodies, response checks, and the errors.

Pure functions (no HTTP): rollout/sglang_client.py sends what they build and parses what comes back.

Video: real SGLang's `video_data` items are video files (path, URL or base64 container) that the server
decodes, samples and resizes itself, so the frames and token counts would not be the trainer's. Video items
are therefore sent as `{"frames": [PNG data URLs], "fps": x}` only to servers whose /get_model_info says
`accepts_video_frames: true` (serve/); any other server gets a clear error instead.
"""

import uuid
from collections.abc import Callable

import httpx
from PIL import Image

from pixel_reasoner_jax.rollout.media import expand_pads, expanded_length, media_pad_count
from pixel_reasoner_jax.rollout.policy import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationRequest,
    GenerationResult,
    Video,
)

IMAGE_PAD, VIDEO_PAD = 151655, 151656


class SGLangError(RuntimeError):
    """A server answered, but not with a usable result."""


class SGLangUnavailable(SGLangError):
    """No server answered (connection refused, timeouts) after every retry."""


class SGLangRequestError(SGLangError):
    """HTTP 4xx: the request itself is wrong; never retried."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"{url} answered HTTP {status}: {message}")
        self.url, self.status, self.message = url, status, message


class StaleWeightsError(SGLangError):
    """A sample came from weights other than the last pushed version."""


class WeightPushError(SGLangError):
    """Exporting or renaming pushed weights failed, or no server loaded them and one rejected them."""


class ServerFailure(SGLangError):
    """One server failed one call: a transport error (`transport`) or HTTP 5xx. Takes it out of rotation."""

    def __init__(self, message: str, transport: bool):
        super().__init__(message)
        self.transport = transport


def error_message(r: httpx.Response) -> str:
    """The message of an error answer: SGLang's `{"error": {"message"}}`, a `message` field, or the text."""
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in body:
            return str(body["message"])
    return str(body)[:500]


def expected_prompt_tokens(request: GenerationRequest, factor: int, temporal: int) -> int:
    """len(input_ids) + sum over media of (tokens - 1); validates one pad per media item.

    Raises:
      ValueError: pads and media disagree, or a media item's size does not tokenize (named by index).
    """
    n_img = sum(1 for t in request.input_ids if t == IMAGE_PAD)
    n_vid = sum(1 for t in request.input_ids if t == VIDEO_PAD)
    imgs = sum(1 for m in request.media if isinstance(m, Image.Image))
    vids = sum(1 for m in request.media if isinstance(m, Video))
    if (n_img, n_vid) != (imgs, vids) or imgs + vids != len(request.media):
        raise ValueError(
            f"request {request.rid!r}: input_ids hold {n_img} image pads and {n_vid} video pads but media has "
            f"{imgs} images and {vids} videos (of {len(request.media)} items); send one pad per item"
        )
    for k, m in enumerate(request.media):
        try:
            media_pad_count(m, factor, temporal)
        except ValueError as e:
            raise ValueError(f"request {request.rid!r} media[{k}]: {e}") from None
    return expanded_length(len(request.input_ids), request.media, factor, temporal)


def generate_payload(
    request: GenerationRequest, data_url: Callable[[Image.Image], str], *, send_seed: bool = True
) -> dict:
    """The /generate body: explicit sampling parameters (SGLang fills omitted ones from the model's
    generation_config), untrimmed output, log-probs of the sampled tokens only, the expanded prompt ids.

    The rid is the request's; the client gives every attempt its own (SGLang answers 400 to a rid still in
    flight, and notices a dropped connection only by polling, so a quick retry would collide).
    """
    s = request.sampling
    sampling = {
        "max_new_tokens": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "stop_token_ids": list(s.stop_token_ids),
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "no_stop_trim": True,
        "ignore_eos": False,
        "n": 1,
    }
    if request.seed is not None and send_seed:
        sampling["sampling_seed"] = request.seed
    payload = {
        "rid": request.rid or uuid.uuid4().hex,
        "input_ids": list(request.input_ids),
        "sampling_params": sampling,
        "return_logprob": True,
        "logprob_start_len": -1,
        "top_logprobs_num": 0,
        "stream": False,
        "return_prompt_token_ids": True,  # sglang >= 0.5.13; older servers ignore unknown fields
    }
    images = [m for m in request.media if isinstance(m, Image.Image)]
    videos = [m for m in request.media if isinstance(m, Video)]
    if images:
        payload["image_data"] = [data_url(m) for m in images]
    if videos:
        payload["video_data"] = [{"frames": [data_url(f) for f in v.frames], "fps": v.fps} for v in videos]
    return payload


def parse_generate(
    body, where: str, request: GenerationRequest, expected: int, factor: int, temporal: int
) -> GenerationResult:
    """A /generate answer as a GenerationResult, after checking it against the request.

    Raises:
      SGLangError: no meta_info, an unknown finish reason, a prompt that is not ours (count or text ids),
        missing or malformed log-probs, output_ids that disagree with them.
    """
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    meta = body.get("meta_info") if isinstance(body, dict) else None
    if not isinstance(meta, dict):
        raise SGLangError(f"{where}: response has no meta_info object: {str(body)[:200]}")
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else None
    if kind not in (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT):
        raise SGLangError(f"{where}: unknown finish_reason {finish!r}")
    if kind == FINISH_ABORT:
        # SGLang's abort answer has no prompt_tokens and may lack the log-probs: the partial output is
        # dropped and the caller resubmits from the same prompt (reference/sglang.md §12).
        return GenerationResult((), (), FINISH_ABORT, None, str(meta.get("weight_version", "")), expected)
    if meta.get("prompt_tokens") != expected:
        raise SGLangError(
            f"{where}: server counted {meta.get('prompt_tokens')} prompt tokens, expected {expected} "
            f"({len(request.input_ids)} ids with {len(request.media)} media pads expanded); the server "
            "re-tokenized the prompt or resized an image (send one pad per image, sides multiples of 28)"
        )
    lp_entries = meta.get("output_token_logprobs")
    if not isinstance(lp_entries, list):
        raise SGLangError(f"{where}: meta_info.output_token_logprobs missing (return_logprob ignored?)")
    try:
        ids = tuple(int(e[1]) for e in lp_entries)
        lps = tuple(float(e[0]) for e in lp_entries)
    except (TypeError, ValueError, IndexError):
        raise SGLangError(f"{where}: malformed output_token_logprobs {str(lp_entries)[:200]}") from None
    if "output_ids" in body and list(body["output_ids"]) != list(ids):
        raise SGLangError(
            f"{where}: output_ids {body['output_ids'][:20]} disagree with output_token_logprobs"
        )
    _check_prompt_ids(body.get("prompt_token_ids"), request, where, factor, temporal)
    matched = finish.get("matched")
    version = str(meta.get("weight_version", ""))
    return GenerationResult(
        ids, lps, kind, matched if isinstance(matched, int) and not isinstance(matched, bool) else None, version,
        expected,
    )  # fmt: skip


def _check_prompt_ids(got, request: GenerationRequest, where: str, factor: int, temporal: int) -> None:
    """The server's expanded prompt (`return_prompt_token_ids`, sglang >= 0.5.13) against ours.

    Text positions must be identical (a re-tokenized prompt differs there even when its length agrees);
    inside a media run only the length is compared, since a server may write cache keys in place of the
    pad id there. Absent ids (older servers) are not checked: the count check above still applies.
    """
    if got is None:
        return
    pads = (IMAGE_PAD, VIDEO_PAD)
    want = expand_pads(request.input_ids, request.media, pads, factor, temporal)
    if not isinstance(got, list) or len(got) != len(want):
        raise SGLangError(f"{where}: prompt_token_ids has {len(got) if isinstance(got, list) else got!r} ids, "
                          f"expected {len(want)}")  # fmt: skip
    for k, (g, w) in enumerate(zip(got, want)):
        if w not in pads and g != w:
            raise SGLangError(
                f"{where}: the server's prompt differs from ours at position {k} (id {g}, expected {w}): it "
                "re-tokenized the prompt (SGLANG_MM_AVOID_RETOKENIZE off, or its fallback after a failure)"
            )
