"""Shared by the server, backend and client tests: a scripted Backend whose output encodes the request,
weight folders and images. Also importable as `tests.server_helpers:make_backend` by a server subprocess."""

import json
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.media import media_pad_count
from pixel_reasoner_jax.rollout.policy import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationRequest,
    GenerationResult,
    Policy,
)
from pixel_reasoner_jax.serve.backend import Backend
from pixel_reasoner_jax.serve.spec import ModelSpec

IM_END, TOOL_CALL, TOOL_CALL_END, HELLO = 151645, 151657, 151658, 9707
_TOKENIZER = None


def tokenizer() -> QwenTokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = QwenTokenizer.build()
    return _TOKENIZER


def signature(req: GenerationRequest) -> list[int]:
    """Tokens that identify a request: any mix-up between requests changes them."""
    pads = sum(media_pad_count(m) for m in req.media)
    return [
        1000 + sum(req.input_ids) % 997,
        2000 + len(req.input_ids) % 997,
        3000 + len(req.media),
        4000 + pads % 997,
    ]


def script(req: GenerationRequest) -> list[int]:
    """The scripted continuation: signature, a tool-call-like tail, then <|im_end|>."""
    return signature(req) + [TOOL_CALL, HELLO, TOOL_CALL_END, IM_END]


def logprob(i: int) -> float:
    return -(i + 1) / 64


def run_script(req: GenerationRequest) -> tuple[list[int], str, int | None]:
    """Emits the script (then filler 6000+i) until a stop id or max_new_tokens, like a real sampler."""
    full = script(req)
    out = []
    while len(out) < req.sampling.max_new_tokens:
        tok = full[len(out)] if len(out) < len(full) else 6000 + len(out)
        out.append(tok)
        if tok in req.sampling.stop_token_ids:
            return out, FINISH_STOP, tok
    return out, FINISH_LENGTH, None


class ScriptedPolicy(Policy):
    """Deterministic policy; records every batch; can sleep, signal, and fail on demand."""

    def __init__(self, version: str = "0", delay_s: float = 0.0):
        self.version = version
        self.delay_s = delay_s
        self.fail_next = 0
        self.batches: list[list[GenerationRequest]] = []
        self.started = threading.Event()
        self._lock = threading.Lock()

    @property
    def weight_version(self) -> str:
        return self.version

    @property
    def requests(self) -> list[GenerationRequest]:
        return [r for b in self.batches for r in b]

    def generate(self, requests):
        with self._lock:
            self.batches.append(list(requests))
            if self.fail_next > 0:
                self.fail_next -= 1
                raise RuntimeError("scripted failure")
        self.started.set()
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for r in requests:
            ids, finish, matched = run_script(r)
            prompt = len(r.input_ids) + sum(media_pad_count(m) - 1 for m in r.media)
            out.append(GenerationResult(tuple(ids), tuple(logprob(i) for i in range(len(ids))), finish, matched,
                                        self.version, prompt))  # fmt: skip
        return out


class ScriptedBackend(Backend):
    """ScriptedPolicy + the real Qwen tokenizer; load() reads config.json ({"fail": true} makes it raise)."""

    def __init__(self, checkpoint: str = "scripted-ckpt", version: str = "0", *, context_length: int = 4096,
                 image: ImageProcessorConfig | None = None, delay_s: float = 0.0):  # fmt: skip
        self._spec = ModelSpec(
            model_path=checkpoint,
            context_length=context_length,
            image=image or ImageProcessorConfig(min_pixels=28 * 28, max_pixels=28 * 28 * 64),
            served_model_name="scripted",
        )
        self._policy = ScriptedPolicy(version, delay_s)
        self.load_calls: list[tuple[str, str]] = []
        self.flushes = 0

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def policy(self) -> ScriptedPolicy:
        return self._policy

    @property
    def tokenizer(self):
        return tokenizer()

    def load(self, model_path: str, version: str) -> None:
        self.load_calls.append((model_path, version))
        cfg = json.loads((Path(model_path) / "config.json").read_text())
        if cfg.get("fail"):
            raise ValueError("scripted load failure: bad tensor shapes")
        self._policy.version = version

    def flush_cache(self) -> None:
        self.flushes += 1


def make_backend(checkpoint: str, weight_version: str) -> ScriptedBackend:
    """Factory for `python -m pixel_reasoner_jax.serve --backend tests.server_helpers:make_backend`."""
    return ScriptedBackend(checkpoint, weight_version)


def broken_backend(checkpoint: str, weight_version: str) -> Backend:
    raise OSError(f"cannot read checkpoint {checkpoint}")


def write_weights(path, *, fail: bool = False, sharded: bool = False) -> Path:
    """A small complete HF-like folder: config.json + safetensors (+ index when sharded)."""
    import safetensors.numpy as stnp

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "fail": fail}))
    if sharded:
        stnp.save_file({"a": np.arange(6, dtype=np.float32)}, str(p / "model-00001-of-00002.safetensors"))
        stnp.save_file({"b": np.ones((2, 3), np.float32)}, str(p / "model-00002-of-00002.safetensors"))
        index = {
            "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
        }
        (p / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        stnp.save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, str(p / "model.safetensors"))
    return p


def image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def send_json(handler, status: int, payload) -> None:
    """Answers a test HTTP server's request (a BaseHTTPRequestHandler) with `payload` as JSON."""
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
