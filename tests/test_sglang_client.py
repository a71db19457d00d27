"""SGLangClient against the in-repo server (scripted backend): round trips, concurrency, retries, weight push."""

import dataclasses
import http.server
import json
import threading
import time

import numpy as np
import portpicker
import pytest
from server_helpers import IM_END, ScriptedBackend, image, logprob, run_script, send_json, write_weights

from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.media import media_pad_count
from pixel_reasoner_jax.rollout.policy import FINISH_STOP, GenerationRequest, SamplingParams, Video
from pixel_reasoner_jax.rollout.sglang_client import (
    SGLangClient,
    SGLangError,
    SGLangRequestError,
    SGLangUnavailable,
    StaleWeightsError,
    WeightPushError,
)
from pixel_reasoner_jax.serve.http import SGLangServer

BLOCK = (151652, 151655, 151653)
HEAD = (151644, 872, 198)
TAIL = (151645, 198, 151644, 77091, 198)
SAMPLING = SamplingParams(64, temperature=0.7, top_p=0.9, top_k=20, stop_token_ids=(IM_END,))


def _server(backend=None, **kw):
    return SGLangServer(
        backend or ScriptedBackend(), port=portpicker.pick_unused_port(), batch_wait_s=0.01, **kw
    ).start()


@pytest.fixture
def served():
    srv = _server()
    yield srv, srv.backend
    srv.stop()


def _client(urls, **kw):
    kw = {"timeout_s": 20, "retries": 2, "backoff_s": 0.01, "connect_timeout_s": 1, "wait_s": 3, **kw}
    return SGLangClient(urls, **kw)


def _request(rid="r", images=(), extra=(), sampling=SAMPLING):
    ids = HEAD + tuple(extra) + BLOCK * len(images) + TAIL
    return GenerationRequest(ids, tuple(images), sampling, rid)


def _server_view(req: GenerationRequest) -> GenerationRequest:
    """What the server's policy receives: the server adds the checkpoint's eos ids to the stop ids."""
    s = SamplingParams(req.sampling.max_new_tokens, req.sampling.temperature, req.sampling.top_p, req.sampling.top_k,
                       tuple(sorted(set(req.sampling.stop_token_ids) | {151643, IM_END})))  # fmt: skip
    return GenerationRequest(req.input_ids, req.media, s, req.rid, req.seed)


def test_round_trip_with_images(served):
    srv, backend = served
    imgs = (image(84, 56, 1), image(56, 112, 2))
    req = _request("ep1-t0", imgs)
    with _client([srv.url]) as client:
        payload = client.build_payload(req)
        (res,) = client.generate([req])
    sp = payload["sampling_params"]
    assert sp == {"max_new_tokens": 64, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.0,
                  "repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                  "stop_token_ids": [IM_END], "skip_special_tokens": False, "spaces_between_special_tokens": False,
                  "no_stop_trim": True, "ignore_eos": False, "n": 1}  # fmt: skip
    assert payload["return_logprob"] is True and payload["logprob_start_len"] == -1
    assert payload["image_data"][0].startswith("data:image/png;base64,")
    (seen,) = backend.policy.requests
    assert seen.sampling == _server_view(req).sampling and seen.input_ids == req.input_ids
    for a, b in zip(seen.media, imgs):  # PNG is lossless: the server sees our exact pixels
        assert np.array_equal(np.asarray(a), np.asarray(b))
    ids = run_script(_server_view(req))[0]
    assert res.output_ids == tuple(ids) and ids[-1] == IM_END
    assert res.logprobs == tuple(logprob(i) for i in range(len(ids)))
    assert res.finish_reason == FINISH_STOP and res.matched_stop == IM_END
    assert res.prompt_tokens == len(req.input_ids) + (2 * 3 - 1) + (4 * 2 - 1)
    assert res.weight_version == "0"


def test_prompt_tokens_mismatch_is_an_error():
    # This server's pixel bounds force 56x56 images up to 112x112 (16 tokens instead of 4).
    srv = _server(ScriptedBackend(image=ImageProcessorConfig(min_pixels=112 * 112, max_pixels=28 * 28 * 64)))
    try:
        with _client([srv.url]) as client, pytest.raises(SGLangError, match="server counted .* expected"):
            client.generate([_request(images=[image(56, 56)])])
    finally:
        srv.stop()


def test_client_validates_requests_before_sending(served):
    srv, backend = served
    with _client([srv.url]) as client:
        with pytest.raises(ValueError, match="1 image pads .* 0 images"):
            client.generate([GenerationRequest(HEAD + BLOCK, (), SAMPLING)])
        with pytest.raises(ValueError, match="multiples of 28"):
            client.generate([_request(images=[image(50, 56)])])
    assert backend.policy.batches == []


def test_32_concurrent_multi_turn_episodes(served):
    srv, backend = served
    backend.policy.delay_s = 0.01
    errors, done = [], {}

    def episode(client, e):
        try:
            imgs = [image(56, 28 * (1 + e % 3), e)]
            ids = HEAD + (100 + e,) * (1 + e % 4) + BLOCK + TAIL
            for turn in range(3):
                req = GenerationRequest(ids, tuple(imgs), SAMPLING, f"ep{e}-t{turn}")
                (res,) = client.generate([req])
                assert res.output_ids == tuple(run_script(_server_view(req))[0]), (
                    f"episode {e} turn {turn} mixed"
                )
                # Observation with a new image, appended token-exactly (mask-0 tokens in a real episode).
                imgs.append(image(28 * (1 + turn), 56, 1000 * e + turn))
                ids = ids + res.output_ids + (198,) + HEAD + BLOCK + TAIL
            done[e] = len(ids)
        except Exception as ex:  # noqa: BLE001 - collected and asserted below
            errors.append(ex)

    with _client([srv.url], concurrency=32) as client:
        threads = [threading.Thread(target=episode, args=(client, e)) for e in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    assert sorted(done) == list(range(32))
    assert len(backend.policy.requests) == 96 and max(srv.worker.batch_sizes) > 1


def test_batch_generate_keeps_order(served):
    srv, _ = served
    reqs = [_request(f"b{i}", [image(56, 56, i)] * (i % 3), extra=(300 + i,)) for i in range(12)]
    with _client([srv.url], concurrency=4) as client:
        results = client.generate(reqs)
    for req, res in zip(reqs, results):
        assert res.output_ids == tuple(run_script(_server_view(req))[0])


def test_retries_with_backoff_then_success(served):
    srv, backend = served
    backend.policy.fail_next = 2
    with _client([srv.url], retries=3, backoff_s=0.05) as client:
        t0 = time.monotonic()
        (res,) = client.generate([_request()])
        elapsed = time.monotonic() - t0
    assert res.finish_reason == FINISH_STOP
    assert len(backend.policy.batches) == 3 and elapsed >= 0.05 + 0.1
    backend.policy.fail_next = 2
    with _client([srv.url], retries=1) as client, pytest.raises(SGLangError, match="HTTP 500") as info:
        client.generate([_request()])
    assert not isinstance(info.value, SGLangUnavailable)


def test_4xx_is_not_retried(served):
    srv, backend = served
    sent = []
    with _client([srv.url], retries=3) as client:
        client._http.event_hooks["request"].append(lambda r: sent.append(r.url.path))
        too_long = SamplingParams(5000, stop_token_ids=(IM_END,))
        with pytest.raises(SGLangRequestError, match="context length") as info:
            client.generate([_request(sampling=too_long)])
    assert info.value.status == 400 and sent == ["/generate"]


def test_unavailable_on_dead_port():
    dead = f"http://127.0.0.1:{portpicker.pick_unused_port()}"
    with _client([dead], retries=2, backoff_s=0.01, wait_s=0.5) as client:
        t0 = time.monotonic()
        with pytest.raises(SGLangUnavailable, match=dead.replace(".", r"\.")):
            client.generate([_request()])
        assert time.monotonic() - t0 < 5


def test_balancing_pinning_and_failover():
    a, b = _server(), _server()
    dead = f"http://127.0.0.1:{portpicker.pick_unused_port()}"
    try:
        a.backend.policy.delay_s = b.backend.policy.delay_s = 0.05  # requests overlap: both servers get some
        with _client([a.url, b.url]) as client:
            client.generate([_request(f"x{i}") for i in range(8)])
        served = [len(s.backend.policy.requests) for s in (a, b)]
        assert sum(served) == 8 and min(served) >= 1  # exact shares: tests/test_fleet.py
        a.backend.policy.delay_s = b.backend.policy.delay_s = 0.0
        with _client([a.url, b.url], pin_key=lambda rid: rid.split("-")[0]) as client:
            for t in range(4):
                client.generate([_request(f"ep7-t{t}")])
        hits = [sum(r.rid.startswith("ep7") for r in s.backend.policy.requests) for s in (a, b)]
        assert sorted(hits) == [0, 4]
        with _client([dead, a.url], retries=1) as client:
            before = len(a.backend.policy.requests)
            client.generate([_request("f")] * 2)
            assert len(a.backend.policy.requests) == before + 2
    finally:
        a.stop()
        b.stop()


def _export(fail: bool = False):
    def fn(out_dir):
        write_weights(out_dir, fail=fail)

    return fn


def test_push_weights_to_every_server(tmp_path):
    a, b = _server(), _server()
    shared = tmp_path / "shared"
    try:
        with _client([a.url, b.url]) as client:
            for v in (1, 2, 3):
                path = client.push_weights(_export(), v, shared)
                assert path == shared / f"v{v}" and client.weight_version == str(v)
                for s in (a, b):
                    assert s.backend.load_calls[-1] == (str(path.resolve()), str(v))
                results = client.generate([_request(f"p{v}-{i}") for i in range(4)])
                assert {r.weight_version for r in results} == {str(v)}
            assert sorted(p.name for p in shared.iterdir()) == ["v2", "v3"]  # last 2 kept, no .tmp left

            def broken(out_dir):
                raise OSError("disk full")

            with pytest.raises(WeightPushError, match="disk full"):
                client.push_weights(broken, 4, shared)
            with pytest.raises(WeightPushError, match="bad tensor shapes"):
                client.push_weights(_export(fail=True), 5, shared)
            assert client.weight_version == "3"
            assert sorted(p.name for p in shared.iterdir()) == ["v2", "v3", "v5"]
            assert len(a.backend.load_calls) == 4  # v1, v2, v3 and the failing v5; never the broken export
    finally:
        a.stop()
        b.stop()


def test_stale_versions_detected(served, tmp_path):
    srv, _ = served
    with _client([srv.url]) as client:
        client.push_weights(_export(), 1, tmp_path)
        other = write_weights(tmp_path / "other")
        assert client._http.post(srv.url + "/update_weights_from_disk",
                                 json={"model_path": str(other), "weight_version": "x"}).json()["success"]  # fmt: skip
        with pytest.raises(StaleWeightsError, match="'x', expected '1'"):
            client.generate([_request()])
    with _client([srv.url], stale="flag", expected_weight_version="1") as client:
        (res,) = client.generate([_request()])
        assert res.weight_version == "x" and client.stale_samples == 1


def test_abort_during_update_is_resubmitted(served):
    srv, backend = served
    backend.policy.delay_s = 0.3
    with _client([srv.url]) as client:
        box = {}
        t = threading.Thread(target=lambda: box.update(res=client.generate([_request("long")])))
        t.start()
        assert backend.policy.started.wait(5)
        client._http.post(srv.url + "/pause_generation", json={})
        time.sleep(0.4)  # the aborted request came back and was resubmitted; the server holds it while paused
        assert "res" not in box and client.resubmits == 1
        backend.policy.delay_s = 0.0
        client._http.post(srv.url + "/continue_generation")
        t.join(10)
    (res,) = box["res"]
    assert res.output_ids == tuple(run_script(_server_view(_request("long")))[0])
    assert res.finish_reason == FINISH_STOP


def test_video_frames(served):
    srv, backend = served
    frames = tuple(image(56, 56, i) for i in range(3))  # odd count: padded to 4 -> 2 temporal patches
    req = GenerationRequest(HEAD + (151652, 151656, 151653) + TAIL, (Video(frames, fps=1.0),), SAMPLING, "v")
    with _client([srv.url]) as client:
        (res,) = client.generate([req])
        assert res.prompt_tokens == len(req.input_ids) + 2 * 4 - 1
        (seen,) = backend.policy.requests
        assert (
            isinstance(seen.media[0], Video) and seen.media[0].fps == 1.0 and len(seen.media[0].frames) == 3
        )
        client._video_ok[srv.url] = False  # as for a real SGLang server
        with pytest.raises(SGLangError, match="does not take frame lists"):
            client.generate([req])


def test_constructor_validation():
    with pytest.raises(ValueError, match="non-empty list"):
        SGLangClient("http://x:1")
    with pytest.raises(ValueError, match="http:// or https://"):
        SGLangClient(["x:1"])
    with pytest.raises(ValueError, match="stale must be one of"):
        SGLangClient(["http://x:1"], stale="maybe")


def test_jax_backend_end_to_end(tiny_ckpt, tmp_path):
    """The real JAX sampler behind the server: greedy round trip, then a pushed copy of the same weights."""
    pytest.importorskip("pixel_reasoner_jax.rollout.sampler")
    import shutil

    from pixel_reasoner_jax.serve.backend import JaxBackend

    srv = _server(JaxBackend(str(tiny_ckpt), "0"))
    req = _request(
        "jax", [image(56, 84, 5)], sampling=SamplingParams(4, temperature=0.0, stop_token_ids=(IM_END,))
    )
    try:
        with _client([srv.url]) as client:
            (res,) = client.generate([req])  # the client asserts prompt_tokens == expanded length
            assert 1 <= len(res.output_ids) <= 4 and all(lp <= 0 for lp in res.logprobs)
            client.push_weights(lambda d: shutil.copytree(tiny_ckpt, d, dirs_exist_ok=True), 1, tmp_path)
            (again,) = client.generate([req])
        assert again.weight_version == "1" and again.output_ids == res.output_ids
        np.testing.assert_allclose(again.logprobs, res.logprobs, atol=1e-5)
    finally:
        srv.stop()


# ------------------------------------------------------------- SGLang fidelity (reference/sglang.md §12)


def test_every_attempt_gets_a_fresh_rid(served):
    """SGLang answers 400 to a rid still in flight, so a retry must never reuse the failed attempt's rid;
    the episode's own id stays the prefix (server pinning and logs still read it)."""
    srv, backend = served
    backend.policy.fail_next = 2
    sent = []
    with _client([srv.url], retries=3) as client:
        client._http.event_hooks["request"].append(lambda r: sent.append(r.read()))
        (res,) = client.generate([_request("ep3-t1")])
    rids = [json.loads(b)["rid"] for b in sent if b]  # the /health and /model_info probes have no body
    assert res.finish_reason == FINISH_STOP and len(rids) == 3 and len(set(rids)) == 3
    assert all(r.startswith("ep3-t1.") for r in rids)
    assert json.loads(sent[0])["return_prompt_token_ids"] is True


def _fake_sglang(handler):
    """A real HTTP server on 127.0.0.1 whose answers the test scripts (for SGLang behaviour that our own
    server does not reproduce, e.g. the old routes only)."""

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _answer(self, method):
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            send_json(self, *handler(method, self.path, body))

        def do_GET(self):
            self._answer("GET")

        def do_POST(self):
            self._answer("POST")

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def _answer(req, ids, prompt_ids=None, finish=None):
    expected = len(req.input_ids) + sum(media_pad_count(m) - 1 for m in req.media)
    meta = {"id": "x", "finish_reason": finish or {"type": "stop", "matched": IM_END}, "prompt_tokens": expected,
            "completion_tokens": len(ids), "weight_version": "0",
            "output_token_logprobs": [[-0.5, t, None] for t in ids]}  # fmt: skip
    out = {"output_ids": list(ids), "meta_info": meta}
    if prompt_ids is not None:
        out["prompt_token_ids"] = prompt_ids
    return out


def test_abort_without_prompt_tokens_is_resubmitted_and_old_routes_work():
    """An aborted answer has no prompt_tokens (SGLang's abort handler): the client reads finish_reason
    first and resubmits; /model_info falls back to /get_model_info on a server without the new route."""
    req = _request("ab")
    calls = []

    def handler(method, path, body):
        calls.append(path)
        if path == "/get_server_info":
            return 200, {"enable_deterministic_inference": False}
        if path == "/get_model_info":
            return 200, {"weight_version": "0"}
        if path in ("/model_info", "/server_info"):
            return 404, {"detail": "Not Found"}
        if path == "/generate" and calls.count("/generate") == 1:
            return 200, {"meta_info": {"id": body["rid"], "finish_reason": {"type": "abort", "message": "paused"},
                                       "weight_version": "0", "completion_tokens": 0}}  # fmt: skip
        return 200, _answer(req, [7, 8, IM_END])

    srv, url = _fake_sglang(handler)
    try:
        with _client([url]) as client:
            (res,) = client.generate([req])
            assert res.output_ids == (7, 8, IM_END) and client.resubmits == 1
            assert client.model_info()["weight_version"] == "0"
    finally:
        srv.shutdown()
    assert calls.count("/generate") == 2 and "/get_model_info" in calls


def test_seeds_only_to_servers_that_honour_them(caplog):
    """sampling_seed works only under --enable-deterministic-inference: a server without it gets no seed
    and the run is told once; our server (which honours seeds) gets them."""
    seeds = []

    def handler(method, path, body):
        if path == "/server_info":
            return 200, {"enable_deterministic_inference": False}
        seeds.append(body["sampling_params"].get("sampling_seed"))
        return 200, _answer(_request(), [IM_END])

    srv, url = _fake_sglang(handler)
    seeded = [dataclasses.replace(_request(f"s{i}"), seed=100 + i) for i in range(3)]
    try:
        with caplog.at_level("WARNING"), _client([url]) as client:
            client.generate(seeded)
            assert client.unseeded_requests == 3
    finally:
        srv.shutdown()
    assert seeds == [None] * 3
    assert sum("ignores sampling_seed" in r.getMessage() for r in caplog.records) == 1
    ours = _server()
    try:
        sent = []
        with _client([ours.url]) as client:
            client._http.event_hooks["request"].append(lambda r: sent.append(r.read()))
            client.generate(seeded[:1])
            assert client.unseeded_requests == 0
        gen = [json.loads(b) for b in sent if b]
        assert gen[-1]["sampling_params"]["sampling_seed"] == 100
    finally:
        ours.stop()


def test_retokenized_prompt_is_detected():
    """return_prompt_token_ids: a server whose expanded prompt differs at a text position (it re-tokenized)
    is an error even though the count agrees; cache keys in place of pad ids inside a media run are not."""
    img = image(56, 56)
    req = _request("rt", [img])
    want = list(req.input_ids[:4]) + [151655] * 4 + list(req.input_ids[5:])
    answers = iter([
        want[:4] + [99] * 4 + want[8:],  # pads replaced by cache keys: fine
        want[:1] + [12345] + want[2:],  # a text token changed: re-tokenized
    ])  # fmt: skip

    def handler(method, path, body):
        if path == "/server_info":
            return 200, {"enable_deterministic_inference": True}
        return 200, _answer(req, [IM_END], prompt_ids=next(answers))

    srv, url = _fake_sglang(handler)
    try:
        with _client([url]) as client:
            client.generate([req])
            with pytest.raises(SGLangError, match="differs from ours at position 1"):
                client.generate([req])
    finally:
        srv.shutdown()
