"""Asynchronous GRPO (grpo.max_staleness = k > 0, train/async_rollout.py) on the tiny checkpoint: the fixed
schedule of sampling versions, stale samples dropped, checkpoints as sync points, an exact resume, the
SGLang client path, and the timing split.

Every group is informative (episode g0 of each prompt scores 1), so every loop step is an optimizer step
and the policy version (optimizer steps) moves by one per rollout batch.
"""

import dataclasses
import shutil
import types

import numpy as np
import pytest

from pixel_reasoner_jax import metrics as M
from pixel_reasoner_jax.metrics import read_metrics
from pixel_reasoner_jax.train import async_rollout, grpo
from pixel_reasoner_jax.train.run import CHECKPOINT_DIR, EXPORT_DIR, read_samples

_TIMED = ("time/", "throughput/")


def first_wins(traj) -> float:
    """1 for the first episode of every group (episode ids are s<step>-p<k>-g<j>), else 0."""
    return float(traj.episode_id.endswith("-g0"))


def _replayable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(_TIMED)} for r in rows]


def _tensors(export) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v for f in sorted(export.glob("*.safetensors")) for k, v in load_file(f).items()}


def _versions(run) -> list:
    return [r["weight_version"] for r in read_samples(run)]


@pytest.fixture(scope="module")
def async_runs(tmp_path_factory, toy_grpo_config):
    """k=1, 4 steps, a checkpoint every 2 (A); A resumed after losing checkpoint 4 (B)."""
    root = tmp_path_factory.mktemp("async")
    cfg = toy_grpo_config(
        root,
        **{"grpo.steps": 4, "grpo.max_staleness": 1, "log.checkpoint_every": 2, "log.keep_checkpoints": 4},
    )
    grpo.run(cfg, accuracy_fn=first_wins)
    run_a = root / "run"
    # Killed after checkpoint 2 was committed, with rollout 3 sampled and step 3 logged: checkpoint 4 is lost.
    run_b = root / "resumed"
    shutil.copytree(run_a, run_b)
    shutil.rmtree(run_b / CHECKPOINT_DIR / "4")
    shutil.rmtree(run_b / EXPORT_DIR)
    grpo.run(dataclasses.replace(cfg, workdir=str(run_b)), accuracy_fn=first_wins)
    return cfg, run_a, run_b


def test_rollouts_lag_one_batch_and_sync_at_checkpoints(async_runs):
    _, run_a, _ = async_runs
    rows = read_metrics(run_a / "metrics.jsonl")
    assert [r["train/optimizer_step"] for r in rows] == [1, 2, 3, 4]
    # Rollout r is sampled with the weights after batch r-2 (version r-1; the first two with the start's),
    # except right after checkpoint 2, which the rollout at step 3 samples from.
    assert _versions(run_a) == ["0", "0", "2", "2"]
    trainer_versions = [r["train/optimizer_step"] - 1 for r in rows]  # when each batch starts training
    assert [r["rollout/staleness_steps"] for r in rows] == [0, 1, 0, 1]
    for version, at, row in zip(_versions(run_a), trainer_versions, rows):
        assert 0 <= at - int(version) == row["rollout/staleness_steps"] <= 1  # within k
    assert all(r["rollout/stale_dropped"] == 0 and r["rollout/discarded_rollouts"] == 0 for r in rows)
    # The timing split: both sides are logged on every step.
    for key in (*M.TRAINER_TIMES, *M.ROLLOUT_TIMES, M.STEP_TIME):
        assert all(key in r and r[key] >= 0 for r in rows), key
    assert all(r["throughput/rollout_tokens_per_s_per_device"] > 0 for r in rows)
    assert (run_a / "plots" / "timing_split.png").exists()


def test_resume_with_k1_matches_the_uninterrupted_run(async_runs):
    _, run_a, run_b = async_runs
    assert _replayable(read_metrics(run_b / "metrics.jsonl")) == _replayable(
        read_metrics(run_a / "metrics.jsonl")
    )
    assert read_samples(run_b) == read_samples(run_a)
    got, want = _tensors(run_b / EXPORT_DIR), _tensors(run_a / EXPORT_DIR)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


class FakeTrainer:
    """What async_rollout.train uses of a GRPOTrainer, with no model: prompts are integers, a rollout is two
    trajectories labelled with the policy's version, a batch trains (one optimizer step per loop step)
    unless all its samples were dropped, and checkpoints follow grpo.py's rule."""

    def __init__(self, k, *, every=0, missed=(), start=0, fail_at=None):
        self.cfg = types.SimpleNamespace(
            grpo=types.SimpleNamespace(max_staleness=k, steps_per_rollout=1, tis_cap=2.0),
            log=types.SimpleNamespace(checkpoint_every=every),
        )
        self.ctx = types.SimpleNamespace(state=types.SimpleNamespace(params={"w": np.zeros(2)}))
        self.every, self.missed, self.fail_at = every, set(missed), fail_at
        self.opt = self.pos = start  # optimizer steps; prompts consumed
        self.served = str(start)  # the policy's weight version
        self.rows = []
        self.rollouts = self
        self.it = types.SimpleNamespace(
            get_state=lambda: {"pos": self.pos}, set_state=lambda s: setattr(self, "pos", s["pos"])
        )

    def version(self) -> str:
        return str(self.opt)

    def push(self, params, version):
        if version not in self.missed:
            self.served = version

    def draw_prompts(self):
        self.pos += 1
        return [self.pos - 1]

    def run_rollout(self, items, step):
        if step == self.fail_at:
            raise RuntimeError("scripted rollout failure")
        traj = types.SimpleNamespace(turns=(0,), turn_versions=(self.served,), prompt=items[0])
        return [traj, traj], {"time/rollout_s": 0.0}

    def train_batch(self, step, until, bar, trajs, roll_m, *, keep, on_plan):
        after = self.opt + int(keep.any())
        on_plan(step + 1 == until or bool(self.every and after // self.every > self.opt // self.every))
        self.rows.append({
            "prompt": trajs[0].prompt, "sampled": int(trajs[0].turn_versions[0]), "trainer": self.opt,
            **{k: roll_m[k] for k in ("rollout/staleness_steps", "rollout/stale_dropped", "rollout/discarded_rollouts")},
        })  # fmt: skip
        self.opt = after
        return step + 1


def _column(rows, key):
    return [r[key] for r in rows]


def test_schedule_k1_samples_with_the_weights_one_batch_behind():
    t = FakeTrainer(1)
    assert async_rollout.train(t, 0, 5, None) == 5
    assert _column(t.rows, "sampled") == [0, 0, 1, 2, 3]
    assert _column(t.rows, "trainer") == [0, 1, 2, 3, 4]
    assert _column(t.rows, "rollout/staleness_steps") == [0, 1, 1, 1, 1]
    assert _column(t.rows, "prompt") == [0, 1, 2, 3, 4]


def test_schedule_k2_discards_what_was_sampled_ahead_of_a_checkpoint_and_resumes_exactly():
    t = FakeTrainer(2, every=3)
    async_rollout.train(t, 0, 7, None)
    # Rollout r uses the weights after batch r-3; after checkpoints 3 and 6 the rollout sampled ahead
    # (with version 1, then 4) is discarded, its prompt drawn again, and the rollouts restart from it.
    assert _column(t.rows, "sampled") == [0, 0, 0, 3, 3, 3, 6]
    assert _column(t.rows, "prompt") == list(range(7))
    assert _column(t.rows, "rollout/discarded_rollouts") == [0, 0, 1, 0, 0, 1, 0]
    assert max(_column(t.rows, "rollout/staleness_steps")) <= 2
    resumed = FakeTrainer(2, every=3, start=3)  # restored from checkpoint 3
    async_rollout.train(resumed, 3, 7, None)
    assert resumed.rows == t.rows[3:]


def test_stale_samples_are_dropped():
    """The policy misses the push of version 1 (as a server that failed to load it would): the rollout at
    loop step 2 is sampled with version 0 and trained at version 2, beyond k=1: both samples are dropped,
    and that batch trains nothing."""
    t = FakeTrainer(1, missed={"1"})
    async_rollout.train(t, 0, 4, None)
    assert _column(t.rows, "sampled") == [0, 0, 0, 2]
    assert _column(t.rows, "rollout/staleness_steps") == [0, 1, 2, 0]
    assert _column(t.rows, "rollout/stale_dropped") == [0, 0, 2, 0]
    assert _column(t.rows, "trainer") == [0, 1, 2, 2]


def test_a_failed_rollout_stops_the_run():
    t = FakeTrainer(1, fail_at=2)
    with pytest.raises(RuntimeError, match="scripted rollout failure"):
        async_rollout.train(t, 0, 5, None)
    assert len(t.rows) == 2


def test_sglang_client_path(tmp_path, toy_grpo_config):
    """k=1 through the SGLang client and a scripted server: the worker pushes each version over HTTP."""
    from pixel_reasoner_jax.serve.http import SGLangServer
    from tests.server_helpers import ScriptedBackend

    backend = ScriptedBackend("scripted", "base")
    server = SGLangServer(backend, port=0).start()
    try:
        url = f"http://127.0.0.1:{server.state.config.port}"
        cfg = toy_grpo_config(tmp_path, **{"grpo.steps": 3, "grpo.max_staleness": 1})
        cfg = dataclasses.replace(
            cfg, rollout=dataclasses.replace(cfg.rollout, backend="sglang", sglang_urls=url)
        )
        grpo.run(cfg, accuracy_fn=first_wins)
    finally:
        server.stop()
    assert [v for _, v in backend.load_calls] == ["0", "1"]
    assert _versions(tmp_path / "run") == ["0", "0", "1"]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["throughput/rollout_tokens_per_s_per_server"] > 0 for r in rows)


def test_staleness_of_trajectories():
    def traj(*versions):
        return types.SimpleNamespace(turns=versions, turn_versions=versions)

    got = async_rollout.staleness([traj("3"), traj("1", "2"), traj(), traj("base")], 4)
    np.testing.assert_array_equal(got, [1, 3, 0, np.inf])


def test_timing_panels():
    grpo_keys = [*M.TRAINER_TIMES, *M.ROLLOUT_TIMES, M.STEP_TIME]
    assert M.timing_panels(grpo_keys) == [
        ("trainer", list(M.TRAINER_TIMES)),
        ("rollout", list(M.ROLLOUT_TIMES)),
    ]
    assert M.timing_panels(["time/data_s", "time/train_s", M.STEP_TIME]) == [
        ("", ["time/data_s", "time/train_s"])
    ]


def test_async_rollouts_are_refused_over_several_processes(tmp_path, toy_grpo_config, monkeypatch):
    from pixel_reasoner_jax.config import ConfigError

    cfg = toy_grpo_config(tmp_path, **{"grpo.max_staleness": 1})
    grpo.check_supported(cfg)
    monkeypatch.setattr(grpo.jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match="grpo.max_staleness"):
        grpo.check_supported(cfg)
    grpo.check_supported(dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, max_staleness=0)))
