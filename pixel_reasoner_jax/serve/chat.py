"""/v1/chat/completions: OpenAI chat bodies -> samples (rendered by processing/chat.py), and the answer.

Sampling fields and media are checked by the /generate parser's rules (serve/protocol.py).
"""

import time
import uuid

from PIL import Image

from pixel_reasoner_jax.processing import chat
from pixel_reasoner_jax.rollout.media import expanded_length
from pixel_reasoner_jax.serve.protocol import (
    HttpError,
    Unit,
    bad,
    check_fields,
    decode_image,
    make_units,
    order_media,
    parse_sampling,
)
from pixel_reasoner_jax.serve.spec import ModelSpec

CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop",
    "stop_token_ids", "n", "seed", "logprobs", "tools", "tool_choice", "skip_special_tokens", "no_stop_trim",
    "ignore_eos", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "user", "rid",
}  # fmt: skip
CHAT_DEFAULT_ONLY = {"stream": False, "top_logprobs": 0, "response_format": None, "logit_bias": None}
# OpenAI name -> our sampling key.
_CHAT_SAMPLING = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "seed": "sampling_seed",
}


def _chat_images(messages: list, spec: ModelSpec, allow_local_paths: bool) -> list[Image.Image]:
    """Images of image items in conversation order (the order processing/chat.py meets them)."""
    images = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise bad(f"messages[{i}] must be an object, got {type(msg).__name__}")
        content = msg.get("content")
        for j, item in enumerate(content if isinstance(content, list) else []):
            if not isinstance(item, dict) or not (
                item.get("type") == "image" or "image" in item or "image_url" in item
            ):
                continue
            url = item.get("image_url", item.get("image"))
            url = url.get("url") if isinstance(url, dict) else url
            images.append(decode_image(url, f"messages[{i}].content[{j}].image_url", spec, allow_local_paths))
    return images


def parse_chat(body: dict, spec: ModelSpec, tokenizer, allow_local_paths: bool) -> tuple[list[Unit], str]:
    """A /v1/chat/completions body -> samples (rendered by processing/chat.py, one pad per image), model name."""
    check_fields(body, CHAT_FIELDS, CHAT_DEFAULT_ONLY, "")
    if tokenizer is None:
        raise HttpError(501, "chat completions need a tokenizer and this server has none")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects")
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise bad(f"tool_choice must be 'auto' or 'none', got {body['tool_choice']!r}")
    images = _chat_images(messages, spec, allow_local_paths)
    p = spec.image.patch_size
    grids = [(1, im.height // p, im.width // p) for im in images]
    try:
        enc = chat.encode_conversation(
            tokenizer,
            messages,
            image_grids=grids,
            add_generation_prompt=True,
            tools=body.get("tools"),
            expand=False,
        )
    except (ValueError, TypeError, KeyError) as e:
        raise bad(f"messages: {e}") from None
    ids = [int(t) for t in enc.input_ids]
    media = order_media(ids, images, [], spec, "the rendered messages")
    expanded = expanded_length(len(ids), media, spec.image.factor, spec.image.temporal_patch_size)
    sp, names = {}, {}
    for k, v in body.items():
        if (
            k in ("model", "messages", "tools", "tool_choice", "user", "rid", "logprobs")
            or k in CHAT_DEFAULT_ONLY
        ):
            continue
        key = _CHAT_SAMPLING.get(k, k)
        sp[key], names[key] = v, k
    if sp.get("max_new_tokens") is None:
        sp["max_new_tokens"] = max(spec.context_length - expanded - 1, 1)
    s = parse_sampling(sp, "", spec, tokenizer, names)
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise bad(f"logprobs must be a boolean, got {logprobs!r}")
    rid = body.get("rid") or f"chatcmpl-{uuid.uuid4().hex}"
    if not isinstance(rid, str):
        raise bad(f"rid must be a string, got {rid!r}")
    return make_units(ids, media, s, rid, logprobs, False, spec, "messages"), body.get("model") or ""


def chat_response(units: list[Unit], outs: list[dict], model: str, tokenizer, latency: float) -> dict:
    """OpenAI ChatCompletion (+ SGLang's matched_stop and metadata.weight_version) from /generate objects."""
    choices = []
    for i, (u, o) in enumerate(zip(units, outs)):
        fr = o["meta_info"]["finish_reason"]
        logprobs = None
        if u.return_logprob:
            content = []
            for lp, t, _ in o["meta_info"]["output_token_logprobs"]:
                tok = tokenizer.decode([t])
                content.append(
                    {"token": tok, "bytes": list(tok.encode("utf-8")), "logprob": lp, "top_logprobs": []}
                )
            logprobs = {"content": content}
        choices.append(
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": o.get("text", ""),
                    "reasoning_content": None,
                    "tool_calls": None,
                },
                "logprobs": logprobs,
                "finish_reason": fr["type"],
                "matched_stop": fr.get("matched"),
            }
        )
    completion = sum(o["meta_info"]["completion_tokens"] for o in outs)
    prompt = units[0].prompt_tokens
    return {
        "id": units[0].rid if len(units) == 1 else units[0].rid.rsplit("-", 1)[0],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        "metadata": {
            "weight_version": outs[0]["meta_info"]["weight_version"],
            "e2e_latency": round(latency, 6),
        },
    }
