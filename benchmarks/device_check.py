"""Measured on the accelerator, beside the plan: a recipe's optimizer step (seconds, MFU, peak memory) and the
in-process sampler's generate (decode tokens/s, peak memory) at the real 3B / 7B sizes, random weights.

The step runs the very programs `python -m pixel_reasoner_jax.plan` compiles (`plan.programs.train_setup`)
at the plan's shapes; the sampler generates the plan's rollout batch (`rollout.batch_size` prompts of one
image each, filling the prompt bucket, `rollout.max_new_tokens` new tokens, no stop ids, the recipe's
sampling). One measurement per process: device memory's peak counts from the process start.

    python benchmarks/device_check.py --what=step --config=configs/sft.py:7b [--config.<key>=<value> ...] \\
        --out=step.json [--plan=plan.json]
    python benchmarks/device_check.py --what=decode --config=configs/grpo.py:7b ... --out=decode.json
    python benchmarks/device_check.py --table step.json decode.json ...   # the side-by-side table
    python benchmarks/device_check.py --plan=plan.json --attach step.json    # a plan made later, beside it

`--plan` is the plan of the same config and overrides for this machine's topology (e.g. `h200-1`), made
anywhere (a CPU host compiles for the GPU: README "Plan before you rent"); its prediction goes beside the
measurement in the JSON and the table: peak memory measured / predicted, and compiled FLOPs per second.
"""

import json
import os
import pathlib
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

GIB = 2**30
# Dense bf16 matrix FLOP/s per JAX device from the vendors' datasheets (no sparsity): what MFU divides by.
PEAK_BF16 = {
    "H100": 989.4e12,
    "H200": 989.4e12,
    "TPU v4": 275e12 / 2,  # per TensorCore (v4 without megacore shows two devices per chip)
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "run config file[:variant], e.g. configs/sft.py:7b")
    flags.DEFINE_enum(
        "what", "step", ["step", "logprobs", "decode"], "the optimizer step, the log-prob pass or generate"
    )
    flags.DEFINE_integer("repeats", 3, "timed runs after the first (compiling) one")
    flags.DEFINE_string("out", None, "write the measurement as JSON here")
    flags.DEFINE_string("plan", None, "the plan JSON of the same config for this machine's topology")
    flags.DEFINE_string("topology", None, "this machine as the planner names it (default: from the devices)")
    flags.DEFINE_bool("table", False, "print the table of the JSON files given as arguments and exit")
    flags.DEFINE_bool("attach", False, "put --plan beside the measurement JSON files given as arguments")


def local_topology(devices) -> str:
    """The planner's name of this machine's devices: h100-N / h200-N, cpu:N (TPU: pass --topology)."""
    kind, n = devices[0].device_kind, len(devices)
    for gpu in ("H100", "H200"):
        if gpu in kind:
            return f"{gpu.lower()}-{n}"
    if devices[0].platform == "cpu":
        return f"cpu:{n}"
    raise SystemExit(f"device_check: name this machine's topology with --topology ({kind!r}, {n} devices)")


def peak_flops(device) -> float | None:
    kind = device.device_kind
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def memory_stats(device) -> dict[str, int]:
    """The allocator's peak and limit (bytes), where the backend reports them (GPU, TPU; not CPU)."""
    stats = device.memory_stats() or {}
    return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit") if k in stats}


def micro_arrays(mcfg, shapes, max_px: int, seed: int = 0) -> dict:
    """A stacked micro batch (`plan.programs.micro_structs`'s keys, shapes and dtypes) with values a real
    batch could hold: random text ids with each sample's image pads (as many as its merged vision rows),
    the targets shifted by one, every position trained, random pixels."""
    import jax
    import numpy as np

    from pixel_reasoner_jax.plan import programs

    structs = programs.micro_structs(mcfg, shapes, max_px, media=False)
    rng = np.random.default_rng(seed)
    n, b, t = structs["input_ids"].shape
    ids = rng.integers(100, mcfg.text.vocab_size, (n, b, t)).astype(np.int32)
    out = {}
    if shapes.patches:
        vi = programs.vision_layout(mcfg, shapes.patches, max_px, prompt=False)
        ids[..., 1 : 1 + int(vi.num_merged)] = mcfg.image_token_id
        out["vision_inputs"] = jax.tree.map(lambda x: np.broadcast_to(x, (n, b, *np.shape(x))).copy(), vi)
        pixels = rng.standard_normal((n, b, shapes.patches, mcfg.vision.patch_dim), dtype=np.float32)
        out["pixel_values"] = pixels
    trained = (ids != mcfg.image_token_id).astype(np.float32)
    for key, s in structs.items():
        if key == "input_ids":
            value = ids
        elif key == "targets":
            value = np.roll(ids, -1, axis=-1)
        elif key in ("attention_mask", "loss_valid", "temperatures"):
            value = np.ones(s.shape, s.dtype)
        elif key == "loss_mask":
            value = trained
        elif key == "positions":
            value = np.broadcast_to(np.arange(t, dtype=np.int32), s.shape).copy()
        elif key == "loss_index":
            value = np.broadcast_to(np.arange(s.shape[-1], dtype=np.int32), s.shape).copy()
        elif key == "old_current":
            value = np.zeros(s.shape, s.dtype)
        elif key == "advantages":
            value = rng.standard_normal(s.shape).astype(s.dtype)
        else:  # log-probs: sampler, old, reference
            value = -rng.uniform(0.0, 3.0, s.shape).astype(s.dtype)
        out[key] = value
    return out


def measure_step(cfg, target, repeats: int, forward_only: bool = False) -> dict:
    """The optimizer step (gradient program over every micro-batch, then the update) at the plan's shapes;
    `forward_only`: GRPO's old log-prob pass (the plan's `logprobs` program) over the same batch."""
    import jax
    from flax import nnx

    from pixel_reasoner_jax.models.qwen25vl import Qwen25VL
    from pixel_reasoner_jax.plan import programs
    from pixel_reasoner_jax.train import state as st

    ts = programs.train_setup(cfg, target)
    t0 = time.perf_counter()
    state = st.random_train_state(
        lambda: Qwen25VL(ts.mcfg, rngs=nnx.Rngs(cfg.seed), **ts.model_kwargs),
        ts.optimizer,
        ts.shardings,
        ts.mesh,
        seed=cfg.seed,
    )
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    max_px = programs.largest_image_pixels(cfg)
    micro = micro_arrays(ts.mcfg, ts.shapes, max_px, cfg.seed)
    step = ts.fns.sft_step if cfg.mode == "sft" else ts.fns.grpo_step
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        if forward_only:
            out = jax.block_until_ready(ts.fns.logprobs(state.params, micro))
            note = f"mean log-prob {float(out.mean()):.3f}"
        else:
            state, metrics = step(state, micro)
            jax.block_until_ready((state, metrics))
            note = f"loss {float(metrics['loss']):.3f}"
        times.append(time.perf_counter() - t0)
        print(f"{'forward' if forward_only else 'step'} {i}: {times[-1]:.2f} s, {note}", flush=True)
    model_flops, n_text, n_vision = programs.step_model_flops(cfg, ts.abstract.params, ts.shapes)
    if forward_only:
        model_flops //= 3  # 2·N·T of the forward (the plan's logprobs model FLOPs)
    return {
        "init_s": round(init_s, 1),
        "first_s": round(times[0], 2),
        "step_s": statistics.median(times[1:]),
        "step_s_all": [round(x, 4) for x in times[1:]],
        "model_flops": model_flops / len(target.devices),
        "params": {"text_matmul": n_text, "vision": n_vision},
        "tokens_per_step": ts.shapes.n_micro * ts.shapes.batch * ts.shapes.seq,
        "shapes": dict(vars(ts.shapes)),
        "attention": ts.model_kwargs["attention"],
        "remat": cfg.model.remat,
        "state_bytes_per_device": programs.per_device_bytes(state),
    }


class _Timed:
    """A jitted sampler program wrapped to add its device time (it blocks until done) to `totals[name]`."""

    def __init__(self, fn, name: str, totals: dict):
        self.fn, self.name, self.totals = fn, name, totals

    def __call__(self, *args, **kwargs):
        import jax

        t0 = time.perf_counter()
        out = jax.block_until_ready(self.fn(*args, **kwargs))
        self.totals[self.name] = self.totals.get(self.name, 0.0) + time.perf_counter() - t0
        return out

    def __getattr__(self, name):  # _cache_size and the AOT entry points pass through
        return getattr(self.fn, name)


def measure_decode(cfg, target, repeats: int) -> dict:
    """`JaxSampler.generate` of the plan's rollout batch: every prompt one image and random text filling the
    prompt bucket, `rollout.max_new_tokens` new tokens each (no stop ids), the recipe's sampling."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from sampler import make_requests

    from pixel_reasoner_jax import sharding
    from pixel_reasoner_jax.config import rollout_mesh_shape
    from pixel_reasoner_jax.models.qwen25vl import Qwen25VL
    from pixel_reasoner_jax.plan import flops as fl
    from pixel_reasoner_jax.plan import programs
    from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
    from pixel_reasoner_jax.rollout.policy import SamplingParams
    from pixel_reasoner_jax.rollout.sampler import JaxSampler

    mcfg, shapes = programs.model_config(cfg), programs.recipe_shapes(cfg)
    r = cfg.rollout
    data, tensor = rollout_mesh_shape(cfg.mesh, len(target.devices))
    rmesh = sharding.make_mesh(data, 1, tensor, devices=target.devices)
    kw = dict(programs.model_kwargs(cfg, target), param_dtype=jnp.dtype(r.sampler_param_dtype))
    t0 = time.perf_counter()
    with sharding.use_mesh(rmesh, "rollout"):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen25VL(mcfg, rngs=nnx.Rngs(0), **kw)))
        placement = sharding.state_shardings(abstract, rmesh, "rollout")
        weights = jax.jit(
            lambda: nnx.split(Qwen25VL(mcfg, rngs=nnx.Rngs(cfg.seed), **kw))[1], out_shardings=placement
        )()
    model = nnx.merge(graphdef, jax.block_until_ready(weights))
    init_s = time.perf_counter() - t0
    # One square image per prompt of the plan's patch rows per prompt, text filling the prompt bucket.
    rows, new = shapes.rollout_rows, r.max_new_tokens
    patches = programs.prefill_patches(cfg.data.patch_buckets, rows, data)
    side = int(patches**0.5) // 2 * 2 * 14
    image_tokens = (side // 28) ** 2
    text = shapes.prompt - image_tokens - 2 - 16
    sampling = SamplingParams(new, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
    requests = make_requests(mcfg, rows, new, side, text, seed=cfg.seed, sampling=sampling)
    image_cfg = ImageProcessorConfig(r.model_min_pixels, r.model_max_pixels)
    sampler = JaxSampler(
        model, mcfg, image_cfg, max_batch=rows, seq_buckets=cfg.data.seq_buckets,
        patch_buckets=cfg.data.patch_buckets, decode_bucket=r.decode_bucket, mesh=rmesh,
    )  # fmt: skip
    totals: dict[str, float] = {}
    sampler._prefill = _Timed(sampler._prefill, "prefill", totals)
    sampler._decode = _Timed(sampler._decode, "decode", totals)
    runs = []
    for i in range(repeats + 1):
        totals.clear()
        t0 = time.perf_counter()
        results = sampler.generate(requests)
        wall = time.perf_counter() - t0
        produced = sum(len(x.output_ids) for x in results)
        runs.append({"wall_s": wall, "tokens": produced, **totals})
        print(f"generate {i}: {wall:.2f} s, {produced} tokens, {totals}", flush=True)
    timed = runs[1:]
    n_text = fl.count_params(nnx.state(model, nnx.Param), skip=("visual", "embed_tokens"))
    decode_s = statistics.median(x["decode"] for x in timed)
    generate_s = statistics.median(x["wall_s"] for x in timed)
    return {
        "init_s": round(init_s, 1),
        "first_s": round(runs[0]["wall_s"], 2),
        "rows": rows,
        "prompt_tokens": len(requests[0].input_ids) - 1 + image_tokens,
        "image_side": side,
        "new_tokens": new,
        "generate_s": generate_s,
        "prefill_s": statistics.median(x["prefill"] for x in timed),
        "decode_s": decode_s,
        "tokens": timed[0]["tokens"],
        "decode_tokens_per_s": timed[0]["tokens"] / decode_s,
        "generate_tokens_per_s": timed[0]["tokens"] / generate_s,
        # Bytes the decode must read per step at least: the weights once (the KV cache comes on top).
        "weight_bytes": programs.per_device_bytes(nnx.state(model, nnx.Param)),
        "text_matmul_params": n_text,
        "attention": kw["attention"],
        "sampler_param_dtype": r.sampler_param_dtype,
        "compiled": sampler.compile_counts,
        "runs": runs,
    }


def with_plan(result: dict, plan: dict) -> dict:
    """The plan's prediction of the measured programs, beside the measurement. `device_bytes`: what the
    process holds while a program runs, as planned: the program's peak and the train state it does not take
    (`unused_state_bytes`; the step's entry has it in its peak). The sampler's programs run here without a
    train state beside them: their peak alone."""
    progs = plan["programs"]
    names = {"step": ("grads", "update", "step"), "logprobs": ("logprobs",), "decode": ("prefill", "decode")}
    names = [k for k in names[result["what"]] if k in progs]
    fields = ("peak_bytes", "unused_state_bytes", "flops", "model_flops", "fits")
    pred = {k: {f: progs[k][f] for f in fields if f in progs[k]} for k in names}
    for p in pred.values():
        if "peak_bytes" in p:
            p["device_bytes"] = p["peak_bytes"] + p.get("unused_state_bytes", 0)
    result["plan"] = {"topology": plan["topology"], "jax": plan.get("jax"), "programs": pred}
    result.pop("peak_measured_over_planned", None)
    peak = result["memory"].get("peak_bytes_in_use")
    key = _planned_key(result["what"], pred)
    if peak and pred.get(key, {}).get("device_bytes"):
        result["peak_measured_over_planned"] = peak / pred[key]["device_bytes"]
    if result["what"] != "decode" and pred.get(key, {}).get("flops"):
        result["compiled_flops_per_s"] = pred[key]["flops"] / result["step_s"]
    return result


def _planned_key(what: str, programs: dict) -> str:
    """The planned program a measurement's peak compares with (the sampler's: the larger of its two)."""
    if what == "decode":
        return max(programs, key=lambda k: programs[k].get("device_bytes") or 0)
    return "step" if what == "step" else "logprobs"


def table(results: list[dict]) -> str:
    head = (
        f"{'what':<26}{'device':<14}{'shapes':<22}{'time s':>8}{'MFU':>7}{'tok/s':>9}"
        f"{'peak GiB':>10}{'planned':>9}{'ratio':>7}"
    )
    rows = [head]
    for r in results:
        planned = ""
        if "plan" in r:
            progs = r["plan"]["programs"]
            planned = f"{progs[_planned_key(r['what'], progs)].get('device_bytes', 0) / GIB:9.1f}"
        ratio = f"{r['peak_measured_over_planned']:7.2f}" if "peak_measured_over_planned" in r else ""
        peak = r["memory"].get("peak_bytes_in_use", 0) / GIB
        what = f"{r['mode']}:{r['variant']} {r['what']}"
        if r["what"] != "decode":
            s = r["shapes"]
            shapes = f"{s['n_micro']}x{s['batch']}x{s['seq']} +{s['patches']}px"
            mfu = f"{r['mfu']:7.1%}" if r.get("mfu") is not None else " " * 7
            line = f"{what:<26}{r['device']:<14}{shapes:<22}{r['step_s']:8.2f}{mfu}{'':>9}"
        else:
            shapes = f"{r['rows']}x({r['prompt_tokens']}+{r['new_tokens']})"
            line = f"{what:<26}{r['device']:<14}{shapes:<22}{r['decode_s']:8.2f}{'':>7}"
            line += f"{r['decode_tokens_per_s']:9.0f}"
        rows.append(f"{line}{peak:10.1f}{planned:>9}{ratio:>7}")
    return "\n".join(rows)


def main(argv) -> int:
    if flags.FLAGS.table or flags.FLAGS.attach:
        paths = [pathlib.Path(p) for p in argv[1:]]
        results = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
        if flags.FLAGS.attach:
            plan = json.loads(pathlib.Path(flags.FLAGS.plan).read_text(encoding="utf-8"))
            results = [with_plan(r, plan) for r in results]
            for path, r in zip(paths, results):
                path.write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
        print(table(results))
        return 0
    import jax

    from pixel_reasoner_jax.config import from_config_dict
    from pixel_reasoner_jax.plan import programs
    from pixel_reasoner_jax.plan import topology as tp

    cfg = from_config_dict(flags.FLAGS.config)
    devices = jax.devices()
    name = flags.FLAGS.topology or local_topology(devices)
    target = programs.Target(tp.parse_topology(name), devices)
    print(f"{len(devices)} x {devices[0].device_kind} as {name}; jax {jax.__version__}", flush=True)
    what = flags.FLAGS.what
    measures = {
        "step": measure_step,
        "logprobs": lambda *a: measure_step(*a, forward_only=True),
        "decode": measure_decode,
    }
    result = {
        "what": what,
        "mode": cfg.mode,
        "variant": cfg.variant,
        "topology": name,
        "device": devices[0].device_kind,
        "devices": len(devices),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        **measures[what](cfg, target, flags.FLAGS.repeats),
        "memory": memory_stats(devices[0]),
    }
    peak = peak_flops(devices[0])
    if what != "decode" and peak:
        result["peak_flops_per_device"] = peak
        result["mfu"] = result["model_flops"] / result["step_s"] / peak
    if flags.FLAGS.plan:
        result = with_plan(result, json.loads(pathlib.Path(flags.FLAGS.plan).read_text(encoding="utf-8")))
    text = json.dumps(result, indent=1)
    if flags.FLAGS.out:
        pathlib.Path(flags.FLAGS.out).write_text(text + "\n", encoding="utf-8")
    print(table([result]))
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
