"""A scripted Backend for the server/client tests (output encodes the request), plus tests of the batching
worker and of the weight-folder checks. Also importable as `tests.test_server_backend:make_backend`."""

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
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
    SamplingParams,
)
from pixel_reasoner_jax.serve.backend import (
    Backend,
    BatchWorker,
    Job,
    ModelSpec,
    WeightsFolderError,
    check_weights_folder,
)

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
    """Factory for `python -m pixel_reasoner_jax.serve.http --backend tests.test_server_backend:make_backend`."""
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


# -------------------------------------------------------------------------------------------- tests


def test_complete_folders_pass(tmp_path):
    check_weights_folder(str(write_weights(tmp_path / "single")))
    check_weights_folder(str(write_weights(tmp_path / "sharded", sharded=True)))


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_config", "no config.json"),
        ("tmp_name", "temporary name"),
        ("no_safetensors", r"no \*\.safetensors"),
        ("index_missing", "names files that are absent"),
        ("truncated", "truncated"),
        ("bad_config", "not valid JSON"),
        ("missing_dir", "not a directory"),
    ],
)
def test_incomplete_folders_rejected(tmp_path, breakage, message):
    p = write_weights(tmp_path / "w", sharded=breakage == "index_missing")
    if breakage == "no_config":
        (p / "config.json").unlink()
    elif breakage == "tmp_name":
        p = p.rename(tmp_path / "w.tmp-1234")
    elif breakage == "no_safetensors":
        (p / "model.safetensors").unlink()
    elif breakage == "index_missing":
        (p / "model-00002-of-00002.safetensors").unlink()
    elif breakage == "truncated":
        data = (p / "model.safetensors").read_bytes()
        (p / "model.safetensors").write_bytes(data[:-5])
    elif breakage == "bad_config":
        (p / "config.json").write_text("{not json")
    elif breakage == "missing_dir":
        p = tmp_path / "nope"
    with pytest.raises(WeightsFolderError, match=message):
        check_weights_folder(str(p))


def _req(i: int, max_new: int = 16) -> GenerationRequest:
    return GenerationRequest(
        (151644, 100 + i, 200), (), SamplingParams(max_new, stop_token_ids=(IM_END,)), f"r{i}"
    )


def test_worker_batches_and_keeps_requests_apart():
    policy = ScriptedPolicy(delay_s=0.02)
    worker = BatchWorker(lambda: policy, max_batch=4, wait_s=0.01, model_lock=threading.Lock())
    try:
        jobs = [Job(_req(i), f"r{i}", 3) for i in range(10)]
        threads = [threading.Thread(target=worker.submit, args=([j],)) for j in jobs]
        for t in threads:
            t.start()
        results = [j.future.result(timeout=10) for j in jobs]
        assert max(worker.batch_sizes) <= 4 and max(worker.batch_sizes) > 1
        assert sum(worker.batch_sizes) == 10
        for j, r in zip(jobs, results):
            assert list(r.output_ids) == script(j.request)
            assert r.finish_reason == FINISH_STOP and r.matched_stop == IM_END
    finally:
        worker.stop()


def test_worker_pause_aborts_then_holds_until_resume():
    policy = ScriptedPolicy(delay_s=0.3)
    worker = BatchWorker(lambda: policy, max_batch=1, wait_s=0.0, model_lock=threading.Lock())
    try:
        running, queued = Job(_req(0), "a", 3), Job(_req(1), "b", 3)
        worker.submit([running, queued])
        assert policy.started.wait(5)
        assert worker.pause() == 2  # one queued, one inside policy.generate
        assert queued.future.result(timeout=1).finish_reason == "abort"
        assert running.future.result(timeout=5).finish_reason == "abort"
        assert running.future.result().output_ids == ()
        held = Job(_req(2), "c", 3)
        worker.submit([held])
        time.sleep(0.2)
        assert not held.future.done()
        worker.resume()
        assert held.future.result(timeout=5).output_ids == tuple(script(held.request))
    finally:
        worker.stop()


def test_worker_abort_by_rid_and_failure_propagates():
    policy = ScriptedPolicy()
    lock = threading.Lock()
    worker = BatchWorker(lambda: policy, max_batch=8, wait_s=0.0, model_lock=lock)
    try:
        with lock:  # hold the model so jobs wait in the queue (as during a weight update)
            a, b = Job(_req(0), "a", 3), Job(_req(1), "b", 3)
            worker.submit([a, b])
            time.sleep(0.05)
            assert worker.busy()
            assert worker.abort("test abort", {"b"}) == 1
        assert b.future.result(timeout=5).finish_reason == "abort" and b.abort_message == "test abort"
        assert a.future.result(timeout=5).finish_reason == FINISH_STOP
        policy.fail_next = 1
        c = Job(_req(2), "c", 3)
        worker.submit([c])
        with pytest.raises(RuntimeError, match="scripted failure"):
            c.future.result(timeout=5)
    finally:
        worker.stop()
    late = Job(_req(3), "d", 3)
    worker.submit([late])
    assert late.future.result(timeout=1).finish_reason == "abort"


def test_model_spec_and_folder_check_on_tiny_checkpoint(tiny_ckpt):
    from pixel_reasoner_jax.models.config import ModelConfig

    check_weights_folder(str(tiny_ckpt))  # a real export is complete
    spec = ModelSpec.from_checkpoint(tiny_ckpt)
    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    assert spec.context_length == cfg.text.max_position_embeddings
    assert spec.eos_token_ids == (151645, 151643)
    assert (spec.image_token_id, spec.video_token_id) == (151655, 151656)
    assert spec.image == ImageProcessorConfig.from_pretrained(tiny_ckpt)
    assert ModelSpec.from_checkpoint(tiny_ckpt, context_length=1024).context_length == 1024
