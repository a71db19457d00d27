"""Tests of the server's batching worker, the weight-folder checks and ModelSpec (scripted backend from
server_helpers)."""

import threading
import time

import pytest
from server_helpers import IM_END, ScriptedPolicy, script, write_weights

from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.policy import FINISH_STOP, GenerationRequest, SamplingParams
from pixel_reasoner_jax.serve.backend import WeightsFolderError, check_weights_folder
from pixel_reasoner_jax.serve.batching import BatchWorker, Job
from pixel_reasoner_jax.serve.spec import ModelSpec


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
