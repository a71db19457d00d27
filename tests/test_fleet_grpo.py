"""A GRPO run on three of our servers (tiny checkpoint, each its own process), one killed with SIGKILL in the
middle of a rollout: every step completes, and every rollout batch holds each of its episodes exactly once.

Compiles are paid once: the servers decode one request at a time (max_batch 1), so every request of the toy run
has the same shapes and runs the same two programs; the first request compiles them alone, and the other
servers load them from the compilation cache the three share.
"""

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from pixel_reasoner_jax.metrics import read_metrics
from pixel_reasoner_jax.rollout.sglang_client import SGLangClient
from pixel_reasoner_jax.serve.launch import start_local_server
from pixel_reasoner_jax.train import grpo
from pixel_reasoner_jax.train.run import read_samples

VICTIM, KILL_AT = 2, 1  # server index, rollout (its first loop step) during which it dies
STEPS = 3


@pytest.fixture
def three_servers(tiny_ckpt, tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"  # one device per server
    # The servers share the test run's compilation cache (conftest.py, inherited through the environment).

    def start(i):
        log = tmp_path / f"server{i}.log"
        return start_local_server(tiny_ckpt, max_batch=1, env=env, log_path=log, timeout_s=300)

    with ThreadPoolExecutor(3) as pool:
        started = [f.result() for f in [pool.submit(start, i) for i in range(3)]]
    yield started
    for _, handle in started:
        handle.stop()


def scripted_accuracy(traj) -> float:
    """1 for the first episode of each group, so every group is informative and every step trains."""
    return float(traj.episode_id.endswith("-g0"))


def test_grpo_survives_a_server_killed_mid_rollout(three_servers, toy_grpo_config, tmp_path, monkeypatch):
    urls = [url for url, _ in three_servers]
    victim = three_servers[VICTIM][1].process
    cfg = toy_grpo_config(
        tmp_path,
        **{"rollout.backend": "sglang", "rollout.sglang_urls": ",".join(urls), "grpo.steps": STEPS,
           "rollout.health_backoff_s": 0.2, "rollout.server_wait_s": 120.0},
    )  # fmt: skip
    batches: dict[int, list[str]] = {}
    armed, killed, warmed, warm = threading.Event(), threading.Event(), threading.Event(), threading.Lock()
    rollout, post = grpo.GRPOTrainer.rollout, SGLangClient._post_generate

    def recording_rollout(self, step):
        if step == KILL_AT:
            armed.set()
        trajs, metrics = rollout(self, step)
        batches[step] = [t.episode_id for t in trajs]
        return trajs, metrics

    def killing_post(self, request, server, expected):
        if not warmed.is_set():
            with warm:  # the first request compiles alone; the others then find its programs in the cache
                if not warmed.is_set():
                    out = post(self, request, server, expected)
                    warmed.set()
                    return out
        # The victim dies as one of its requests of this rollout goes out; others may be in flight on it.
        if server == VICTIM and armed.is_set() and not killed.is_set():
            killed.set()
            victim.send_signal(signal.SIGKILL)
            victim.wait(30)
        return post(self, request, server, expected)

    monkeypatch.setattr(grpo.GRPOTrainer, "rollout", recording_rollout)
    monkeypatch.setattr(SGLangClient, "_post_generate", killing_post)
    grpo.run(cfg, accuracy_fn=scripted_accuracy)

    assert killed.is_set() and victim.returncode == -signal.SIGKILL
    g, prompts = cfg.grpo.group_size, cfg.grpo.prompts_per_rollout
    for step in range(STEPS):
        want = [f"s{step}-p{k}-g{j}" for k in range(prompts) for j in range(g)]
        assert batches[step] == want, f"rollout {step}: {batches[step]}"
    workdir = tmp_path / "run"
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all("grpo/loss" in r for r in rows)
    assert [r["fleet/servers_healthy"] for r in rows] == [3, 2, 2]
    last = rows[-1]
    assert last[f"fleet/server{VICTIM}/failures"] >= 1 and last[f"fleet/server{VICTIM}/resubmissions"] >= 1
    assert sum(last[f"fleet/server{i}/requests"] for i in range(3)) >= STEPS * g * prompts
    # The weights still reached the survivors after each step.
    assert [s["weight_version"] for s in read_samples(workdir)] == [str(k) for k in range(STEPS)]
