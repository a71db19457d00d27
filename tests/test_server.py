"""The SGLang-compatible server over a scripted backend: every endpoint's happy and error paths, exact shapes."""

import base64
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import portpicker
import pytest
from server_helpers import (
    HELLO,
    IM_END,
    TOOL_CALL_END,
    ScriptedBackend,
    image,
    logprob,
    run_script,
    script,
    tokenizer,
    write_weights,
)

from pixel_reasoner_jax.processing import chat
from pixel_reasoner_jax.rollout import server as alias
from pixel_reasoner_jax.rollout.media import png_data_url
from pixel_reasoner_jax.rollout.policy import GenerationRequest, SamplingParams
from pixel_reasoner_jax.serve import __main__ as serve_cli
from pixel_reasoner_jax.serve.http import ServerConfig, SGLangServer
from pixel_reasoner_jax.serve.launch import start_local_server

IMG_BLOCK = [151652, 151655, 151653]
PROMPT = [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]  # <|im_start|>user\nHello...assistant\n


@pytest.fixture
def backend():
    return ScriptedBackend()


@pytest.fixture
def server(backend):
    srv = SGLangServer(backend, port=portpicker.pick_unused_port(), max_batch=8, batch_wait_s=0.01).start()
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def _error(r: httpx.Response, status: int = 400) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message"}
    return body["error"]["message"]


def _expected(ids, media=(), max_new=128, stops=(IM_END,)):
    req = GenerationRequest(tuple(ids), tuple(media), SamplingParams(max_new, stop_token_ids=tuple(stops)))
    return script(req)


# ---------------------------------------------------------------------------------------- info


def test_info_endpoints(http, server):
    r = http.get("/health")
    assert r.status_code == 200 and r.content == b""
    info = http.get("/get_model_info").json()
    assert info == http.get("/model_info").json()
    assert {
        k: info[k] for k in ("model_path", "is_generation", "preferred_sampling_params", "weight_version")
    } == {
        "model_path": "scripted-ckpt",
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "0",
    }
    assert info["tokenizer_path"] == "scripted-ckpt" and info["accepts_video_frames"] is True
    sinfo = http.get("/get_server_info").json()
    assert sinfo["version"].startswith("pixel_reasoner_jax-") and sinfo["max_batch"] == 8
    assert sinfo["port"] == int(server.url.rsplit(":", 1)[1])
    assert "unknown endpoint" in _error(http.get("/nope"), 404)
    assert "accepts POST" in _error(http.get("/generate"), 405)


def test_server_config_is_what_server_info_reports(backend):
    """The frozen ServerConfig (port: the bound one) is /server_info's; max_request_bytes answers 413."""
    cfg = ServerConfig(max_batch=3, max_request_bytes=64)
    srv = SGLangServer(backend, cfg, batch_wait_s=0.02).start()  # port 0: the OS picks a free one
    try:
        assert srv.config.port > 0 and srv.config == dataclasses.replace(
            cfg, batch_wait_s=0.02, port=srv.config.port
        )
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            info = c.get("/server_info").json()
            assert {k: info[k] for k in dataclasses.asdict(cfg)} == dataclasses.asdict(srv.config)
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            assert "exceeds 64" in _error(c.post("/generate", json={"input_ids": list(range(40))}), 413)
    finally:
        srv.stop()
    with pytest.raises(TypeError, match="max_batchh"):
        SGLangServer(backend, max_batchh=2)


@pytest.mark.parametrize(
    "options", [{"port": 70000}, {"max_batch": 0}, {"batch_wait_s": -1.0}, {"max_request_bytes": 0}]
)
def test_server_config_rejects_bad_fields(backend, options):
    (field,) = options
    with pytest.raises(ValueError, match=f"ServerConfig.{field} must be"):
        SGLangServer(backend, **options)


def test_health_503_while_loading():
    gate = threading.Event()

    def factory():
        gate.wait(10)
        return ScriptedBackend()

    srv = SGLangServer(factory, port=portpicker.pick_unused_port()).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            assert c.get("/health").status_code == 503
            assert "loading" in _error(c.post("/generate", json={"input_ids": [1]}), 503)
            gate.set()
            srv.wait_ready(5)
            assert c.get("/health").status_code == 200
    finally:
        srv.stop()


def test_backend_failure_reported():
    def factory():
        raise OSError("disk on fire")

    srv = SGLangServer(factory, port=portpicker.pick_unused_port()).start()
    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            srv.wait_ready(5)
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            r = c.get("/health")
            assert r.status_code == 503 and "disk on fire" in r.text
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------ /generate


def test_generate_defaults_and_exact_shape(http, backend):
    r = http.post("/generate", json={"input_ids": PROMPT, "rid": "q1", "return_logprob": True})
    assert r.status_code == 200, r.text
    out = r.json()
    ids = _expected(PROMPT, stops=(151643, IM_END))
    assert set(out) == {"text", "output_ids", "meta_info"}
    assert out["output_ids"] == ids and ids[-1] == IM_END  # untrimmed
    meta = out["meta_info"]
    assert set(meta) == {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
                         "weight_version", "e2e_latency", "output_token_logprobs"}  # fmt: skip
    assert meta["id"] == "q1" and meta["weight_version"] == "0"
    assert meta["finish_reason"] == {"type": "stop", "matched": IM_END}
    assert meta["prompt_tokens"] == len(PROMPT) and meta["completion_tokens"] == len(ids)
    assert meta["output_token_logprobs"] == [[logprob(i), t, None] for i, t in enumerate(ids)]
    # Trimmed text: the matched stop token is not decoded; special tokens skipped by default.
    assert out["text"] == tokenizer().decode(ids[:-1], skip_special_tokens=True)
    (req,) = backend.policy.requests
    assert req.sampling == SamplingParams(128, 1.0, 1.0, -1, (151643, IM_END))
    assert req.rid == "q1" and req.media == () and req.seed is None


def test_generate_no_logprobs_and_no_stop_trim(http):
    body = {"input_ids": PROMPT, "sampling_params": {"no_stop_trim": True, "skip_special_tokens": False}}
    out = http.post("/generate", json=body).json()
    assert "output_token_logprobs" not in out["meta_info"]
    assert out["text"].endswith("</tool_call><|im_end|>")


def test_finish_reasons(http):
    sig = _expected(PROMPT)
    out = http.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3}}).json()
    assert (
        out["meta_info"]["finish_reason"] == {"type": "length", "length": 3} and out["output_ids"] == sig[:3]
    )
    body = {"input_ids": PROMPT, "sampling_params": {"stop_token_ids": [sig[1]]}}
    out = http.post("/generate", json=body).json()
    assert (
        out["meta_info"]["finish_reason"] == {"type": "stop", "matched": sig[1]}
        and out["output_ids"] == sig[:2]
    )
    # A one-token stop string stops in the policy and is reported as the string.
    out = http.post(
        "/generate", json={"input_ids": PROMPT, "sampling_params": {"stop": "</tool_call>"}}
    ).json()
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "</tool_call>"}
    assert out["output_ids"][-1] == TOOL_CALL_END and "</tool_call>" not in out["text"]
    # A several-token stop string is applied to the output afterwards.
    stop = tokenizer().decode([HELLO, TOOL_CALL_END])
    assert len(tokenizer().encode(stop)) == 2
    out = http.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"stop": [stop]}}).json()
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["output_ids"] == sig[: sig.index(TOOL_CALL_END) + 1]
    assert out["text"] == tokenizer().decode(sig[: sig.index(HELLO)], skip_special_tokens=True)
    # ignore_eos: no stop id at all, so the scripted policy runs to max_new_tokens.
    body = {"input_ids": PROMPT, "sampling_params": {"ignore_eos": True, "max_new_tokens": 12}}
    out = http.post("/generate", json=body).json()
    assert (
        out["meta_info"]["finish_reason"] == {"type": "length", "length": 12} and IM_END in out["output_ids"]
    )


def test_images_expand_and_resize(http, backend):
    a, b = image(84, 56, 1), image(100, 60, 2)  # b is not a multiple of 28: the server resizes it
    ids = PROMPT[:3] + IMG_BLOCK + IMG_BLOCK + PROMPT[3:]
    body = {"input_ids": ids, "image_data": [png_data_url(a), base64.b64encode(_png(b)).decode()]}
    out = http.post("/generate", json=body).json()
    (req,) = backend.policy.requests
    assert req.media[0].size == (84, 56) and np.array_equal(np.asarray(req.media[0]), np.asarray(a))
    assert req.media[1].size == (112, 56)  # smart_resize(60, 100) -> (56, 112)
    assert out["meta_info"]["prompt_tokens"] == len(ids) + (2 * 3 - 1) + (2 * 4 - 1)
    assert out["output_ids"] == _expected(ids, req.media, stops=(151643, IM_END))


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_batch_and_n(http, backend):
    img = png_data_url(image(56, 56))
    p0, p1, p2 = PROMPT, PROMPT[:3] + IMG_BLOCK + PROMPT[3:], PROMPT[:3] + IMG_BLOCK * 2 + PROMPT[3:]
    body = {"input_ids": [p0, p1, p2], "image_data": [None, [img], [img, img]], "rid": ["a", "b", "c"],
            "sampling_params": [{"max_new_tokens": 5}, {}, {"temperature": 0.5}]}  # fmt: skip
    out = http.post("/generate", json=body).json()
    assert isinstance(out, list) and [o["meta_info"]["id"] for o in out] == ["a", "b", "c"]
    reqs = {r.rid: r for r in backend.policy.requests}
    for o, rid in zip(out, "abc"):
        assert o["output_ids"] == run(reqs[rid])
    assert reqs["c"].sampling.temperature == 0.5 and reqs["a"].sampling.max_new_tokens == 5
    # n > 1: a list of n; image_data needs the batch-of-one form.
    out = http.post("/generate", json={"input_ids": p1, "image_data": [[img]], "rid": "g",
                                       "sampling_params": {"n": 3, "sampling_seed": 7}}).json()  # fmt: skip
    assert [o["meta_info"]["id"] for o in out] == ["g-0", "g-1", "g-2"]
    assert [r.seed for r in backend.policy.requests[-3:]] == [7, 8, 9]
    msg = _error(
        http.post("/generate", json={"input_ids": p2, "image_data": [img, img], "sampling_params": {"n": 2}})
    )
    assert "length of image_data should be equal to the batch size (1)" in msg


def run(req):
    return run_script(req)[0]


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"sampling_params": {}}, "input_ids"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": ["a", 3]}, "input_ids must be a non-empty list of non-negative ints"),
        ({"input_ids": PROMPT, "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature"),
        ({"input_ids": PROMPT, "sampling_params": {"top_k": 0}}, "sampling_params.top_k"),
        ({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2.5}}, "sampling_params.max_new_tokens"),
        ({"input_ids": PROMPT, "sampling_params": {"stop_token_ids": "x"}}, "sampling_params.stop_token_ids"),
        (
            {"input_ids": PROMPT, "sampling_params": {"repetition_penalty": 1.2}},
            "sampling_params.repetition_penalty",
        ),
        (
            {"input_ids": PROMPT, "sampling_params": {"bogus": 1}},
            "unknown sampling parameter sampling_params.bogus",
        ),
        ({"input_ids": PROMPT, "sampling_params": []}, "sampling_params must be an object"),
        ({"input_ids": PROMPT, "frobnicate": 1}, "unknown field 'frobnicate'"),
        ({"input_ids": PROMPT, "stream": True}, "stream=True"),
        ({"input_ids": PROMPT, "return_logprob": "yes"}, "return_logprob must be a boolean"),
        ({"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 0}, "logprob_start_len=0"),
        ({"input_ids": PROMPT, "rid": 5}, "rid must be a string"),
        ({"input_ids": PROMPT, "image_data": [png_data_url(image(56, 56))]}, "hold 0 <|image_pad|>"),
        (
            {"input_ids": PROMPT + IMG_BLOCK * 2, "image_data": [png_data_url(image(56, 56))]},
            "hold 2 <|image_pad|>",
        ),
        ({"input_ids": PROMPT + IMG_BLOCK, "image_data": ["!!notbase64"]}, "image_data[0]: invalid base64"),
        ({"input_ids": PROMPT + IMG_BLOCK, "image_data": ["aGVsbG8gd29ybGQ="]}, "not a decodable image"),
        (
            {"input_ids": PROMPT + IMG_BLOCK, "image_data": ["data:text/plain;base64,aGk="]},
            "expected image/*",
        ),
        ({"input_ids": PROMPT + IMG_BLOCK, "image_data": ["/etc/img.png"]}, "local image paths are disabled"),
        ({"input_ids": PROMPT + IMG_BLOCK, "image_data": ["https://x.org/a.png"]}, "URLs are not fetched"),
        (
            {"input_ids": PROMPT + IMG_BLOCK, "image_data": [[png_data_url(image(56, 56))]]},
            "image_data[0] must be a string",
        ),
        (
            {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4090}},
            "maximum context length of 4096",
        ),
        ({"input_ids": list(range(5000))}, "longer than the model's context length (4096 tokens)"),
    ],
)
def test_generate_rejects(http, backend, body, needle):
    assert needle in _error(http.post("/generate", json=body))
    assert backend.policy.batches == []


def test_context_counts_expanded_pads(http):
    big = png_data_url(image(28 * 8, 28 * 8))  # 64 tokens, the image limit of the scripted backend
    ids = PROMPT + IMG_BLOCK
    ok = {"input_ids": ids, "image_data": [big], "sampling_params": {"max_new_tokens": 4096 - len(ids) - 64}}
    assert http.post("/generate", json=ok).status_code == 200
    ok["sampling_params"]["max_new_tokens"] += 1
    assert f"{len(ids) + 63} input tokens" in _error(http.post("/generate", json=ok))


def test_bad_json_and_body_shapes(http):
    r = http.post("/generate", content=b"{oops", headers={"Content-Type": "application/json"})
    assert "not valid JSON" in _error(r)
    assert "must be a JSON object" in _error(http.post("/generate", json=[1, 2]))


def test_corrupt_png_and_local_paths(tmp_path, backend):
    good = image(56, 56)
    path = tmp_path / "img.png"
    good.save(path)
    truncated = base64.b64encode(_png(good)[:60]).decode()
    srv = SGLangServer(backend, port=portpicker.pick_unused_port(), allow_local_paths=True).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            body = {"input_ids": PROMPT + IMG_BLOCK, "image_data": [truncated]}
            assert "image_data[0]" in _error(c.post("/generate", json=body))
            body["image_data"] = [str(path)]
            out = c.post("/generate", json=body).json()
            assert out["meta_info"]["prompt_tokens"] == len(PROMPT) + 3 + 3
            assert np.array_equal(np.asarray(backend.policy.requests[0].media[0]), np.asarray(good))
            body["image_data"] = [str(tmp_path / "missing.png")]
            assert "no image file" in _error(c.post("/generate", json=body))
    finally:
        srv.stop()


def test_policy_failure_is_500_without_traceback(http, backend):
    backend.policy.fail_next = 1
    r = http.post("/generate", json={"input_ids": PROMPT})
    assert _error(r, 500) == "generation failed: RuntimeError: scripted failure"
    assert "Traceback" not in r.text
    assert http.post("/generate", json={"input_ids": PROMPT}).status_code == 200


def test_concurrent_requests_never_mix(server, backend):
    backend.policy.delay_s = 0.02
    results, errors = {}, []

    def episode(i):
        ids = PROMPT[:3] + [100 + i] * (i % 5 + 1) + IMG_BLOCK + PROMPT[3:]
        body = {"input_ids": ids, "image_data": [png_data_url(image(56, 28 * (1 + i % 3), i))], "rid": f"e{i}",
                "return_logprob": True}  # fmt: skip
        try:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                results[i] = (ids, c.post("/generate", json=body).json())
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=episode, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(results) == 32
    for i, (ids, out) in results.items():
        media = [image(56, 28 * (1 + i % 3), i)]
        assert out["meta_info"]["id"] == f"e{i}"
        assert out["output_ids"] == _expected(ids, media, stops=(151643, IM_END))
        assert out["meta_info"]["prompt_tokens"] == len(ids) + 2 * (1 + i % 3) - 1
    assert max(server.worker.batch_sizes) > 1 and max(server.worker.batch_sizes) <= 8


# ---------------------------------------------------------------------------------- weight update


def test_update_weights_and_version_echo(http, backend, tmp_path):
    path = str(write_weights(tmp_path / "v7"))
    r = http.post(
        "/update_weights_from_disk", json={"model_path": path, "weight_version": "7", "load_format": "auto"}
    )
    assert r.status_code == 200
    assert r.json() == {
        "success": True,
        "message": "Succeeded to update model weights.",
        "num_paused_requests": 0,
    }
    assert backend.load_calls == [(path, "7")] and backend.flushes == 1
    assert http.post("/generate", json={"input_ids": PROMPT}).json()["meta_info"]["weight_version"] == "7"
    info = http.get("/get_model_info").json()
    assert info["weight_version"] == "7" and info["model_path"] == path
    # No weight_version: the label stays.
    http.post("/update_weights_from_disk", json={"model_path": path, "flush_cache": False})
    assert backend.load_calls[-1] == (path, "7") and backend.flushes == 1


@pytest.mark.parametrize("breakage", ["no_config", "tmp_name", "index_missing", "truncated", "no_dir"])
def test_half_written_folder_rejected_and_never_loaded(http, backend, tmp_path, breakage):
    p = write_weights(tmp_path / "v1", sharded=breakage == "index_missing")
    if breakage == "no_config":
        (p / "config.json").unlink()
    elif breakage == "tmp_name":
        p = p.rename(tmp_path / ".tmp-1-abc")
    elif breakage == "index_missing":
        (p / "model-00001-of-00002.safetensors").unlink()
    elif breakage == "truncated":
        (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:20])
    elif breakage == "no_dir":
        p = tmp_path / "absent"
    r = http.post("/update_weights_from_disk", json={"model_path": str(p), "weight_version": "1"})
    assert r.status_code == 400 and r.json()["success"] is False
    assert str(p) in r.json()["message"] or "config.json" in r.json()["message"]
    assert backend.load_calls == []
    assert http.get("/get_model_info").json()["weight_version"] == "0"


def test_failed_load_keeps_old_weights(http, backend, tmp_path):
    path = str(write_weights(tmp_path / "bad", fail=True))
    r = http.post("/update_weights_from_disk", json={"model_path": path, "weight_version": "9"})
    assert (
        r.status_code == 400 and r.json()["success"] is False and "bad tensor shapes" in r.json()["message"]
    )
    assert backend.load_calls == [(path, "9")]
    assert http.post("/generate", json={"input_ids": PROMPT}).json()["meta_info"]["weight_version"] == "0"
    assert http.get("/get_model_info").json()["model_path"] == "scripted-ckpt"


@pytest.mark.parametrize(
    "body, needle",
    [
        ({}, "model_path is required"),
        ({"model_path": 3}, "model_path is required"),
        ({"model_path": "/x", "weight_version": 3}, "weight_version must be a string"),
        ({"model_path": "/x", "abort_all_request": True}, "unknown field 'abort_all_request'"),
        ({"model_path": "/x", "load_format": "dummy"}, "load_format must be one of"),
    ],
)
def test_update_rejects_bad_bodies(http, backend, body, needle):
    assert needle in _error(http.post("/update_weights_from_disk", json=body))
    assert backend.load_calls == []


def test_update_waits_for_running_batch(server, backend, tmp_path):
    backend.policy.delay_s = 0.4
    path = str(write_weights(tmp_path / "v2"))
    with httpx.Client(base_url=server.url, timeout=10) as c:
        box = {}
        t = threading.Thread(
            target=lambda: box.update(out=c.post("/generate", json={"input_ids": PROMPT}).json())
        )
        t.start()
        assert backend.policy.started.wait(5)
        r = c.post("/update_weights_from_disk", json={"model_path": path, "weight_version": "2"})
        t.join(5)
    assert r.json()["success"] is True
    assert box["out"]["meta_info"]["weight_version"] == "0"  # generated entirely by the old weights


# ------------------------------------------------------------------------ flush / pause / abort


def test_flush_pause_continue_abort(server, backend):
    backend.policy.delay_s = 0.4
    with httpx.Client(base_url=server.url, timeout=10) as c:
        r = c.post("/flush_cache")
        assert r.status_code == 200 and r.text.startswith("Cache flushed")
        box = {}
        t = threading.Thread(
            target=lambda: box.update(a=c.post("/generate", json={"input_ids": PROMPT, "rid": "x"}))
        )
        t.start()
        assert backend.policy.started.wait(5)
        assert "pending requests" in _error(c.post("/flush_cache"))
        # SGLang rejects a rid that is still in flight (400 "Duplicate request ID detected").
        r = c.post("/generate", json={"input_ids": PROMPT, "rid": "x"})
        assert r.status_code == 400 and "Duplicate request ID detected: x" in _error(r)
        r = c.post("/abort_request", json={"rid": "x"})
        assert r.status_code == 200 and r.content == b""  # SGLang's empty 200
        t.join(5)
        out = box["a"].json()
        assert out["output_ids"] == [] and out["meta_info"]["finish_reason"]["type"] == "abort"
        assert out["meta_info"]["finish_reason"]["message"] == "aborted by /abort_request"
        # SGLang's abort answer carries no prompt_tokens (its _handle_abort_req).
        assert "prompt_tokens" not in out["meta_info"] and out["meta_info"]["completion_tokens"] == 0
        assert "rid or abort_all" in _error(c.post("/abort_request", json={}))
        # A finished rid may be used again.
        assert c.post("/generate", json={"input_ids": PROMPT, "rid": "x"}).status_code == 200
        # Paused: new requests wait until continue.
        backend.policy.delay_s = 0.0
        assert c.post("/pause_generation", json={}).json() == {
            "message": "Generation paused successfully.",
            "status": "ok",
        }
        t = threading.Thread(target=lambda: box.update(b=c.post("/generate", json={"input_ids": PROMPT})))
        t.start()
        time.sleep(0.3)
        assert "b" not in box
        assert c.post("/continue_generation").json()["success"] is True
        t.join(5)
        assert box["b"].json()["output_ids"] == _expected(PROMPT, stops=(151643, IM_END))
        assert "mode must be one of" in _error(c.post("/pause_generation", json={"mode": "later"}))


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_pause_modes_keep_running_requests(server, backend, mode):
    """retract: the running request goes back to the queue and runs again after continue; in_place: it
    finishes while paused. Neither is aborted (unlike mode "abort")."""
    backend.policy.delay_s = 0.4
    with httpx.Client(base_url=server.url, timeout=10) as c:
        box = {}
        t = threading.Thread(target=lambda: box.update(a=c.post("/generate", json={"input_ids": PROMPT})))
        t.start()
        assert backend.policy.started.wait(5)
        calls = len(backend.policy.batches)
        assert c.post("/pause_generation", json={"mode": mode}).json()["status"] == "ok"
        time.sleep(0.8)
        if mode == "retract":
            assert "a" not in box  # its first run was discarded; it waits in the queue
        else:
            assert box["a"].json()["meta_info"]["finish_reason"]["type"] == "stop"
        backend.policy.delay_s = 0.0
        c.post("/continue_generation")
        t.join(5)
        out = box["a"].json()
        assert out["output_ids"] == _expected(PROMPT, stops=(151643, IM_END))
        assert len(backend.policy.batches) == calls + (1 if mode == "retract" else 0)


def test_return_prompt_token_ids_expands_pads(server):
    """return_prompt_token_ids (sglang >= 0.5.13): the expanded prompt, each pad repeated to its count."""
    img = image(56, 84)
    ids = [151644, 872, 198, 151652, 151655, 151653, 151645]
    with httpx.Client(base_url=server.url, timeout=10) as c:
        out = c.post("/generate", json={"input_ids": ids, "image_data": [png_data_url(img)],
                                        "return_prompt_token_ids": True}).json()  # fmt: skip
        plain = c.post("/generate", json={"input_ids": ids, "image_data": [png_data_url(img)]}).json()
        assert "return_prompt_token_ids must be a boolean" in _error(
            c.post("/generate", json={"input_ids": ids, "return_prompt_token_ids": 1})
        )
    assert out["prompt_token_ids"] == ids[:4] + [151655] * 6 + ids[5:]
    assert len(out["prompt_token_ids"]) == out["meta_info"]["prompt_tokens"]
    assert "prompt_token_ids" not in plain


# ---------------------------------------------------------------------------------------- chat


def test_chat_completions(http, backend):
    img = image(84, 56, 3)
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(img)}},
                {"type": "text", "text": "What is shown?"},
            ],
        },  # fmt: skip
    ]
    r = http.post(
        "/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 64, "logprobs": True}
    )
    assert r.status_code == 200, r.text
    out = r.json()
    enc = chat.encode_conversation(tokenizer(), messages, image_grids=[(1, 4, 6)], add_generation_prompt=True,
                                   expand=False)  # fmt: skip
    (req,) = backend.policy.requests
    assert list(req.input_ids) == [int(t) for t in enc.input_ids]
    ids = run(req)
    assert out["object"] == "chat.completion" and out["model"] == "m"
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == tokenizer().decode(ids[:-1], skip_special_tokens=True)
    assert choice["finish_reason"] == "stop" and choice["matched_stop"] == IM_END
    assert [c["logprob"] for c in choice["logprobs"]["content"]] == [logprob(i) for i in range(len(ids))]
    assert out["usage"] == {"prompt_tokens": len(req.input_ids) + 5, "completion_tokens": len(ids),
                            "total_tokens": len(req.input_ids) + 5 + len(ids)}  # fmt: skip
    assert out["metadata"]["weight_version"] == "0"
    assert "messages must be a non-empty list" in _error(
        http.post("/v1/chat/completions", json={"messages": []})
    )
    bad = {"messages": messages, "max_tokens": "many"}
    assert _error(http.post("/v1/chat/completions", json=bad)).startswith("max_tokens must be")


# ---------------------------------------------------------------------------------- subprocess


def test_start_local_server_subprocess(tmp_path):
    url, handle = start_local_server(tmp_path, backend="tests.server_helpers:make_backend", timeout_s=60,
                                     weight_version="3")  # fmt: skip
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            out = c.post("/generate", json={"input_ids": PROMPT}).json()
            assert out["meta_info"]["weight_version"] == "3"
            assert out["output_ids"] == _expected(PROMPT, stops=(151643, IM_END))
            assert json.loads(c.get("/get_model_info").text)["model_path"] == str(tmp_path)
    finally:
        handle.stop()
    assert handle.process.returncode == 0  # SIGTERM -> graceful shutdown
    with pytest.raises(RuntimeError, match="cannot read checkpoint"):
        start_local_server(tmp_path, backend="tests.server_helpers:broken_backend", timeout_s=60)


def test_cli_and_its_rollout_server_alias(capsys):
    """`python -m pixel_reasoner_jax.rollout.server` is an alias: the same CLI and the same public objects."""
    assert (alias.main, alias.SGLangServer, alias.ServerConfig, alias.start_local_server) == (
        serve_cli.main,
        SGLangServer,
        ServerConfig,
        start_local_server,
    )
    with pytest.raises(SystemExit) as e:
        serve_cli.main(["--checkpoint", "x", "--max-batch", "0"])
    assert e.value.code == 2 and "ServerConfig.max_batch must be >= 1, got 0" in capsys.readouterr().err
    root = Path(__file__).resolve().parents[1]
    for module in ("pixel_reasoner_jax.serve", "pixel_reasoner_jax.rollout.server"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=root, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert r.returncode == 0 and "--checkpoint" in r.stdout and "--allow-local-paths" in r.stdout, (
            r.stderr
        )
