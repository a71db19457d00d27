"""Every program a recipe runs, compiled ahead of time at its real shapes for a target: per-device memory
(XLA's buffer assignment), FLOPs and whether it fits, from ShapeDtypeStructs only (no arrays, no devices).

Programs: the step's gradient and optimizer programs (`sft` or `grpo`), GRPO's old log-prob pass, and the
in-process sampler's prefill and decode at the rollout batch. Shapes are the largest the config admits.
"""

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.config import RunConfig, mesh_shape, rollout_mesh_shape
from pixel_reasoner_jax.models.config import PRESETS, ModelConfig
from pixel_reasoner_jax.models.layers import resolve_attention, resolve_weight_grad
from pixel_reasoner_jax.models.qwen25vl import Qwen25VL
from pixel_reasoner_jax.models.tiny import SIZES
from pixel_reasoner_jax.models.vision import pad_windows, prepare_vision
from pixel_reasoner_jax.plan import flops as fl
from pixel_reasoner_jax.plan.topology import HOST_OFFLOAD_SHARE, Topology, memory_per_device
from pixel_reasoner_jax.processing.batch import pick_bucket
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.sampler import JaxSampler
from pixel_reasoner_jax.rollout.sampler_inputs import PromptBatch, prompt_min_windows
from pixel_reasoner_jax.rollout.sampling import sampling_passes
from pixel_reasoner_jax.train import state as st
from pixel_reasoner_jax.train import steps
from pixel_reasoner_jax.train.run import _model_kwargs, optim_config

PIXELS_PER_PATCH = 14 * 14
MEDIA_KEYS = ("pixel_values", "vision_inputs")


def model_config(cfg: RunConfig) -> ModelConfig:
    """The architecture of a variant: the real 3B/7B sizes, or the tiny preset `model.tiny_size` names."""
    if cfg.variant == "tiny":
        return SIZES[cfg.model.tiny_size]
    return PRESETS[cfg.variant]


def _struct(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def vision_layout(mcfg: ModelConfig, patch_bucket: int, max_image_pixels: int, prompt: bool):
    """One sample's vision inputs (NumPy) filling the per-sample patch bucket (`processing.batch.pack_vision`'s
    layout): square images as large as `max_image_pixels` allows, the last one taking the remaining rows
    (the window and full-attention slot counts follow). `prompt`: the sampler's layout
    (`sampler_inputs.pack_prompts`): its floor on the window count, full attention in one slot of the whole
    bucket."""
    v = mcfg.vision
    side = int(math.isqrt(max(4, min(patch_bucket, max_image_pixels // PIXELS_PER_PATCH)))) // 2 * 2
    k, rest = divmod(patch_bucket, side * side)
    grids = [(1, side, side)] * k + ([(1, 2, rest // 2)] if rest else [])
    slots = dict(slot_len=patch_bucket, num_slots=1) if prompt else {}
    vi = prepare_vision(np.array(grids), v, patch_bucket=patch_bucket, **slots)
    if prompt:
        vi = pad_windows(vi, max(vi.window_gather.shape[0], prompt_min_windows(v, patch_bucket)))
    return vi


def vision_structs(mcfg: ModelConfig, batch: int, patch_bucket: int, max_image_pixels: int, prompt: bool):
    """(pixel_values (B, Pb, C), vision_inputs stacked on B) structs of `batch` samples laid out as
    `vision_layout`'s one."""
    vi = vision_layout(mcfg, patch_bucket, max_image_pixels, prompt)
    # Every sample alike: stack_vision of identical samples is the one sample with a leading B.
    return _struct((batch, patch_bucket, mcfg.vision.patch_dim), np.float32), jax.tree.map(
        lambda x: _struct((batch, *x.shape), x.dtype), vi
    )


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The largest shapes a recipe admits (what the plan compiles at).

    Attributes:
      n_micro, batch, seq: micro-batches per step, samples per micro-batch, sequence bucket.
      patches: patch rows per sample (the largest `data.patch_buckets`); 0 for text only.
      loss_positions: trained positions per row (`loss_index` width); the worst case, every position.
      rollout_rows, prompt, new_tokens: the sampler's batch, prompt bucket and decode length (grpo).
      prompt_patches: patch rows per prompt of the sampler's worst prefill call (`prefill_patches`).
    """

    n_micro: int
    batch: int
    seq: int
    patches: int
    loss_positions: int
    rollout_rows: int = 0
    prompt: int = 0
    new_tokens: int = 0
    prompt_patches: int = 0


def recipe_shapes(cfg: RunConfig) -> Shapes:
    d, r = cfg.data, cfg.rollout
    patches = max(d.patch_buckets) if d.patch_buckets else 0
    if cfg.mode == "sft":
        n, total = cfg.sft.micro_batches, cfg.sft.batch_size
        seq = pick_bucket(d.max_seq_len, d.seq_buckets) or max(d.seq_buckets)
        return Shapes(n, total // n, seq, patches, seq)
    n, total = cfg.grpo.micro_batches, cfg.grpo.train_batch_size
    seq = pick_bucket(r.max_total_tokens, d.seq_buckets) or max(d.seq_buckets)
    new = -(-r.max_new_tokens // r.decode_bucket) * r.decode_bucket
    return Shapes(n, total // n, seq, patches, seq, r.batch_size, seq, new)


def largest_image_pixels(cfg: RunConfig) -> int:
    """Pixels of the largest image a recipe's samples hold (the planned layout's image size). GRPO: query
    images are resized to at most `data.image_max_pixels`, crops to `rollout.crop_max_pixels`, frames to
    their caps, and the model's view (`rollout.model_*_pixels`) only shrinks above its max or grows below its
    min (rollout/episode.py). SFT: the SFT processor's cap."""
    d, r = cfg.data, cfg.rollout
    if cfg.mode != "grpo":
        return d.sft_image_max_pixels
    largest = max(d.image_max_pixels, r.crop_max_pixels, r.select_max_pixels, d.video_frame_max_pixels)
    return min(r.model_max_pixels, max(largest, r.model_min_pixels))


def prefill_patches(patch_buckets, rows: int, shards: int) -> int:
    """Patch rows per prompt of the sampler's most padded prefill call. The sampler admits prompts into a
    call while their patch rows fit the largest bucket together (`sampler._Run.take`) and pads each to the
    call's bucket (`pack_prompts`): `rows` prompts at the smallest bucket holding an equal share of the
    largest bucket per batch shard is the most patch rows (and token rows) a device gets."""
    top = max(patch_buckets)
    return pick_bucket(max(1, top * shards // rows), patch_buckets) or top


def micro_structs(mcfg: ModelConfig, s: Shapes, max_image_pixels: int, media: bool = True) -> dict[str, Any]:
    """A stacked micro pytree (`steps.stack`'s keys and dtypes) of ShapeDtypeStructs."""
    n, b, t, k = s.n_micro, s.batch, s.seq, s.loss_positions
    out = {key: _struct((n, b, t), np.int32) for key in ("input_ids", "targets", "attention_mask")}
    out.update(
        {
            key: _struct((n, b, t), np.float32)
            for key in ("loss_mask", "sampler_logprobs", "temperatures", "old_logprobs")
        }
    )
    out.update(
        positions=_struct((n, 3, b, t), np.int32),
        advantages=_struct((n, b), np.float32),
        old_current=_struct((n, b), np.float32),
        ref_logprobs=_struct((n, b, t), np.float32),
        loss_index=_struct((n, b, k), np.int32),
        loss_valid=_struct((n, b, k), np.bool_),
    )
    if media and s.patches:
        pv, vi = vision_structs(mcfg, b, s.patches, max_image_pixels, prompt=False)
        out["pixel_values"] = _struct((n, *pv.shape), pv.dtype)
        out["vision_inputs"] = jax.tree.map(lambda x: _struct((n, *x.shape), x.dtype), vi)
    return out


def prompt_structs(mcfg: ModelConfig, s: Shapes, max_image_pixels: int, media: bool = True) -> PromptBatch:
    """One prefill call of the rollout's rows (`sampler_inputs.pack_prompts`'s layout) as ShapeDtypeStructs."""
    k, t = s.rollout_rows, s.prompt
    pv = vi = None
    if media and s.prompt_patches:
        pv, vi = vision_structs(mcfg, k, s.prompt_patches, max_image_pixels, prompt=True)
    i32 = _struct((k, t), np.int32)
    return PromptBatch(i32, i32, _struct((3, k, t), np.int32), pv, vi)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs / arrays (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize  # typed PRNG keys have no NumPy dtype
    return total


def memory(compiled: jax.stages.Compiled, platform: str) -> dict[str, int]:
    """XLA's per-device buffer sizes; peak = the compiler's own figure on TPU/GPU, arguments + outputs -
    aliased + temporaries on CPU (whose reported peak covers the arguments only). `host_bytes`: the same
    sum in the device's host memory space (residuals a remat "offload_*" policy keeps on the host)."""
    m = compiled.memory_analysis()
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }
    summed = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    reported = int(getattr(m, "peak_memory_in_bytes", 0) or 0)
    out["peak_bytes"] = reported if platform != "cpu" and reported > 0 else summed
    host = [getattr(m, f"host_{k}_size_in_bytes", 0) or 0 for k in ("argument", "output", "alias", "temp")]
    out["host_bytes"] = int(host[0] + host[1] - host[2] + host[3])
    return out


@dataclasses.dataclass
class Target:
    """What the programs compile against: the parsed topology, its devices and memory per device."""

    topo: Topology
    devices: list

    @property
    def memory(self) -> int:
        return memory_per_device(self.topo, len(self.devices))

    @property
    def budget(self) -> int:
        return int(self.memory * (1.0 - self.topo.headroom))

    @property
    def host_budget(self) -> int:
        """Host bytes per device that offloaded residuals may use (cpu: none apart, they count in `budget`)."""
        host = self.topo.host_memory_per_chip * self.topo.chips // max(self.topo.chips, len(self.devices))
        return int(host * HOST_OFFLOAD_SHARE)

    def fits(self, total_bytes: int, host_bytes: int = 0) -> bool:
        """Device bytes within the budget and offloaded bytes within the host budget (a CPU device's
        memory is host memory: there both are in `total_bytes`)."""
        host_fits = self.topo.platform == "cpu" or host_bytes <= self.host_budget
        return total_bytes <= self.budget and host_fits


def model_kwargs(cfg: RunConfig, target: Target) -> dict[str, Any]:
    """The trainer's model keyword arguments (`train.run._model_kwargs`) with the attention kernel and the
    weight-gradient form resolved for the target's platform."""
    kw = _model_kwargs(cfg)
    return dict(
        kw,
        attention=resolve_attention(cfg.model.attention, kw["dtype"], target.topo.platform),
        weight_grad=resolve_weight_grad(cfg.model.weight_grad, target.topo.platform),
    )


def step_model_flops(cfg: RunConfig, params, shapes: Shapes) -> tuple[float, int, int]:
    """(6·N·T of one optimizer step, N of the decoder's matmuls, N of the vision tower): the decoder's
    parameters less the embedding over every token, the tower's over every patch row (2·N when frozen)."""
    n_text = fl.count_params(params, skip=("visual", "embed_tokens"))
    n_vision = fl.count_params(params) - fl.count_params(params, skip=("visual",))
    tokens = shapes.n_micro * shapes.batch * shapes.seq
    vision_rows = shapes.n_micro * shapes.batch * shapes.patches
    vision_factor = 2 if cfg.model.freeze_vision else 6
    return 6 * n_text * tokens + vision_factor * n_vision * vision_rows, n_text, n_vision


@dataclasses.dataclass
class TrainSetup:
    """What a recipe's training programs are built from on a target (`train_setup`): the architecture, the
    planned shapes, the model's keyword arguments, the train mesh, the abstract train state and its
    shardings, the optimizer (and which parameters it freezes) and the train functions."""

    mcfg: ModelConfig
    shapes: Shapes
    model_kwargs: dict[str, Any]
    mesh: Any
    optimizer: Any
    frozen: Any
    graphdef: Any
    abstract: Any
    shardings: Any
    fns: Any


def train_setup(cfg: RunConfig, target: Target, compiler_options=None, text_only=False) -> TrainSetup:
    """The training side of `plan_recipe` (one definition: `benchmarks/device_check.py` runs the very
    programs a plan compiles). Allocates nothing."""
    mcfg = model_config(cfg)
    shapes = recipe_shapes(cfg)
    if text_only:
        shapes = dataclasses.replace(shapes, patches=0)
    kw = model_kwargs(cfg, target)
    mesh = sharding.make_mesh(*mesh_shape(cfg.mesh, len(target.devices)), devices=target.devices)
    frozen = st.freeze_prefixes(st.VISION_TOWER) if cfg.model.freeze_vision else None
    ocfg = optim_config(cfg, 1000)
    optimizer = st.make_optimizer(ocfg, frozen)
    graphdef, abstract, shardings = st.abstract_train_state(
        lambda: Qwen25VL(mcfg, rngs=nnx.Rngs(0), **kw), optimizer, mesh, "train", seed=cfg.seed
    )
    grpo = None
    if cfg.mode == "grpo":
        grpo = steps.GRPOLossSettings.from_config(
            cfg.grpo, cfg.data.max_seq_len, temperature=cfg.rollout.temperature
        )
    fns = steps.make_train_fns(
        graphdef, optimizer, shardings, mesh, logprob_chunk=cfg.model.logprob_chunk, grpo=grpo,
        schedule=st.make_schedule(ocfg), frozen=frozen, buffers=abstract.buffers,
        compiler_options=compiler_options, pixel_dtype=cfg.model.dtype,
    )  # fmt: skip
    return TrainSetup(mcfg, shapes, kw, mesh, optimizer, frozen, graphdef, abstract, shardings, fns)


def unused_state_bytes(compiled: jax.stages.Compiled, passed_state, state_bytes: int) -> int:
    """Train-state bytes per device that stay allocated while `compiled` runs but are not among its
    arguments, which XLA's sizes hold: the state it is not passed (the log-prob pass takes the parameters
    and buffers only) and the leaves jit left out of it as unused (the gradient program drops Adam's
    moments, the step count and the key; a text-only batch the vision tower's weights too).
    `passed_state`: the state's part in the program's leading arguments, in order.

    Plans made before 2026-12-04 left these bytes out: on an H200 3B SFT's step peaked at 63.8 GiB where
    its plan said 48.5 (benchmarks/DEVICE.md). Reads jit's kept-argument set (JAX internals, checked by
    tests/test_plan.py)."""
    kept = compiled._executable._kept_var_idx
    leaves = jax.tree.leaves(passed_state)
    return state_bytes - sum(per_device_bytes(x) for i, x in enumerate(leaves) if i in kept)


def step_entry(g: dict, u: dict, sampler_weights: int, fits) -> dict:
    """The optimizer step's entry from its gradient (`g`) and update (`u`) programs' entries: between the
    two the state and the gradient accumulator are live, both `update`'s arguments, so each program's
    total already holds what the other leaves behind. `fits(total_bytes, host_bytes)`: `Target.fits`."""
    total = max(g["total_bytes"], u["total_bytes"])
    host = max(g.get("host_bytes", 0), u.get("host_bytes", 0))
    return {
        "peak_bytes": total - sampler_weights,
        "resident_bytes": sampler_weights,
        "total_bytes": total,
        "host_bytes": host,
        "flops": g["flops"] + u["flops"],
        "model_flops": g["model_flops"],
        "fits": fits(total, host),
    }


def recount_unused_state(plan: dict, idle: int) -> dict:
    """A plan JSON compiled before `unused_state_bytes` existed, with `idle` (the optimizer state, step
    count and key per device: what the gradient and log-prob programs of a batch with media leave out) added
    to those programs' resident and total bytes, and the step and verdicts recomputed. No recompile: the
    programs are the same, only the accounting changes."""
    budget, host_budget = plan["budget_per_device_bytes"], plan.get("host_budget_per_device_bytes")

    def fits(total, host):
        return total <= budget and (plan.get("platform") == "cpu" or not host or host <= host_budget)

    progs = plan["programs"]
    for name in ("grads", "logprobs"):
        p = progs.get(name)
        if p is not None and "peak_bytes" in p:
            p["resident_bytes"] += idle
            p["total_bytes"] += idle
            p["unused_state_bytes"] = idle
            p["fits"] = fits(p["total_bytes"], p.get("host_bytes", 0))  # older plans: no host memory
    if "peak_bytes" in progs["grads"] and "peak_bytes" in progs["update"]:
        progs["step"] = step_entry(
            progs["grads"], progs["update"], plan["sampler_weight_bytes_per_device"], fits
        )
    plan["fits"] = all(p["fits"] for p in progs.values())
    plan["unused_state_recounted"] = True
    return plan


def plan_recipe(
    cfg: RunConfig,
    target: Target,
    log=print,
    compiler_options: dict[str, Any] | None = None,
    text_only: bool = False,
) -> dict[str, Any]:
    """Compiles the recipe's programs for `target` one at a time and returns the plan (JSON-ready).

    Per program: argument/output/alias/temp/peak bytes per device, `resident_bytes` (buffers allocated
    beside the program's own: the sampler's weights during training, the train state during rollouts, and
    during the train programs the train state they do not take, `unused_state_bytes`),
    `flops` per device (jaxpr count over the devices: the vision tower runs per sample, split over the batch
    like the decoder; `vision_flops` is its global share), `xla_flops` (XLA's count, loop bodies once), `model_flops` (6·N·T, 2·N·T forward only)
    and `fits` (peak + resident within the memory less the headroom). `compiler_options` go to the train
    programs' jits (tests lower the CPU optimisation level; argument and output sizes do not change).
    `text_only` plans batches without images or videos (a text-only data set; the vision tower's weights
    stay in the state, its programs drop out).
    """
    n = len(target.devices)
    ts = train_setup(cfg, target, compiler_options=compiler_options, text_only=text_only)
    mcfg, shapes, kw, mesh = ts.mcfg, ts.shapes, ts.model_kwargs, ts.mesh
    abstract, fns = ts.abstract, ts.fns
    max_px = largest_image_pixels(cfg)
    micro = micro_structs(mcfg, shapes, max_px)
    text_micro = micro_structs(mcfg, shapes, max_px, media=False)

    def text(trace):
        """`trace()`: the program on a text-only batch, whose FLOPs less the vision tower's; None
        when the batch has no media (the program is its own text-only version)."""
        return trace() if shapes.patches else None

    step_model, n_text, n_vision = step_model_flops(cfg, abstract.params, shapes)

    jobs = []  # (name, traced, text-only traced or None, while trips, model flops, mesh, rules)
    step = fns.trace(cfg.mode, abstract, micro)
    step_text = text(lambda: fns.trace(cfg.mode, abstract, text_micro)["grads"])
    jobs.append(("grads", step["grads"], step_text, 1, step_model, mesh, "train"))
    jobs.append(("update", step["update"], None, 1, 0, mesh, "train"))
    sampler_weights = 0
    if cfg.mode == "grpo":
        lp = fns.trace("logprobs", abstract.params, micro)["logprobs"]
        lp_text = text(lambda: fns.trace("logprobs", abstract.params, text_micro)["logprobs"])
        jobs.append(("logprobs", lp, lp_text, 1, step_model // 3, mesh, "train"))
        if cfg.rollout.backend == "jax":
            data, tensor = rollout_mesh_shape(cfg.mesh, n)
            rmesh = sharding.make_mesh(data, 1, tensor, devices=target.devices)
            skw = dict(kw, param_dtype=jnp.dtype(cfg.rollout.sampler_param_dtype))  # train/policies.py
            with sharding.use_mesh(rmesh, "rollout"):
                model = nnx.eval_shape(lambda: Qwen25VL(mcfg, rngs=nnx.Rngs(0), **skw))
            image_cfg = ImageProcessorConfig(cfg.rollout.model_min_pixels, cfg.rollout.model_max_pixels)
            sampler = JaxSampler(
                model, mcfg, image_cfg, max_batch=shapes.rollout_rows, seq_buckets=cfg.data.seq_buckets,
                patch_buckets=cfg.data.patch_buckets, decode_bucket=cfg.rollout.decode_bucket, mesh=rmesh,
            )  # fmt: skip
            params = nnx.split(model, nnx.Param, ...)[1]
            sampler_weights = per_device_bytes(
                st.abstract_like(params, sharding.state_shardings(params, rmesh, "rollout"))
            )
            rows = shapes.rollout_rows
            if shapes.patches:
                shapes = dataclasses.replace(
                    shapes, prompt_patches=prefill_patches(cfg.data.patch_buckets, rows, data)
                )

            # The passes the run's requests need: the recipe's top-k 40 / top-p 0.95 draw among 64 candidates.
            r = cfg.rollout
            passes = sampling_passes([r.temperature, r.temperature_after_tool], [r.top_p] * 2, [r.top_k] * 2)

            def trace_sampler(media=True):
                prompts = prompt_structs(mcfg, shapes, max_px, media=media)
                return sampler.trace(prompts, rows, shapes.new_tokens, passes)

            progs = trace_sampler()
            prefill_text = text(lambda: trace_sampler(media=False)["prefill"])
            prefill_model = 2 * n_text * rows * shapes.prompt + 2 * n_vision * rows * shapes.prompt_patches
            jobs.append(("prefill", progs["prefill"], prefill_text, 1, prefill_model, rmesh, "rollout"))
            decode_model = 2 * n_text * rows * shapes.new_tokens
            jobs.append(
                ("decode", progs["decode"], None, shapes.new_tokens - 1, decode_model, rmesh, "rollout")
            )
    state_bytes = per_device_bytes(abstract)
    # The train state's part in each train program's leading arguments (`steps.make_train_fns`).
    state_args = {"grads": abstract, "update": abstract, "logprobs": (abstract.params, abstract.buffers)}

    programs = {}
    for name, traced, text_traced, trips, model_flops, pmesh, rules in jobs:
        t0 = time.perf_counter()
        try:
            with sharding.use_mesh(pmesh, rules):
                compiled = traced.lower().compile()
        except Exception as e:  # the TPU compiler refuses a program larger than HBM: that is the answer
            needed = re.search(r"required for HLO temporaries \(([\d.]+)G\)", str(e))
            if "RESOURCE_EXHAUSTED" not in str(e) and not needed:
                raise
            # The compiler's message lists the largest allocations (op, shape, size): kept for the why.
            detail = str(e)[:6000]
            programs[name] = {"fits": False, "error": str(e).splitlines()[0][:300], "error_detail": detail}
            if needed:
                programs[name]["temp_bytes"] = int(float(needed.group(1)) * 2**30)
            log(f"  {name}: does not compile within HBM: {programs[name]['error']}")
            continue
        entry = memory(compiled, target.topo.platform)
        total = fl.jaxpr_flops(traced.jaxpr, trips)
        vision = total - fl.jaxpr_flops(text_traced.jaxpr, trips) if text_traced is not None else 0.0
        unused = unused_state_bytes(compiled, state_args[name], state_bytes) if rules == "train" else 0
        resident = sampler_weights + unused if rules == "train" else state_bytes
        # A CPU device's memory is host memory: what it offloads stays in the same budget.
        on_host = entry["host_bytes"] if target.topo.platform == "cpu" else 0
        entry.update(
            unused_state_bytes=unused,
            resident_bytes=resident,
            total_bytes=entry["peak_bytes"] + resident + on_host,
            flops=total / n,
            flops_global=total,
            vision_flops=vision,
            xla_flops=fl.xla_flops(compiled),
            model_flops=model_flops / n,
            compile_s=round(time.perf_counter() - t0, 1),
        )
        entry["fits"] = target.fits(entry["total_bytes"], entry["host_bytes"])
        programs[name] = entry
        log(f"  {name}: peak {entry['peak_bytes'] / 2**30:.2f} GiB, compiled in {entry['compile_s']} s")
        del compiled
    g, u = programs["grads"], programs["update"]
    if "peak_bytes" in g and "peak_bytes" in u:
        programs["step"] = step_entry(g, u, sampler_weights, target.fits)
    return {
        "mode": cfg.mode,
        "variant": cfg.variant,
        "devices": n,
        "mesh": dict(zip(sharding.MESH_AXES, mesh_shape(cfg.mesh, n))),
        "attention": kw["attention"],
        "remat": cfg.model.remat,
        "vision_remat": cfg.model.vision_remat,
        # How the vision tower's full-attention layers were laid out (older plans: over the whole bucket).
        "vision_full_attention": "image slots",
        "logprob_chunk": cfg.model.logprob_chunk,
        "sampler_param_dtype": cfg.rollout.sampler_param_dtype if cfg.mode == "grpo" else None,
        "pixel_dtype": cfg.model.dtype,  # of the training programs' pixel_values (train/steps.cast_pixels)
        "shapes": dataclasses.asdict(shapes),
        "params": {"text_matmul": n_text, "vision": n_vision, "total": fl.count_params(abstract.params)},
        "state_bytes_per_device": state_bytes,
        "sampler_weight_bytes_per_device": sampler_weights,
        "programs": programs,
        "fits": all(p["fits"] for p in programs.values()),
    }
