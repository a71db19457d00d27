"""The SGLang server fleet with scripted servers (no model): least-outstanding balancing, resubmission when a
server dies or times out mid-request, re-admission only with the current weights, and waiting when all are down.
"""

import http.server
import json
import threading
import time
from pathlib import Path

import portpicker
import pytest
from server_helpers import IM_END, send_json

from pixel_reasoner_jax.rollout.fleet import Fleet, NoServerError
from pixel_reasoner_jax.rollout.policy import GenerationRequest, SamplingParams
from pixel_reasoner_jax.rollout.sglang_client import SGLangClient, SGLangUnavailable

SAMPLING = SamplingParams(8, stop_token_ids=(IM_END,))


class FakeServer:
    """A scripted SGLang stand-in on a fixed port that answers /generate from the request alone.

    It can hang on /generate (`hold`), hold every /generate until a shared barrier fills (`gate`), refuse
    weight loads (`fail_loads`), and go away (`stop`: held requests are dropped unanswered, as by a killed
    process) and come back on the same port (`start`). Connections close after each answer (HTTP/1.0), so
    a stopped server answers nothing more.
    """

    def __init__(self, gate: threading.Barrier | None = None):
        self.port = portpicker.pick_unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.version, self.gate, self.fail_loads = "0", gate, 0
        self.hold = threading.Event()  # set: /generate waits until released or the server stops
        self.events: list[tuple[str, str]] = []  # ("generate", rid) and ("load", version), in order
        self._httpd = None
        self._stopped = threading.Event()
        self.start()

    def rids(self) -> list[str]:
        return [x for kind, x in self.events if kind == "generate"]

    def start(self) -> "FakeServer":
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path == "/health":
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/model_info":
                    send_json(self, 200, {"weight_version": fake.version})
                else:
                    send_json(self, 404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/update_weights_from_disk":
                    if fake.fail_loads:
                        fake.fail_loads -= 1
                        return send_json(self, 400, {"success": False, "message": "scripted load failure"})
                    fake.version = body["weight_version"]
                    fake.events.append(("load", fake.version))
                    return send_json(self, 200, {"success": True, "message": "ok"})
                fake.events.append(("generate", body["rid"]))
                if fake.gate is not None:
                    fake.gate.wait(10)
                while fake.hold.is_set() and not fake._stopped.is_set():
                    time.sleep(0.01)
                if fake._stopped.is_set():
                    self.close_connection = True  # killed mid-request: no answer
                    return
                ids = [1000 + sum(body["input_ids"]) % 997, IM_END]
                meta = {"id": body["rid"], "finish_reason": {"type": "stop", "matched": IM_END},
                        "prompt_tokens": len(body["input_ids"]), "completion_tokens": 2,
                        "weight_version": fake.version, "output_token_logprobs": [[-0.5, t, None] for t in ids]}  # fmt: skip
                send_json(self, 200, {"output_ids": ids, "meta_info": meta})

        self._stopped.clear()
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def servers(request):
    made = []

    def make(n, gate=None):
        made.extend(FakeServer(gate) for _ in range(n))
        return made[-n:]

    yield make
    for s in made:
        if not s._stopped.is_set():
            s.stop()


def _client(servers, **kw):
    kw = {"timeout_s": 10, "retries": 2, "backoff_s": 0.02, "max_backoff_s": 0.1, "wait_s": 10,
          "connect_timeout_s": 1, **kw}  # fmt: skip
    return SGLangClient([s.url for s in servers], **kw)


def _requests(n, prefix="ep"):
    return [GenerationRequest((151644, 100 + i, 198), (), SAMPLING, f"{prefix}{i}-t0") for i in range(n)]


def _check(results, requests):
    """Each result is its own request's answer (the fake encodes the prompt in the first id)."""
    assert [r.output_ids for r in results] == [(1000 + sum(q.input_ids) % 997, IM_END) for q in requests]


def _wait_for(cond, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _export(out_dir) -> None:
    (Path(out_dir) / "config.json").write_text("{}")


# ----------------------------------------------------------------------------------------------- balancing


def test_least_outstanding_with_ties_to_the_lowest_index():
    fleet = Fleet(["a", "b", "c"], probe=lambda i: "0", wait_s=1, backoff_s=0.01, max_backoff_s=0.01)
    assert [fleet.acquire() for _ in range(4)] == [0, 1, 2, 0]
    fleet.release(1)
    fleet.release(2)
    assert fleet.acquire() == 1  # b and c tie at 0 outstanding
    assert fleet.acquire(prefer=0) == 0  # a pinned request keeps its server while it is in rotation
    fleet.release(0, "connection refused")
    assert fleet.in_rotation() == [1, 2] and fleet.acquire(prefer=0) == 2
    m = fleet.metrics()
    assert m["fleet/server0/requests"] == 3 and m["fleet/server0/failures"] == 1
    fleet.close()
    with pytest.raises(NoServerError, match="closed"):
        fleet.acquire()


def test_concurrent_requests_spread_evenly(servers):
    """Nine requests held until all have arrived: each server holds three (the least-loaded rule)."""
    fleet = servers(3, gate=threading.Barrier(9))
    reqs = _requests(9)
    with _client(fleet) as client:
        _check(client.generate(reqs), reqs)
        m = client.fleet_metrics()
    assert [len(s.rids()) for s in fleet] == [3, 3, 3]
    assert [m[f"fleet/server{i}/requests"] for i in range(3)] == [3, 3, 3]
    assert m["fleet/servers_healthy"] == 3


# -------------------------------------------------------------------------------------------- resubmission


def test_server_dying_mid_request_has_its_requests_resubmitted(servers):
    fleet = servers(3)
    victim = fleet[1]
    victim.hold.set()
    reqs = _requests(6)
    with _client(fleet) as client:
        box = {}
        t = threading.Thread(target=lambda: box.update(res=client.generate(reqs)))
        t.start()
        _wait_for(lambda: victim.rids(), "a request to reach the victim")
        victim.stop()  # its held requests are dropped unanswered
        t.join(20)
        m = client.fleet_metrics()
    _check(box["res"], reqs)
    lost = m["fleet/server1/requests"]
    assert lost >= 1 and m["fleet/server1/failures"] == lost and m["fleet/server1/resubmissions"] == lost
    assert m["fleet/servers_healthy"] == 2
    # Every episode answered exactly once, by the survivors; each attempt had its own rid, the episode's
    # id as prefix.
    answered = [r.split(".")[0] for s in (fleet[0], fleet[2]) for r in s.rids()]
    assert sorted(answered) == sorted(q.rid for q in reqs)
    attempts = [r for s in fleet for r in s.rids()]
    assert len(set(attempts)) == len(attempts) and all("." in r for r in attempts)


def test_timeout_is_a_failure_and_the_live_server_returns_without_a_push(servers):
    slow, fast = servers(2)
    slow.hold.set()
    reqs = _requests(1)
    with _client([slow, fast], timeout_s=0.5) as client:
        _check(client.generate(reqs), reqs)  # timed out on `slow`, resubmitted to `fast`
        assert client.fleet_metrics()["fleet/server0/failures"] == 1
        slow.hold.clear()
        _wait_for(lambda: client.fleet.in_rotation() == [0, 1], "the slow server to be re-admitted")
        _check(client.generate(reqs), reqs)
    assert not [e for e in slow.events if e[0] == "load"]  # it still had the current weights


def test_4xx_and_bad_answers_do_not_take_a_server_out(servers):
    (only,) = servers(1)
    bad = GenerationRequest((151644, 151655, 198), (), SAMPLING, "pads")  # a pad without its image
    with _client([only]) as client:
        with pytest.raises(ValueError, match="1 image pads"):
            client.generate([bad])
        assert client.fleet.in_rotation() == [0]


# -------------------------------------------------------------------------------------------- re-admission


def test_a_server_that_missed_a_push_returns_only_with_the_current_weights(servers, tmp_path):
    fleet = servers(2, gate=threading.Barrier(2))
    a, b = fleet
    with _client(fleet) as client:
        client.push_weights(_export, 1, tmp_path)
        b.stop()
        client.push_weights(_export, 2, tmp_path)  # b is down: only a loads v2
        assert client.fleet.in_rotation() == [0] and client.weight_version == "2"
        a.gate = None
        reqs = _requests(4)
        results = client.generate(reqs)
        _check(results, reqs)
        assert {r.weight_version for r in results} == {"2"} and not b.rids()
        b.version = "0"  # it restarts from its checkpoint
        b.start()
        _wait_for(lambda: client.fleet.in_rotation() == [0, 1], "b to be re-admitted")
        a.gate = b.gate = threading.Barrier(2)
        results = client.generate(_requests(2, "again"))
        assert {r.weight_version for r in results} == {"2"}
        # b loaded v2 before it took any request.
        assert b.events[:3] == [("load", "1"), ("load", "2"), ("generate", b.rids()[0])]
        # A load that fails keeps the server out until a probe's push succeeds.
        b.fail_loads = 1
        a.gate = b.gate = None
        client.push_weights(_export, 3, tmp_path)
        assert client.fleet_metrics()["fleet/server1/failures"] == 2  # it died once, refused once
        _wait_for(lambda: client.fleet.in_rotation() == [0, 1], "b to load v3")
        assert b.events[-1] == ("load", "3") and b.version == "3"


def test_every_server_down_waits_then_fails_naming_them(servers, tmp_path):
    fleet = servers(2)
    for s in fleet:
        s.stop()
    with _client(fleet, wait_s=0.5) as client, pytest.raises(SGLangUnavailable) as info:
        client.generate(_requests(1))
    msg = str(info.value)
    assert "no rollout server took requests for 0.5 s" in msg and all(s.url in msg for s in fleet)
    # A server back within the wait takes the request, after the weights pushed while it was down.
    with _client(fleet) as client:
        client.push_weights(_export, 7, tmp_path)  # nobody answers: not an error, the rollout waits
        threading.Timer(0.3, fleet[1].start).start()
        (res,) = client.generate(_requests(1))
        assert res.weight_version == "7" and fleet[1].events[0] == ("load", "7")
