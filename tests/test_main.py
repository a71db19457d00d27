"""The entry point end to end in subprocesses: a tiny GRPO run's outputs, exact resume after SIGKILL, config
errors at start, and the SGLang backend through our own local server.

Runs use one CPU device, pre-built assets and a shared compilation cache so later runs skip compiles.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pixel_reasoner_jax import main as entry
from pixel_reasoner_jax.metrics import read_metrics
from pixel_reasoner_jax.train.checkpoint import is_complete_step
from pixel_reasoner_jax.train.run import CHECKPOINT_DIR, EXPORT_DIR, read_samples

REPO = pathlib.Path(__file__).resolve().parents[1]
# Small enough for seconds per step on a loaded CPU: a 1-step SFT warm start, then GRPO on 2 prompts x G=2
# with the short "notool" prompt (128-token bucket) and 8 new tokens. filter "none" trains every sample, so
# the GRPO step runs even when the random tiny model earns no reward.
SMALL = (
    "--config.sft.steps=1",
    "--config.sft.batch_size=1",
    "--config.grpo.steps=4",
    "--config.grpo.prompts_per_rollout=2",
    "--config.grpo.group_size=2",
    "--config.grpo.train_batch_size=4",
    "--config.grpo.micro_batches=1",
    "--config.grpo.filter=none",
    "--config.log.checkpoint_every=2",
    "--config.log.plots_every=2",
    "--config.rollout.template=notool",
    "--config.rollout.max_new_tokens=8",
    "--config.rollout.decode_bucket=8",
    "--config.rollout.batch_size=4",
    "--config.data.max_seq_len=1024",  # the mixed-family SFT trajectories of `assets` are longer than 640
    "--config.data.seq_buckets=(128,1024)",  # one SFT bucket (1024), one GRPO bucket (128)
    # The mixed family's images are not square: a view of at most 4*784 px (the quarters job's) shrinks a
    # 224x168 image to 56x28, below the local server's 56*56 minimum, which would re-resize it.
    "--config.rollout.model_max_pixels=12544",
)
TOTAL_STEPS = 5  # 1 SFT + 4 GRPO loop steps
# Keys whose values depend on wall time; every other metric must replay exactly after a resume.
_TIMED = ("time/", "throughput/")


@pytest.fixture(scope="module")
def env():
    """Subprocess environment: one CPU device, and the test run's compilation cache (conftest.py), which
    the runs of this module share."""
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false"
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [e.get("PYTHONPATH")] if p])
    return e


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_ckpt):
    """The tiny checkpoint and a small synthetic data folder, copied into each workdir (so runs skip them)."""
    from pixel_reasoner_jax.data import synthetic

    root = tmp_path_factory.mktemp("assets")
    synthetic.generate(root / entry.SYNTHETIC_DIR, num_sft=4, num_rl=4, num_eval=2, image_size=224, seed=0)
    shutil.copytree(tiny_ckpt, root / entry.TINY_CKPT_DIR)
    return root


def _workdir(assets: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    shutil.copytree(assets, path)
    return path


def _cmd(workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "pixel_reasoner_jax.main", "--config=configs/grpo.py:tiny",
            f"--workdir={workdir}", *SMALL, *extra]  # fmt: skip


def _run(env, workdir, *extra, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _cmd(workdir, *extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def full_run(env, assets, tmp_path_factory):
    """An uninterrupted tiny GRPO run to loop step 5; its wall time is printed for the record."""
    workdir = _workdir(assets, tmp_path_factory.mktemp("full") / "run")
    t0 = time.perf_counter()
    _run(env, workdir)
    print(f"tiny run ({TOTAL_STEPS} steps) took {time.perf_counter() - t0:.1f} s")
    return workdir


def _tensors(export: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(export.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_tiny_run_writes_metrics_plots_checkpoints_and_export(full_run):
    rows = read_metrics(full_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))
    sft_rows, grpo_rows = rows[:1], rows[1:]
    assert all(np.isfinite(r["sft/loss"]) and r["sft/loss"] > 0 for r in sft_rows)
    for key in ("grpo/loss", "grpo/entropy", "grpo/clip_low", "grpo/grad_norm", "reward/shaped",
                "reward/accuracy", "reward/rapr", "tools/calls_per_response", "rollout/logprob_gap",
                "reward/zero_spread_groups", "time/rollout_s", "time/train_s", "rollout/status_no_answer"):  # fmt: skip
        assert all(key in r for r in grpo_rows), key
    # One sampler step per weight update: the sampler's log-probs track the trainer's (float32, one device).
    assert all(r["rollout/logprob_gap"] < 1e-3 for r in grpo_rows)
    assert list((full_run / "tensorboard").glob("events.out.tfevents.*"))
    plots = {p.name for p in (full_run / "plots").glob("*.png")}
    assert {"loss.png", "reward.png", "timing.png"} <= plots
    steps = sorted(int(p.name) for p in (full_run / CHECKPOINT_DIR).iterdir() if p.name.isdigit())
    # keep_checkpoints 2 of the saves at 1 (the end of SFT), 3 and 5 (every 2 GRPO steps and the last)
    assert steps == [3, 5]
    samples = read_samples(full_run)
    assert [s["phase"] for s in samples] == ["sft"] + ["grpo"] * 4
    assert all(len(s["qids"]) == 2 for s in samples[1:])

    from pixel_reasoner_jax.models import hf_io

    model = hf_io.load_model(full_run / EXPORT_DIR)
    assert model.cfg.text.vocab_size == 151936
    tensors = _tensors(full_run / EXPORT_DIR)
    start = _tensors(full_run / entry.TINY_CKPT_DIR)
    assert tensors.keys() == start.keys()
    assert any(not np.array_equal(tensors[k], start[k]) for k in tensors)  # training moved the weights


def test_resume_after_sigkill_is_bit_identical(env, assets, full_run, tmp_path):
    workdir = _workdir(assets, tmp_path / "run")
    log = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would block the child before step 3
    target = workdir / CHECKPOINT_DIR / "3"  # the first GRPO save: 2 steps remain
    deadline = time.monotonic() + 900
    with open(log, "w") as f:
        proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            while not is_complete_step(target):
                assert proc.poll() is None, (
                    f"run exited early ({proc.returncode}):\n{log.read_text()[-4000:]}"
                )
                assert time.monotonic() < deadline, "no committed checkpoint 3 within the deadline"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(read_metrics(workdir / "metrics.jsonl")) < TOTAL_STEPS

    _run(env, workdir)  # the same command resumes

    got, want = _tensors(workdir / EXPORT_DIR), _tensors(full_run / EXPORT_DIR)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert read_samples(workdir) == read_samples(full_run)  # the same records, step by step

    def replayable(rows):
        return [{k: v for k, v in r.items() if not k.startswith(_TIMED)} for r in rows]

    assert replayable(read_metrics(workdir / "metrics.jsonl")) == replayable(
        read_metrics(full_run / "metrics.jsonl")
    )


@pytest.mark.parametrize(
    "override,field",
    [
        ("--config.grpo.group_size=1", "grpo.group_size"),
        ("--config.grpo.filter=keep", "grpo.filter"),
        # checked before jax.distributed and the backend start (hostmem must act before them)
        ("--config.host_malloc=tcmalloc", "host_malloc"),
    ],
)
def test_bad_override_fails_at_start_naming_the_field(env, tmp_path, override, field):
    proc = subprocess.run(
        _cmd(tmp_path / "run", override), cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == entry.EXIT_CONFIG, proc.stderr[-3000:]
    assert f"config error: {field}:" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was started


def test_default_workdir_is_deterministic():
    from configs import grpo as grpo_config

    cfg = entry.build_config(grpo_config.get_config("tiny"), None)
    assert cfg.workdir == os.path.abspath(os.path.join("runs", "grpo_tiny"))
    assert entry.build_config(grpo_config.get_config("tiny"), "/x/y").workdir == "/x/y"


def test_synthetic_trajectories_meet_the_rollout_view(tmp_path):
    """The tiny job's SFT data call the tools as its rollouts do: the observation announces, and the crop
    has, the size the policy will see (56x56), not the crop of the 448 px original (168x168)."""
    import dataclasses

    from PIL import Image

    from configs import grpo as grpo_config
    from pixel_reasoner_jax.data import synthetic

    cfg = entry.build_config(grpo_config.get_config("tiny"), str(tmp_path / "run"))
    ops = entry.rollout_view_ops(cfg)
    assert ops.crop_max_pixels == cfg.rollout.model_max_pixels == 56 * 56
    family = dataclasses.replace(synthetic.FAMILIES[cfg.data.synthetic_family], ops_config=ops)
    root = tmp_path / "data"
    paths = synthetic.generate(root, num_sft=2, num_rl=1, num_eval=1, image_size=448, config=family)
    for line in paths["sft"].read_text().splitlines():
        observation = json.loads(line)["message_list"][3]["content"]
        assert observation[0]["text"] == "\nHere is the cropped image (Image Size: 56x56):"
        assert Image.open(root / observation[1]["image"]).size == (56, 56)


def test_sglang_backend_through_the_local_server(env, assets, tmp_path):
    workdir = _workdir(assets, tmp_path / "run")
    _run(
        env,
        workdir,
        "--config.rollout.backend=sglang",
        "--config.rollout.launch_local_server=True",
        "--config.sft.steps=0",
        "--config.grpo.steps=2",
    )
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all("grpo/loss" in r and r["rollout/logprob_gap"] < 1e-3 for r in rows)
    # Weights reached the server after each step: the second rollout was sampled by version "1".
    assert [s["weight_version"] for s in read_samples(workdir)] == ["0", "1"]
    assert (workdir / "server.log").is_file()
    assert sorted(p.name for p in (workdir / "pushed_weights").iterdir()) == ["v0", "v1"]
    assert json.loads((workdir / EXPORT_DIR / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_eval_mode_scores_the_exported_policy(env, assets, full_run, tmp_path):
    workdir = _workdir(assets, tmp_path / "run")
    cmd = [sys.executable, "-m", "pixel_reasoner_jax.main", "--config=configs/eval.py:tiny",
           f"--workdir={workdir}", f"--config.model.checkpoint={full_run / EXPORT_DIR}",
           "--config.eval.max_new_tokens=8", "--config.eval.batch_size=2"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (workdir / "eval" / "samples.jsonl").read_text().splitlines()]
    qids = [
        json.loads(line)["qid"] for line in (workdir / "synthetic" / "eval.jsonl").read_text().splitlines()
    ]
    assert sorted(r["qid"] for r in rows) == sorted(qids)
    report = json.loads((workdir / "eval" / "report.json").read_text())
    overall = report["overall"]
    assert overall["n"] == len(qids) and sum(overall["status"].values()) == len(qids)
    assert overall["accuracy"] == sum(r["correct"] for r in rows) / len(rows)
    assert (workdir / "eval" / "report.md").read_text().startswith("# Evaluation of")


def test_compile_cache_follows_the_config_unless_the_environment_sets_one(monkeypatch, tmp_path):
    import dataclasses

    import jax

    from configs import grpo as grpo_config

    cfg = entry.build_config(grpo_config.get_config("tiny"), str(tmp_path / "run"))
    assert cfg.compile_cache_dir.endswith(os.path.join("pixel_reasoner_jax", "jax_cache"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {n: getattr(jax.config, n) for n in names}
    try:
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
        ours = dataclasses.replace(cfg, compile_cache_dir=str(tmp_path / "cache"))
        assert entry.setup_compile_cache(ours) == str(tmp_path / "cache")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == entry.CACHE_MIN_COMPILE_S
        jax.config.update("jax_compilation_cache_dir", None)
        assert entry.setup_compile_cache(dataclasses.replace(cfg, compile_cache_dir="")) is None
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "env"))  # as jax read it at import
        assert entry.setup_compile_cache(ours) == str(tmp_path / "env")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
    finally:
        for n, v in saved.items():
            jax.config.update(n, v)
