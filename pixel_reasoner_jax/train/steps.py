"""Jitted, sharded training steps: micro-batch stacking, batch placement, the SFT and GRPO updates and
the no-grad log-probs used for old / reference policies.

One step = a gradient program (`lax.scan` over a leading micro-batch axis accumulating exact (sum,
denominator) gradients, `state.accumulate`) and an update program (one optimizer step; the state is
donated and keeps its shardings).
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.config import GRPOConfig
from pixel_reasoner_jax.models.config import VisionConfig
from pixel_reasoner_jax.models.qwen25vl import indexed_token_logprobs, token_logprobs
from pixel_reasoner_jax.models.vision import pad_slots, pad_windows, slot_length
from pixel_reasoner_jax.processing.batch import (
    Batch,
    Example,
    collate,
    pick_bucket,
    pixels_in,
    truncate_example,
)
from pixel_reasoner_jax.train import losses
from pixel_reasoner_jax.train import state as st

# Keys of a stacked micro-batch pytree whose second axis (after the micro axis) is the batch axis B.
_TOKEN_KEYS = (
    "input_ids", "targets", "attention_mask", "loss_mask", "sampler_logprobs", "temperatures", "old_logprobs"
)  # fmt: skip
_MEDIA_KEYS = ("pixel_values", "vision_inputs")


# ---------------------------------------------------------------------------------------------------------
# Host side: micro-batches with common buckets, stacked along a leading axis
# ---------------------------------------------------------------------------------------------------------


def _fit(ex: Example, limit: int | None, truncate: bool) -> tuple[Example, bool]:
    if limit is None or ex.length <= limit:
        return ex, False
    if not truncate:
        raise ValueError(
            f"sample {ex.qid!r} has {ex.length} tokens, more than the largest sequence bucket {limit}; "
            "pass truncate=True to cut it"
        )
    return truncate_example(ex, limit), True


def micro_batches(
    examples: Sequence[Example],
    n_micro: int,
    *,
    pad_id: int,
    vision_cfg: VisionConfig,
    seq_buckets: Sequence[int] | None,
    patch_buckets: Sequence[int] | None,
    truncate: bool = True,
) -> list[Batch]:
    """`n_micro` contiguous equal groups of `examples`, collated to ONE sequence, patch, window and slot
    bucket.

    Sharing the buckets makes the batches stackable (`stack`), so one compiled step body serves them all.
    Examples longer than the largest sequence bucket are cut by `truncate_example` (or raise without
    `truncate`) before the buckets are chosen, since a cut drops vision items and their patch rows.

    Raises:
      ValueError: `len(examples)` not a multiple of `n_micro`; a sequence too long without truncate; a
        sample with more patch rows than the largest patch bucket; some groups with vision items and some
        without.
    """
    if not isinstance(n_micro, int) or n_micro < 1:
        raise ValueError(f"n_micro must be an int >= 1, got {n_micro!r}")
    if not examples or len(examples) % n_micro:
        raise ValueError(
            f"{len(examples)} examples do not split into {n_micro} equal micro-batches "
            f"(len(examples) must be a positive multiple of n_micro)"
        )
    limit = None if seq_buckets is None else max(seq_buckets)
    fitted = [_fit(ex, limit, truncate) for ex in examples]
    exs = [ex for ex, _ in fitted]
    cut = np.array([c for _, c in fitted], bool)
    size = len(exs) // n_micro
    groups = [exs[i * size : (i + 1) * size] for i in range(n_micro)]

    t = pick_bucket(max(ex.length for ex in exs), seq_buckets)
    patches = [sum(ex.num_patches for ex in g) for g in groups]
    if any(patches) and not all(patches):
        raise ValueError(
            f"micro-batches must all have vision items or none (they stack into one array); patch rows per "
            f"micro-batch: {patches}"
        )
    # The per-sample patch bucket of the largest sample fits every group; when none does, collate's
    # pack_vision gets all the buckets and raises, naming the sample.
    pb = pick_bucket(max(ex.num_patches for ex in exs), patch_buckets)
    kw = dict(
        pad_id=pad_id, vision_cfg=vision_cfg, seq_buckets=(t,), patch_buckets=(pb,) if pb else patch_buckets
    )
    if pb:
        kw["slot_len"] = slot_length([ex.grid_thw for ex in exs], pb)
    out = [
        dataclasses.replace(collate(g, **kw), truncated=cut[i * size : (i + 1) * size])
        for i, g in enumerate(groups)
    ]
    if all(patches):
        # Window and slot counts depend on the grids; the largest group's (a bucket) fits every group.
        window = max(b.vision_inputs.window_gather.shape[-2] for b in out)
        slots = max(b.vision_inputs.slot_gather.shape[-2] for b in out)
        out = [
            dataclasses.replace(b, vision_inputs=pad_slots(pad_windows(b.vision_inputs, window), slots))
            for b in out
        ]
    return out


def stack(batches: Sequence[Batch], *, logprob_chunk: int, bucket_steps: int) -> dict[str, Any]:
    """NumPy pytree with a leading micro axis: the token arrays (n, B, T), positions (n, 3, B, T),
    advantages (n, B), ref_logprobs (n, B, T) zeros, and pixel_values (n, B, Pb, C) + vision_inputs (each
    (n, B, ...)) when the batches hold vision items (the keys are absent otherwise); `loss_index` /
    `loss_valid` list the trained positions at `loss_bucket(count, logprob_chunk, bucket_steps)`.

    Raises:
      ValueError: no batches; shapes that differ between batches (naming the field); vision items in some
        batches only.
    """
    if not batches:
        raise ValueError("stack needs at least one Batch, got none")
    has_media = [b.pixel_values is not None for b in batches]
    if any(has_media) and not all(has_media):
        raise ValueError(
            f"batches must all have vision items or none; has pixel_values per batch: {has_media}"
        )
    fields = _TOKEN_KEYS + ("positions", "advantages") + (_MEDIA_KEYS if all(has_media) else ())
    out: dict[str, Any] = {}
    for name in fields:
        values = [getattr(b, name) for b in batches]
        shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(values[0])]
        for i, v in enumerate(values[1:], 1):
            other = [tuple(np.shape(x)) for x in jax.tree.leaves(v)]
            if other != shapes:
                raise ValueError(
                    f"stack: field {name!r} of batch {i} has shapes {other}, batch 0 has {shapes}; collate "
                    "micro-batches to common buckets (steps.micro_batches)"
                )
        out[name] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *values)
    out["ref_logprobs"] = np.zeros_like(out["old_logprobs"])
    # 1 where a row's old log-probs are the step's own forward (on-policy: `old_logprobs` then unused).
    out["old_current"] = np.zeros_like(out["advantages"], dtype=np.float32)
    out["loss_index"], out["loss_valid"] = loss_index(out["loss_mask"], logprob_chunk, bucket_steps)
    return out


def loss_bucket(n: int, chunk: int, steps: int, min_bucket: int = 16) -> int:
    """Width K for `n` trained positions per row: the smallest of the buckets below that is >= n.

    Up to `chunk` (the log-prob pass's tokens per chunk) `steps` buckets per octave: with steps = 4,
    ..., 256, 320, 384, 448, 512, 640, ... (at most 25 % of the head's work on padding; steps = 1 is powers
    of two, up to 100 %). Past one chunk, multiples of `chunk`: the log-prob pass pads K to whole chunks, so
    any other width would buy nothing. More steps mean more distinct K, so more compiled step programs.
    """
    if chunk < 1 or steps < 1:
        raise ValueError(f"loss_bucket: chunk and steps must be >= 1, got {chunk}, {steps}")
    n = max(int(n), min_bucket)
    if n > chunk:
        return -(-n // chunk) * chunk
    top = pick_bucket(n, None)  # the power of two at or above n
    base = top // 2
    fits = [base + -(-base * i // steps) for i in range(1, steps + 1)]
    return min(chunk, min(b for b in fits if b >= n))


def loss_index(loss_mask: np.ndarray, chunk: int, bucket_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the positions of the trained targets, padded to a common width K (`loss_bucket`).

    Only these positions go through the (D x V) output projection: in vision-language data most tokens
    are image pads, prompt and tool observations, so projecting every position would spend most of the
    step's largest matmuls (and their gradients) on logits nobody trains.

    Args:
      loss_mask: (..., T) non-zero where the target is trained.
      chunk, bucket_steps: see `loss_bucket` (model.logprob_chunk, model.logprob_bucket_steps).

    Returns:
      index (..., K) int32 positions in T (0 in unused slots), valid (..., K) bool.
    """
    mask = np.asarray(loss_mask) != 0
    t = mask.shape[-1]
    counts = mask.sum(-1)
    k = min(t, loss_bucket(int(counts.max(initial=0)), chunk, bucket_steps))
    # A stable argsort of "not trained" puts the trained positions first, in order.
    order = np.argsort(~mask, axis=-1, kind="stable")[..., :k]
    valid = np.take_along_axis(mask, order, axis=-1)
    return np.where(valid, order, 0).astype(np.int32), valid


def _batch_axis(name: str) -> int:
    """Axis of B in a stacked micro pytree entry (every leaf of the per-sample media entries included)."""
    return {"positions": 2}.get(name, 1)


def batch_shardings(
    micro: dict[str, Any], mesh: Mesh, rules: sharding.Rules | str = "train"
) -> dict[str, Any]:
    """NamedSharding tree of a stacked micro pytree (NumPy, jax.Arrays or ShapeDtypeStructs): the batch axis
    over the rules' `act_batch` mesh axes ("data", "fsdp" for training), the per-sample vision rows and index
    arrays included, so each device encodes the images of its own sequences.

    Raises:
      ValueError: a missing token key, or a batch size that does not divide over the data-parallel devices.
    """
    missing = [k for k in _TOKEN_KEYS + ("positions", "advantages") if k not in micro]
    if missing:
        raise ValueError(f"shard_batch: micro is missing {missing} (build it with steps.stack)")
    batch_axes = sharding.logical_to_spec(("act_batch",), sharding.RULES.get(rules, rules))[0]
    names = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
    dp = int(np.prod([mesh.shape[a] for a in names if a is not None]))
    out = {}
    for key, value in micro.items():
        axis = _batch_axis(key)
        for leaf in jax.tree.leaves(value):
            b = np.shape(leaf)[axis]
            if b % dp:
                raise ValueError(
                    f"shard_batch: {key!r} has batch size {b}, which does not divide over the {dp} "
                    f"data-parallel devices (mesh axes {names})"
                )

        def spec(x, axis=axis):
            s = [None] * np.ndim(x)
            s[axis] = batch_axes
            return NamedSharding(mesh, P(*s))

        out[key] = jax.tree.map(spec, value)
    return out


def shard_batch(micro: dict[str, Any], mesh: Mesh, rules: sharding.Rules | str = "train") -> dict[str, Any]:
    """Places a stacked micro pytree on `mesh` with `batch_shardings`.

    Host NumPy arrays are assumed to be the full global batch on every process (multi-host: each process
    places its addressable shards); jax.Arrays are resharded.

    Raises:
      ValueError: see `batch_shardings`.
    """
    return jax.tree.map(_place, micro, batch_shardings(micro, mesh, rules))


def cast_pixels(micro: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """`micro` with its `pixel_values` in `dtype` (`batch.pixels_in`); unchanged for None or no media."""
    pv = micro.get("pixel_values")
    return micro if pv is None or dtype is None else {**micro, "pixel_values": pixels_in(pv, dtype)}


def _place(x, sh: NamedSharding) -> jax.Array:
    if isinstance(x, jax.ShapeDtypeStruct):  # abstract batches (ahead-of-time planning) only get the sharding
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    if isinstance(x, jax.Array):
        return jax.device_put(x, sh)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


# ---------------------------------------------------------------------------------------------------------
# Loss settings
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GRPOLossSettings:
    """The GRPO objective's knobs as a step sees them (static under jit).

    Attributes:
      eps_low, eps_high: ratio clip range [1 - eps_low, 1 + eps_high].
      loss_agg: a key of `losses.LOSS_AGG`.
      kl_coef: weight of the k3 KL to `micro["ref_logprobs"]` (0 = no reference needed).
      entropy_coef: weight of the entropy bonus (subtracted from the loss, aggregated like it).
      tis_cap: truncation of the importance weight against `micro["sampler_logprobs"]`; None = off.
      max_len: per-sequence divisor of "seq-mean-token-sum-norm".
      temperature: log-probs are of the distribution at this temperature (the original: 1.0, the raw
        logits, whatever temperature sampled the tokens).
      sampled_temperatures: each target's log-prob at the temperature its turn was sampled with
        (`micro["temperatures"]`, on top of `temperature`), so that old, current and sampler log-probs
        describe one distribution (`grpo.logprob_temperature = "sampled"`).
    """

    eps_low: float
    eps_high: float
    loss_agg: str
    kl_coef: float
    entropy_coef: float
    tis_cap: float | None
    max_len: int
    temperature: float = 1.0
    sampled_temperatures: bool = False

    def __post_init__(self):
        checks = [
            ("eps_low", self.eps_low >= 0, ">= 0"),
            ("eps_high", self.eps_high >= 0, ">= 0"),
            ("loss_agg", self.loss_agg in losses.LOSS_AGG, f"one of {sorted(losses.LOSS_AGG)}"),
            ("kl_coef", self.kl_coef >= 0, ">= 0"),
            ("entropy_coef", self.entropy_coef >= 0, ">= 0"),
            ("tis_cap", self.tis_cap is None or self.tis_cap > 0, "None or > 0"),
            ("max_len", isinstance(self.max_len, int) and self.max_len >= 1, "an int >= 1"),
            ("temperature", self.temperature > 0, "> 0"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"GRPOLossSettings.{name} must be {want}, got {getattr(self, name)!r}")

    @classmethod
    def from_config(
        cls, grpo_cfg: GRPOConfig, max_len: int, *, temperature: float = 1.0
    ) -> "GRPOLossSettings":
        """From the run config; `grpo.tis_cap` 0 means TIS off."""
        return cls(
            eps_low=float(grpo_cfg.eps_low),
            eps_high=float(grpo_cfg.eps_high),
            loss_agg=grpo_cfg.loss_agg,
            kl_coef=float(grpo_cfg.kl_coef),
            entropy_coef=float(grpo_cfg.entropy_coef),
            tis_cap=float(grpo_cfg.tis_cap) if grpo_cfg.tis_cap > 0 else None,
            max_len=int(max_len),
            temperature=float(temperature),
            sampled_temperatures=grpo_cfg.logprob_temperature == "sampled",
        )


# ---------------------------------------------------------------------------------------------------------
# Device side: the jitted steps
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainFns:
    """The jitted functions of one (graphdef, optimizer, mesh); call them with stacked micro pytrees
    (NumPy from `stack`, or already placed by `shard_batch`).

    Attributes:
      sft_step: (state, micro) -> (state, metrics); the state is donated.
      grpo_step: (state, micro) -> (state, metrics); None when built without GRPO settings.
      logprobs: (params, micro) -> (n_micro, B, T) float32 log-probs of the targets (at the GRPO
        temperature), replicated; with `loss_index` in micro (as `stack` builds it) only the trained
        positions are computed and the others read 0.
      grads: (state, micro, kind) -> `state.Accumulated` of the step's loss, kind "sft" | "grpo": exactly
        what the step feeds the optimizer (for tests, gradient checks and debugging); nothing is donated.
      trace: (kind, state, micro) -> {name: jax.stages.Traced} of the programs behind a call, traced at the
        shapes of `state` and `micro` (ShapeDtypeStructs suffice: ahead-of-time planning without devices,
        `pixel_reasoner_jax.plan`). kind "sft" | "grpo" gives {"grads", "update"} (the step's two
        programs), "logprobs" gives {"logprobs"} (`state` may then be the params alone). The batch gets
        `shard_batch`'s shardings; `.lower().compile()` them under `sharding.use_mesh(mesh, rules)`.
    """

    sft_step: Callable[[st.TrainState, dict], tuple[st.TrainState, dict]]
    grpo_step: Callable[[st.TrainState, dict], tuple[st.TrainState, dict]] | None
    logprobs: Callable[[Any, dict], jax.Array]
    grads: Callable[[st.TrainState, dict, str], st.Accumulated]
    trace: Callable[[str, Any, dict], dict[str, jax.stages.Traced]]


def _vision_args(mb: dict):
    return mb.get("pixel_values"), mb.get("vision_inputs")


def _safe_div(a, b):
    return a / jnp.where(b > 0, b, 1.0)


def make_train_fns(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    state_shardings: st.TrainState,
    mesh: Mesh,
    *,
    logprob_chunk: int = 256,
    grpo: GRPOLossSettings | None = None,
    rules: sharding.Rules | str = "train",
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    frozen: Callable[[str], bool] | None = None,
    buffers: Any = None,
    compiler_options: dict[str, Any] | None = None,
    pixel_dtype: Any = None,
) -> TrainFns:
    """Builds the jitted SFT / GRPO steps and the log-prob function.

    Args:
      graphdef: the model's graph definition (from `create_train_state`).
      optimizer: the optimizer of the state (`state.make_optimizer`).
      state_shardings: TrainState of NamedShardings (from `create_train_state`), the out shardings.
      mesh: the training mesh; the batch is sharded over its `act_batch` axes.
      logprob_chunk: sequence chunk of `token_logprobs` (live logits are (B, chunk, V)).
      grpo: GRPO objective settings; None builds no `grpo_step`.
      rules: logical-axis rules used while tracing (model constraints) and for the batch axis.
      schedule: the optimizer's learning-rate schedule; when given, metrics carry `lr` = schedule(step).
      frozen: the optimizer's frozen-parameter predicate; frozen parameters get no gradient computed (the
        backward pass skips them) and `grad_norm` is the clipping norm over trainable parameters only.
      buffers: the state's non-parameter variables for `logprobs(params, micro)` (the model has none).
      compiler_options: XLA options for every jit, e.g. {"xla_backend_optimization_level": 0} to cut CPU
        compile time 2-3x in tests and tiny runs.
      pixel_dtype: the dtype the programs take `pixel_values` in (None: as the batch holds them, float32).
        The model's compute dtype changes no result (the vision tower's first matmul casts its input to
        it) and halves the batch's largest array in bfloat16: 9.2 of the 13.1 GiB of arguments per device
        of a 7B GRPO gradient program in float32 (benchmarks/PLANS.md), and its host-to-device copy.
    """
    if logprob_chunk < 1:
        raise ValueError(f"logprob_chunk must be >= 1, got {logprob_chunk}")
    # GRPO log-probs (old, reference, current) are of the sampler's tempered distribution; SFT's NLL is not.
    rl_temperature = 1.0 if grpo is None else grpo.temperature
    per_token_temperature = grpo is not None and grpo.sampled_temperatures
    replicated = NamedSharding(mesh, P())

    def stop_frozen(params):
        if frozen is None:
            return params

        def one(keypath, var):
            return jax.lax.stop_gradient(var) if frozen(st.path_str(keypath)) else var

        return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def forward(params, bufs, mb, temperature, per_token=False):
        """Log-probs and entropies (B, T) of the targets of one micro-batch.

        With `loss_index` in the micro-batch only the trained positions are projected onto the vocabulary;
        the other positions read 0 (every loss masks them). `per_token` divides each target's logits by
        `mb["temperatures"]` as well.
        """
        model = nnx.merge(graphdef, params, bufs) if bufs is not None else nnx.merge(graphdef, params)
        pixel_values, vision_inputs = _vision_args(mb)
        hidden, _ = model.hidden_states(
            mb["input_ids"], mb["positions"], mb["attention_mask"], pixel_values, vision_inputs
        )
        if per_token:
            # Logits are linear in the hidden state: scaling a position's hidden scales its logits.
            hidden = (hidden.astype(jnp.float32) / mb["temperatures"][..., None]).astype(hidden.dtype)
        if "loss_index" not in mb:
            return token_logprobs(model, hidden, mb["targets"], temperature=temperature, chunk=logprob_chunk)
        return indexed_token_logprobs(
            model,
            hidden,
            mb["targets"],
            mb["loss_index"],
            mb["loss_valid"],
            temperature=temperature,
            chunk=logprob_chunk,
        )

    def sft_loss_fn(bufs):
        def loss_fn(params, mb):
            lp, ent = forward(stop_frozen(params), bufs, mb, 1.0)
            nll_sum, count = losses.sft_loss(lp, mb["loss_mask"])
            valid = mb["loss_mask"] != 0
            ent_sum = jnp.sum(jnp.where(valid, jax.lax.stop_gradient(ent), 0.0))
            return nll_sum, count, {"entropy": ent_sum, "tokens": count}

        return loss_fn

    def grpo_loss_fn(bufs):
        g = grpo
        agg = losses.LOSS_AGG[g.loss_agg]

        def loss_fn(params, mb):
            lp, ent = forward(stop_frozen(params), bufs, mb, rl_temperature, per_token_temperature)
            use_ref = g.kl_coef > 0
            old = mb["old_logprobs"]
            if "old_current" in mb:  # rows sampled by these very params: the forward is their old policy
                old = jnp.where(mb["old_current"][:, None] > 0, jax.lax.stop_gradient(lp), old)
            loss_sum, denom, m = losses.grpo_loss(
                lp,
                old,
                mb["advantages"],
                mb["loss_mask"],
                eps_low=g.eps_low,
                eps_high=g.eps_high,
                agg=g.loss_agg,
                kl_coef=g.kl_coef,
                ref_logprobs=mb["ref_logprobs"] if use_ref else None,
                sampler_logprobs=mb["sampler_logprobs"] if g.tis_cap is not None else None,
                tis_cap=g.tis_cap,
                max_len=g.max_len,
            )
            valid = (mb["loss_mask"] != 0).astype(jnp.float32)
            # Every aggregation is linear in the per-token loss, so aggregating the KL and entropy terms
            # alone with the same denominator splits the total exactly.
            pg_sum = loss_sum
            if use_ref:
                kl_bt = jnp.where(valid > 0, losses.kl_k3(jax.lax.stop_gradient(lp), mb["ref_logprobs"]), 0.0)
                pg_sum = pg_sum - g.kl_coef * agg(kl_bt, valid, g.max_len)[0]
            total = loss_sum
            ent_masked = jnp.where(valid > 0, ent, 0.0)
            if g.entropy_coef > 0:
                total = total - g.entropy_coef * agg(ent_masked, valid, g.max_len)[0]
            gap = jnp.abs(mb["sampler_logprobs"] - jax.lax.stop_gradient(old).astype(jnp.float32))
            m = dict(
                m,
                entropy=jnp.sum(jax.lax.stop_gradient(ent_masked)),
                pg_sum=jax.lax.stop_gradient(pg_sum),
                logprob_gap=jnp.sum(jnp.where(valid > 0, gap, 0.0)),
            )
            return total, denom, m

        return loss_fn

    loss_fns = {"sft": sft_loss_fn, "grpo": grpo_loss_fn}

    def accumulated(state, micro, kind):
        fn = loss_fns[kind](state.buffers)
        return st.accumulate(fn, state.params, micro, grad_shardings=state_shardings.params)

    def update(state, acc, kind):
        new = st.apply_gradients(state, acc.grads, optimizer)
        metrics = {
            "loss": acc.loss,
            "grad_norm": st.global_norm(acc.grads, frozen),
            "update_norm": st.update_norm(state.params, new.params),
        }
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        a = acc.aux
        if kind == "sft":
            metrics.update(tokens=a["tokens"], entropy=_safe_div(a["entropy"], a["tokens"]))
            return new, metrics
        n = a["n_tokens"]
        metrics.update(
            pg_loss=_safe_div(a["pg_sum"], acc.denom),
            kl=_safe_div(a["kl"], n),
            entropy=_safe_div(a["entropy"], n),
            clip_low=_safe_div(a["clip_low"], n),
            clip_high=_safe_div(a["clip_high"], n),
            ratio=_safe_div(a["ratio"], n),
            tis_weight=_safe_div(a["tis_weight"], n),
            tis_truncated=_safe_div(a["tis_truncated"], n),
            logprob_gap=_safe_div(a["logprob_gap"], n),
            tokens=n,
        )
        return new, metrics

    def logprobs_fn(params, bufs, micro):
        def body(_, mb):
            return None, forward(params, bufs, mb, rl_temperature, per_token_temperature)[0]

        return jax.lax.scan(body, None, micro)[1]

    # Two programs per step: the accumulated gradient (the expensive compile, shared with `grads`) and the
    # optimizer update. The gradient buffer exists either way (the scan's accumulator), so the split costs
    # one extra read of it, not memory.
    opts = dict(compiler_options=compiler_options)
    grads_jit = jax.jit(accumulated, static_argnums=2, **opts)
    update_jit = jax.jit(
        update, static_argnums=2, donate_argnums=0, out_shardings=(state_shardings, replicated), **opts
    )
    lp_jit = jax.jit(logprobs_fn, out_shardings=replicated, **opts)

    def check_kind(kind):
        if kind not in loss_fns:
            raise ValueError(f"kind must be one of {sorted(loss_fns)}, got {kind!r}")
        if kind == "grpo" and grpo is None:
            raise ValueError("a GRPO loss needs make_train_fns(..., grpo=GRPOLossSettings(...))")

    def put(micro):
        return shard_batch(cast_pixels(micro, pixel_dtype), mesh, rules)

    def grads(state, micro, kind="sft"):
        check_kind(kind)
        with sharding.use_mesh(mesh, rules):
            return grads_jit(state, put(micro), kind)

    def step(kind):
        def call(state, micro):
            acc = grads(state, micro, kind)
            with sharding.use_mesh(mesh, rules):
                return update_jit(state, acc, kind)

        return call

    def logprobs(params, micro):
        with sharding.use_mesh(mesh, rules):
            return lp_jit(params, buffers, put(micro))

    def trace(kind, state, micro):
        if kind == "logprobs":
            params = state.params if isinstance(state, st.TrainState) else state
            with sharding.use_mesh(mesh, rules):
                return {"logprobs": lp_jit.trace(params, buffers, put(micro))}
        check_kind(kind)
        with sharding.use_mesh(mesh, rules):
            g = grads_jit.trace(state, put(micro), kind)
            # The accumulator arrives as the gradient program left it: gradients sharded like the params
            # (`accumulate` constrains them), the scalar totals replicated.
            acc = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), g.out_info
            )
            acc = acc._replace(grads=st.abstract_like(acc.grads, state_shardings.params))
            return {"grads": g, "update": update_jit.trace(state, acc, kind)}

    return TrainFns(
        sft_step=step("sft"),
        grpo_step=None if grpo is None else step("grpo"),
        logprobs=logprobs,
        grads=grads,
        trace=trace,
    )
