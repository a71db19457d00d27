"""Regenerates benchmarks/PLANS.md: the AOT plan of 3B/7B SFT and GRPO on the TPU slices and GPU nodes
users rent, each compiled in its own process (one at a time) with the environment its target needs.

  python -m benchmarks.plans                      # every missing plan, then PLANS.md
  python -m benchmarks.plans --only=grpo:7b:h100-8 --force
  python -m benchmarks.plans --table              # PLANS.md from the JSON files already written
  python -m benchmarks.plans --recount            # add the left-out optimizer state to older plans, then PLANS.md

TPU plans run under $PLAN_TPU_PYTHON (default /work/venv-tpu/bin/python: jax[tpu]), GPU plans under
$PLAN_GPU_PYTHON (default /work/venv-gpu/bin/python: jax[cuda12]), cpu plans under this interpreter.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "benchmarks" / "plans"
PLANS_MD = ROOT / "benchmarks" / "PLANS.md"
TOPOLOGIES = ("h100-8", "v5p-16", "v6e-32", "v5p-8", "v6e-16", "h200-8", "cpu:8")
RECIPES = ("grpo:7b", "sft:7b", "grpo:3b", "sft:3b")
# Extra rows: the chunked log-prob pass against (nearly) unchunked logits at one sequence bucket, and the
# sampler's weight copy in float32 (the default before `rollout.sampler_param_dtype`) against bf16.
EXTRA = {
    "grpo:7b:h100-8:chunk12288": ["--config.model.logprob_chunk=12288"],
    "grpo:7b:h100-8:sampler_f32": ["--config.rollout.sampler_param_dtype=float32"],
}
GIB = 2**30


# SFT's recipe batch (16 samples, 2 micro-batches of 8) cannot split over 16 or 32 devices: those plans
# use the smallest batch that does, one sample per device per micro-batch (stated in PLANS.md).
OVERRIDES = {
    f"sft:{v}:{t}": [f"--config.sft.batch_size={b}", f"--config.sft.micro_batches={m}"]
    for v in ("3b", "7b")
    for t, b, m in (("v6e-16", 32, 2), ("v6e-32", 32, 1))
}
# 7B GRPO: one sample per device per micro-batch (32 micro-batches of 8; the step's 256 samples and its
# update are unchanged): at the recipe's 8 micro-batches of 32 a device holds 4 samples of 65,536 patch rows
# through the trained vision tower (v5p-16 grads 92 GiB before the sampler's copy). On the 80 GB H100 the
# sampler's bf16 weight copy (15.4 GiB replicated) is also split over 2 devices. The sampler decodes 64
# episodes per call instead of the recipe's 128 (`rollout.batch_size`): at 128 its prefill (128 prompts of
# 12,288 tokens, every slot's KV cache) did not fit either target. Other 7B GRPO rows: not yet planned with
# these choices.
GRPO_FIT = ["--config.grpo.micro_batches=32", "--config.rollout.batch_size=64"]
OVERRIDES["grpo:7b:v5p-16"] = GRPO_FIT
# On h100-8 the sampler's copy over 4 devices: over 2 (7.7 GiB per device) the gradient program's total is
# 60.0 of 59.3 GiB once the Adam moments it leaves out are counted (2026-12-04).
OVERRIDES["grpo:7b:h100-8"] = GRPO_FIT + ["--config.mesh.rollout_tensor=4"]
# Whether one setting serves both 7B targets (h100-8 needed the sampler's copy over 2 devices before the
# moments were counted), and whether the 7B levers make 3B GRPO fit one H100 node (at the recipe's settings
# it does not).
EXTRA["grpo:7b:v5p-16:rollout_tensor2"] = GRPO_FIT + ["--config.mesh.rollout_tensor=2"]
EXTRA["grpo:3b:h100-8:mb32_rb64"] = GRPO_FIT
# The 141 GB H200 at the recipe's settings does not fit either (grads 135.5 GiB): the same levers, no
# `rollout_tensor` (its budget holds the replicated 15.4 GiB copy).
EXTRA["grpo:7b:h200-8:mb32_rb64"] = GRPO_FIT
# v6e-32 (32 GB chips) at the recipe's settings: one sample per chip already, but the sampler's replicated
# 15.4 GiB bf16 copy sits beside every program; split over 4 chips, with 64 sampler slots.
EXTRA["grpo:7b:v6e-32:rt4_rb64"] = ["--config.mesh.rollout_tensor=4", "--config.rollout.batch_size=64"]
# v5p-8 (4 chips) refuses the recipe's gradient program (155.6 GB of temporaries: 8 samples per chip): one
# sample per chip (64 micro-batches of 4, the same 256-sample update) and 32 sampler slots (8 per chip).
EXTRA["grpo:7b:v5p-8:mb64_rb32"] = ["--config.grpo.micro_batches=64", "--config.rollout.batch_size=32"]
# v6e-16 (16 chips of 32 GB): one sample per chip per micro-batch (16 micro-batches of 16, the same 256-sample
# update), the sampler's copy over 4 chips and 32 slots (8 prompts per data shard, as on v6e-32).
EXTRA["grpo:7b:v6e-16:mb16_rt4_rb32"] = [
    "--config.grpo.micro_batches=16",
    "--config.mesh.rollout_tensor=4",
    "--config.rollout.batch_size=32",
]
# What full remat costs in FLOPs where memory allows saving the matmul outputs ("dots": the backward
# recomputes only element-wise work): 7B SFT, which peaks far under the H100 and v5p budgets with full remat.
# GRPO's vision rows (65,536 patch rows per sample) do not fit "dots" in the tower; the decoder's dots with
# the tower's full remat (`model.vision_remat`) do where the chip has the memory.
EXTRA["grpo:7b:h200-8:mb32_rb64_dots"] = GRPO_FIT + [
    "--config.model.remat=dots",
    "--config.model.vision_remat=full",
]
EXTRA["grpo:7b:v5p-16:dots"] = GRPO_FIT + ["--config.model.remat=dots", "--config.model.vision_remat=full"]
# And the attention kernels' forward outputs (cuDNN / splash): the backward does not run them again.
EXTRA["grpo:7b:h200-8:mb32_rb64_dots_attention"] = GRPO_FIT + [
    "--config.model.remat=dots_attention",
    "--config.model.vision_remat=full",
]
EXTRA["grpo:7b:v5p-16:dots_attention"] = GRPO_FIT + [
    "--config.model.remat=dots_attention",
    "--config.model.vision_remat=full",
]
# And splash's fused backward kernel (5 matmuls per tile instead of 7).
EXTRA["grpo:7b:v5p-16:dots_attention_fused"] = EXTRA["grpo:7b:v5p-16:dots_attention"] + [
    "--config.model.attention=splash_fused"
]
# With the Adam moments counted the last row is 89.7 of 85.5 GiB: the sampler's copy over 2 chips too.
EXTRA["grpo:7b:v5p-16:dots_attention_fused_rt2"] = EXTRA["grpo:7b:v5p-16:dots_attention_fused"] + [
    "--config.mesh.rollout_tensor=2"
]
# The H100's 80 GB has no room for the decoder's dots beside one 12,288-token sample (grads 64.8 of 59.3
# GiB): the same residuals kept in host memory instead ("offload_*", moved over PCIe and back each layer).
EXTRA["grpo:7b:h100-8:offload_dots_attention"] = OVERRIDES["grpo:7b:h100-8"] + [
    "--config.model.remat=offload_dots_attention",
    "--config.model.vision_remat=full",
]
# And the tower's matmul outputs too (65,536 patch rows per sample: far past HBM, within the host's share).
EXTRA["grpo:7b:h100-8:offload_all"] = GRPO_FIT + [
    "--config.mesh.rollout_tensor=2",
    "--config.model.remat=offload_dots_attention",
    "--config.model.vision_remat=offload_dots",
]
# v6e-32's 32 GB chips: the same offload for 7B GRPO (full remat: 1.60x at 25.0 of 28.8 GiB), and 7B SFT,
# which peaks at 7.5 GiB there with full remat, keeping its residuals on the chip.
EXTRA["sft:7b:h100-8:dots"] = ["--config.model.remat=dots"]
EXTRA["sft:7b:v5p-16:dots"] = ["--config.model.remat=dots"]


def python_for(topology: str) -> str:
    if topology.startswith(("h100", "h200")):
        return os.environ.get("PLAN_GPU_PYTHON", "/work/venv-gpu/bin/python")
    if topology.startswith("cpu"):
        return sys.executable
    return os.environ.get("PLAN_TPU_PYTHON", "/work/venv-tpu/bin/python")


def key_path(key: str) -> pathlib.Path:
    return OUT_DIR / (key.replace(":", "_") + ".json")


def split_key(key: str) -> tuple[str, str, str]:
    """(mode, variant, topology) of a plan key `mode:variant:topology[:name]`; `cpu:N` keeps its count."""
    parts = key.split(":")
    topology = ":".join(parts[2:4]) if parts[2] == "cpu" else parts[2]
    return parts[0], parts[1], topology


def run_one(key: str, extra: list[str], timeout: float) -> None:
    mode, variant, topology = split_key(key)
    out = key_path(key)
    cmd = [python_for(topology), "-m", "pixel_reasoner_jax.plan", f"--config=configs/{mode}.py:{variant}"]
    cmd += [f"--topology={topology}", f"--out={out}", *extra]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        err = "" if proc.returncode in (0, 1) and out.exists() else proc.stderr[-2000:] or "no plan written"
    except subprocess.TimeoutExpired:
        err = f"timed out after {timeout:.0f} s"
    log = {"key": key, "cmd": " ".join(cmd[1:]), "wall_s": round(time.time() - t0), "error": err}
    if err:
        out.with_suffix(".err.json").write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    print(f"{key}: {'error' if err else 'ok'} in {log['wall_s']} s", flush=True)


# Plans compiled before this date predate the per-sample vision tower and the slot sampler (their JSON has
# no `planned_on`): the table keeps them, marked stale.
CURRENT_SINCE = "2026-12-02"


def overrides(key: str) -> list[str]:
    """The command-line overrides a plan runs with (shown in its row, so a user can reproduce it)."""
    return EXTRA.get(key, OVERRIDES.get(key, []))


def _row(key: str) -> str:
    path = key_path(key)
    if not path.exists():
        err = path.with_suffix(".err.json")
        why = (
            json.loads(err.read_text())["error"].strip().splitlines()[-1][:160] if err.exists() else "not run"
        )
        return f"| {key} | — | — | — | — | — | — | {why} |"
    p = json.loads(path.read_text())
    s, progs = p["shapes"], p["programs"]
    parts = []
    for name in ("grads", "update", "logprobs", "prefill", "decode"):
        if name in progs:
            q = progs[name]
            size = q.get("total_bytes", q.get("temp_bytes", 0))
            host = f" + host {q['host_bytes'] / GIB:.1f}" if q.get("host_bytes") else ""
            parts.append(
                f"{name} {'temp ' if 'error' in q else ''}{size / GIB:.1f}{' (refused)' if 'error' in q else ''}"
                f"{host}"
            )
    g = progs["grads"]
    ratio = f"{g['flops'] / g['model_flops']:.2f}" if "flops" in g else "—"
    if "flops" in g and s["patches"] and "vision_full_attention" not in p:
        ratio += " †"  # compiled before the tower's full attention ran in image slots
    remat = p["remat"] + (f" (vision {p['vision_remat']})" if p.get("vision_remat", "same") != "same" else "")
    mesh = "x".join(f"{k}{v}" for k, v in p["mesh"].items() if v > 1) or "1"
    worst = max(v.get("total_bytes", v.get("temp_bytes", 0)) for v in progs.values())
    stale = p.get("planned_on", "") < CURRENT_SINCE
    flags = "" if stale else " ".join(f"`{o.removeprefix('--config.')}`" for o in overrides(key))
    verdict = "**fits**" if p["fits"] else "does not fit"
    if stale:
        verdict = f"stale: {'fit' if p['fits'] else 'did not fit'} (compiled before {CURRENT_SINCE})"
    return (
        f"| {key}{' ' + flags if flags else ''} | {s['n_micro']}x{s['batch']}x{s['seq']} | {remat}, {p['attention']}"
        f"{', sampler ' + p['sampler_param_dtype'] if p.get('sampler_param_dtype') else ''}"
        f", pixels {p.get('pixel_dtype', 'float32')} | {mesh} | "
        f"{worst / GIB:.1f} / {p['budget_per_device_bytes'] / GIB:.1f} ({p['memory_per_device_bytes'] / GIB:.0f}) | "
        f"{'; '.join(parts)} | {ratio} | {verdict} |"
    )


def write_table(keys: list[str]) -> None:
    head = [
        "| plan | micro x batch x seq | remat, attention, sampler weights, train pixels | train mesh | worst total / budget (HBM) GiB | "
        "per program total GiB | grads FLOPs / 6NT | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    body = "\n".join(head + [_row(k) for k in keys])
    intro_path = ROOT / "benchmarks" / "PLANS_intro.md"
    intro = intro_path.read_text(encoding="utf-8") if intro_path.exists() else ""
    PLANS_MD.write_text(intro.replace("{{TABLE}}", body) if "{{TABLE}}" in intro else body + "\n")


def unused_state_of(key: str) -> int:
    """Per-device bytes of the optimizer state, step count and key of plan `key`'s config on its device count
    (what its gradient and log-prob programs leave out: `programs.recount_unused_state`); no compile. Runs
    in a process of its own with that many host devices."""
    devices = json.loads(key_path(key).read_text())["devices"]
    code = "import sys; from benchmarks.plans import _print_unused_state; _print_unused_state(sys.argv[1:])"
    mode, variant, _ = split_key(key)
    argv = [f"--config=configs/{mode}.py:{variant}", *overrides(key)]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = subprocess.run(
        [sys.executable, "-c", code, str(devices), *argv], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"{key}: {out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def _print_unused_state(args: list[str]) -> None:
    import jax
    from absl import flags
    from ml_collections import config_flags

    from pixel_reasoner_jax.config import from_config_dict
    from pixel_reasoner_jax.plan import programs
    from pixel_reasoner_jax.plan import topology as tp

    config_flags.DEFINE_config_file("config", None, "run config")
    flags.FLAGS(["plans", *args[1:]])
    n = int(args[0])
    target = programs.Target(tp.parse_topology(f"cpu:{n}"), jax.devices("cpu")[:n])
    a = programs.train_setup(from_config_dict(flags.FLAGS.config), target).abstract
    print(programs.per_device_bytes((a.opt_state, a.step, a.rng)))


def recount(keys: list[str]) -> None:
    """Older plans (compiled before `unused_state_bytes`): the optimizer state added where it was left out."""
    from pixel_reasoner_jax.plan.programs import recount_unused_state

    for key in keys:
        path = key_path(key)
        if not path.exists():
            continue
        plan = json.loads(path.read_text())
        if plan.get("unused_state_recounted") or "unused_state_bytes" in plan["programs"].get("grads", {}):
            continue
        idle = unused_state_of(key)
        path.write_text(json.dumps(recount_unused_state(plan, idle), indent=1) + "\n", encoding="utf-8")
        print(f"{key}: + {idle / GIB:.2f} GiB per device in grads/logprobs; fits {plan['fits']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated mode:variant:topology keys")
    ap.add_argument("--force", action="store_true", help="recompile plans that already have a JSON")
    ap.add_argument("--table", action="store_true", help="only rewrite PLANS.md")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per plan")
    ap.add_argument(
        "--recount", action="store_true", help="recount older plans' left-out state, then PLANS.md"
    )
    args = ap.parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    keys = [f"{r}:{t}" for r in RECIPES for t in TOPOLOGIES] + list(EXTRA)
    if args.recount:
        recount(keys)
    elif not args.table:
        todo = [k for k in keys if not args.only or k in args.only.split(",")]
        for key in todo:
            if args.force or not key_path(key).exists():
                run_one(key, overrides(key), args.timeout)
    write_table(keys)


if __name__ == "__main__":
    main()
