"""Multi-host training: two processes under jax.distributed (2 CPU devices each) against one process on 4
devices, all in one launch (each process start costs seconds of imports and compiles):
  1. one SFT step and one GRPO step, parameters FSDP-sharded across both processes: same parameters;
  2. a 2-step GRPO run with images through `main`, each process rolling out its own prompt of the rollout
     batch: same metrics, samples.jsonl (written once) and exported weights as the one-process run;
  3. a weight push to an SGLang-API server from both processes: process 0 exports and pushes once, process
     1 waits and then expects the pushed version.

This file is also the worker: `python tests/test_distributed.py SPEC_JSON`, the spec as `_launch` writes it
(out, ckpt, rl_path, workdir, and for the two processes coordinator, num_processes, process_id, server_port).
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import portpicker

REPO = pathlib.Path(__file__).resolve().parents[1]
GLOBAL_DEVICES = 4
BATCH, LENGTH = 8, 96  # 2 micro-batches of one sample per device; every process holds the global batch
GRPO_STEPS = 2
HANG_S = 540  # all workers together; below pytest's 600 s timeout, so a hung worker is killed, not orphaned


def _examples():
    """A fixed text-only batch: random ids below the special tokens, the second half of each row trained."""
    from pixel_reasoner_jax.processing.batch import Example

    rng = np.random.default_rng(0)
    out = []
    for i in range(BATCH):
        n = LENGTH - 4 * i  # ragged rows exercise the padding
        ids = rng.integers(0, 151_000, n).astype(np.int32)
        mask = (np.arange(n) >= n // 2).astype(np.int8)
        logprobs = np.where(mask, -rng.uniform(8, 14, n), 0.0).astype(np.float32)
        out.append(
            Example(
                input_ids=ids,
                loss_mask=mask,
                logprobs=logprobs,
                positions=np.broadcast_to(np.arange(n, dtype=np.int32), (3, n)).copy(),
                pixel_values=np.zeros((0, 1176), np.float32),
                grid_thw=np.zeros((0, 3), np.int64),
                is_video=np.zeros((0,), bool),
                second_per_grid_ts=np.zeros((0,), np.float32),
                vision_spans=np.zeros((0, 2), np.int64),
                qid=f"row{i}",
            )
        )
    return out


def steps_worker(out: str, ckpt: str):
    """Part 1: one SFT and one GRPO step on the fixed batch; returns the train state and the model config."""
    import jax
    from jax.experimental import multihost_utils

    from pixel_reasoner_jax import sharding
    from pixel_reasoner_jax.config import GRPOConfig
    from pixel_reasoner_jax.models import hf_io
    from pixel_reasoner_jax.models.config import ModelConfig
    from pixel_reasoner_jax.train import state as st
    from pixel_reasoner_jax.train import steps
    from pixel_reasoner_jax.train.run import host

    assert jax.device_count() == GLOBAL_DEVICES, jax.devices()
    mesh = sharding.make_mesh(data=1, fsdp=GLOBAL_DEVICES, tensor=1)
    with sharding.use_mesh(mesh, "train"):
        model = hf_io.load_model(ckpt, mesh=mesh)
    ocfg = st.OptimConfig(lr=1e-3, total_steps=10, warmup_steps=0)
    optimizer = st.make_optimizer(ocfg)
    graphdef, state, shardings = st.create_train_state(model, optimizer, mesh, seed=0)
    grpo_cfg = GRPOConfig(
        steps=1, num_episodes=1, group_size=2, prompts_per_rollout=2, train_batch_size=4, micro_batches=2,
        eps_low=0.2, eps_high=0.28, kl_coef=0.0, entropy_coef=0.0, tis_cap=2.0, loss_agg="token-mean",
        advantage="mean", filter="none", uniform_tol=0.01, replay_capacity=8, epochs_per_rollout=1,
        max_staleness=0, logprob_temperature="raw",
    )  # fmt: skip
    chunk = 32  # the train functions' log-prob chunk, which `stack` also pads the trained positions to
    fns = steps.make_train_fns(
        graphdef, optimizer, shardings, mesh, logprob_chunk=chunk,
        grpo=steps.GRPOLossSettings.from_config(grpo_cfg, LENGTH), schedule=st.make_schedule(ocfg),
    )  # fmt: skip
    cfg = ModelConfig.from_pretrained(ckpt)

    def micro(n_micro):
        batches = steps.micro_batches(
            _examples(), n_micro, pad_id=151643, vision_cfg=cfg.vision, seq_buckets=None, patch_buckets=None
        )
        return steps.stack(batches, logprob_chunk=chunk, bucket_steps=4)

    state, sft_m = fns.sft_step(state, micro(2))
    mb = micro(2)
    mb["advantages"] = np.array([[1.0, -1.0, 0.5, -0.5], [0.25, -0.25, 2.0, -2.0]], np.float32)
    old = fns.logprobs(state.params, mb)
    mb["old_logprobs"] = host(old)  # replicated: every process reads its own copy, as the GRPO loop does
    state, grpo_m = fns.grpo_step(state, mb)

    params = multihost_utils.process_allgather(state.params, tiled=True)
    flat = {
        "/".join(str(k) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_leaves_with_path(params)
    }
    metrics = {f"sft_{k}": host(v) for k, v in sft_m.items()} | {
        f"grpo_{k}": host(v) for k, v in grpo_m.items()
    }
    if jax.process_index() == 0:
        np.savez(
            out,
            **{f"param:{k}": v for k, v in flat.items()},
            **{f"metric:{k}": v for k, v in metrics.items()},
        )
    return state, cfg


def grpo_main_worker(spec: dict) -> None:
    """Part 2: `main` on the toy prompts (one image each), 2 rollouts of 2 prompts x G 4, every sample
    trained (with an entropy bonus: the random tiny model's groups all score -1, so advantages are 0)."""
    import toy_grpo
    from absl import flags

    settings = {
        **toy_grpo.SETTINGS, "data.rl_path": spec["rl_path"], "model.checkpoint": spec["ckpt"],
        "grpo.steps": GRPO_STEPS, "grpo.filter": "none", "grpo.entropy_coef": 0.01, "optim.lr": 1e-2,
    }  # fmt: skip
    argv = ["main", f"--config={REPO / 'configs' / 'grpo.py'}:tiny", f"--workdir={spec['workdir']}"]
    argv += [f"--config.{k}={v}" for k, v in settings.items()]
    # config_flags registers the --config.<key> overrides it finds in sys.argv when main is imported.
    sys.argv = argv
    from pixel_reasoner_jax import main as entry

    flags.FLAGS(argv)
    assert entry.main(argv[:1]) == 0


def push_worker(spec: dict, params, model_cfg) -> None:
    """Part 3: both processes bring the server to `params`; process 0 alone exports and pushes."""
    import jax
    from server_helpers import ScriptedBackend

    from pixel_reasoner_jax import distributed
    from pixel_reasoner_jax.rollout.sglang_client import SGLangClient
    from pixel_reasoner_jax.serve.http import SGLangServer
    from pixel_reasoner_jax.train.policies import push_weights

    backend = server = None
    if jax.process_index() == 0:
        backend = ScriptedBackend(version="base")
        server = SGLangServer(backend, port=spec["server_port"]).start()
    distributed.barrier("test_server_up")
    client = SGLangClient([f"http://127.0.0.1:{spec['server_port']}"], timeout_s=60, retries=0)
    push_dir = pathlib.Path(spec["workdir"]) / "pushed"
    push_weights(client, params, model_cfg, "7", push_dir)
    assert client.weight_version == "7"
    if backend is not None:
        assert backend.load_calls == [(str((push_dir / "v7").resolve()), "7")], backend.load_calls
        assert (push_dir / "v7" / "config.json").is_file()
    distributed.barrier("test_pushed")
    client.close()
    if server is not None:
        server.stop()


def worker(spec: dict) -> None:
    import jax

    if spec.get("coordinator"):
        # A generous heartbeat timeout: on a busy 2-core machine a worker's heartbeat thread can starve
        # for longer than the default 100 s, and the coordinator then ends both workers.
        jax.distributed.initialize(
            spec["coordinator"], num_processes=spec["num_processes"], process_id=spec["process_id"],
            heartbeat_timeout_seconds=HANG_S,
        )  # fmt: skip
    jax.config.update("jax_default_matmul_precision", "highest")
    state, model_cfg = steps_worker(spec["out"], spec["ckpt"])
    grpo_main_worker(spec)
    if jax.process_count() > 1:
        push_worker(spec, state.params, model_cfg)


def _env(devices: int) -> dict[str, str]:
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false"
    e["JAX_PLATFORMS"] = "cpu"
    # Not the test run's compilation cache (conftest.py): main() in the workers uses the config's cache folder,
    # as before that cache existed (not measured with it: the three workers compile concurrently).
    e.pop("JAX_COMPILATION_CACHE_DIR", None)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [e.get("PYTHONPATH")] if p])
    return e


def _launch(tmp_path, tiny_ckpt) -> tuple[pathlib.Path, pathlib.Path]:
    """Runs the one-process worker and the two-process workers side by side; returns their folders."""
    import toy_grpo

    rl_path = toy_grpo.write_data(tmp_path / "data")
    single, multi = tmp_path / "single", tmp_path / "multi"
    coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
    port = portpicker.pick_unused_port()
    runs = [(single, {}, 4)] + [
        (multi, {"coordinator": coordinator, "num_processes": 2, "process_id": i, "server_port": port}, 2)
        for i in range(2)
    ]
    procs, logs = [], []
    for folder, dist, devices in runs:
        folder.mkdir(exist_ok=True)
        spec = {"out": str(folder / "steps.npz"), "ckpt": str(tiny_ckpt), "rl_path": str(rl_path),
                "workdir": str(folder / "run"), **dist}  # fmt: skip
        logs.append(tmp_path / f"worker-{len(logs)}.log")  # files, not pipes: a full pipe could stall a peer
        with open(logs[-1], "w") as f:
            cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), json.dumps(spec)]
            procs.append(subprocess.Popen(cmd, env=_env(devices), stdout=f, stderr=subprocess.STDOUT))
    errors = []
    deadline = time.monotonic() + HANG_S
    for p, log in zip(procs, logs):
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.returncode != 0:
            errors.append(f"{log.name} exited {p.returncode}:\n{log.read_text()[-3000:]}")
    assert not errors, "\n".join(errors)
    return single, multi


def _tensors(export: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v for f in sorted(export.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_two_processes_match_one_process(tmp_path, tiny_ckpt):
    _compare(*_launch(tmp_path, tiny_ckpt))


def _compare(single: pathlib.Path, multi: pathlib.Path) -> None:
    from pixel_reasoner_jax.metrics import read_metrics
    from pixel_reasoner_jax.train.run import EXPORT_DIR, read_samples

    # 1. The SFT and GRPO steps.
    a, b = np.load(single / "steps.npz"), np.load(multi / "steps.npz")
    assert sorted(a.files) == sorted(b.files)
    params = [k for k in a.files if k.startswith("param:")]
    assert len(params) > 10
    for k in params:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5, err_msg=k)
    for k in (k for k in a.files if k.startswith("metric:")):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(a["metric:grpo_update_norm"]) > 0 and float(a["metric:sft_update_norm"]) > 0

    # 2. The GRPO run through main: the same prompts, episodes, rewards and updates, logged once.
    one, two = single / "run", multi / "run"
    assert read_samples(two) == read_samples(one)
    assert [len(r["qids"]) for r in read_samples(one)] == [2] * GRPO_STEPS
    rows_one, rows_two = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == list(range(1, GRPO_STEPS + 1))
    for r1, r2 in zip(rows_one, rows_two):
        assert r2.keys() == r1.keys()
        assert r1["train/optimizer_step"] == r1["step"] and r1["grpo/update_norm"] > 0
        for k in r1:
            if not k.startswith(("time/", "throughput/")):
                np.testing.assert_allclose(
                    r2[k], r1[k], rtol=1e-4, atol=1e-5, err_msg=f"step {r1['step']} {k}"
                )
    t1, t2 = _tensors(one / EXPORT_DIR), _tensors(two / EXPORT_DIR)
    assert t2.keys() == t1.keys() and t1
    for k in t1:
        np.testing.assert_allclose(t2[k], t1[k], rtol=0, atol=1e-5, err_msg=k)


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
