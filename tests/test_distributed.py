"""Multi-host training: two processes under jax.distributed (2 CPU devices each, parameters FSDP-sharded
across both) take one SFT step and one GRPO step that agree with one process on 4 devices.

This file is also the worker: `python tests/test_distributed.py OUT CKPT [COORDINATOR NUM_PROCESSES ID]`.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import portpicker

REPO = pathlib.Path(__file__).resolve().parents[1]
GLOBAL_DEVICES = 4
BATCH, LENGTH = 8, 96  # 2 micro-batches of one sample per device; every process holds the global batch


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


def worker(out: str, ckpt: str, coordinator: str | None, num_processes: int, process_id: int) -> None:
    import jax

    if coordinator:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    jax.config.update("jax_default_matmul_precision", "highest")
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
        max_staleness=0,
    )  # fmt: skip
    fns = steps.make_train_fns(
        graphdef, optimizer, shardings, mesh, logprob_chunk=32,
        grpo=steps.GRPOLossSettings.from_config(grpo_cfg, LENGTH), schedule=st.make_schedule(ocfg),
    )  # fmt: skip
    cfg = ModelConfig.from_pretrained(ckpt)

    def micro(n_micro):
        batches = steps.micro_batches(
            _examples(), n_micro, pad_id=151643, vision_cfg=cfg.vision, seq_buckets=None, patch_buckets=None
        )
        return steps.stack(batches)

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


def _env(devices: int) -> dict[str, str]:
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false"
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [e.get("PYTHONPATH")] if p])
    return e


def test_two_processes_match_one_process(tmp_path, tiny_ckpt):
    script = [sys.executable, str(pathlib.Path(__file__).resolve())]
    single = tmp_path / "single.npz"
    multi = tmp_path / "multi.npz"
    coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
    runs = [(single, None, 4), (multi, 0, 2), (multi, 1, 2)]
    procs, logs = [], []
    for out, pid, devices in runs:
        args = [str(out), str(tiny_ckpt)] + ([] if pid is None else [coordinator, "2", str(pid)])
        logs.append(tmp_path / f"worker-{len(logs)}.log")  # files, not pipes: a full pipe could stall a peer
        with open(logs[-1], "w") as f:
            procs.append(
                subprocess.Popen(script + args, env=_env(devices), stdout=f, stderr=subprocess.STDOUT)
            )
    errors = []
    for p, log in zip(procs, logs):
        try:
            p.wait(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.returncode != 0:
            errors.append(f"{p.args[2:]} exited {p.returncode}:\n{log.read_text()[-3000:]}")
    assert not errors, "\n".join(errors)

    a, b = np.load(single), np.load(multi)
    assert sorted(a.files) == sorted(b.files)
    params = [k for k in a.files if k.startswith("param:")]
    assert len(params) > 10
    for k in params:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5, err_msg=k)
    for k in (k for k in a.files if k.startswith("metric:")):
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(a["metric:grpo_update_norm"]) > 0 and float(a["metric:sft_update_norm"]) > 0


if __name__ == "__main__":
    out_path, ckpt_dir, *rest = sys.argv[1:]
    if rest:
        worker(out_path, ckpt_dir, rest[0], int(rest[1]), int(rest[2]))
    else:
        worker(out_path, ckpt_dir, None, 1, 0)
