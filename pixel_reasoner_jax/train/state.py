"""Training state: optimizer (optax AdamW, LR schedule, frozen-parameter mask), the TrainState pytree,
its sharded creation on a mesh, the pure update, norm metrics and exact gradient accumulation.

The model is split once: its graphdef stays outside, the state holds arrays only, so steps are plain
`jax.jit` functions whose shardings come from the params' logical `out_sharding` names (`sharding.py`).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.config import SCHEDULES
from pixel_reasoner_jax.config import WARM_START_SCHEDULES as PREFIX_SCHEDULES

# Attribute name of the vision tower in the model (HF weight prefix `visual.*`); the SFT recipe freezes
# every parameter under it (`--freeze_vision_modules`, reference/pixel_reasoner.md §8.1).
VISION_TOWER = "visual"


# ---------------------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a warmup + decay learning-rate schedule.

    Attributes:
        lr: peak learning rate.
        total_steps: optimizer steps of the run; the decay reaches `min_lr_ratio * lr` there.
        warmup_ratio: warmup length as a share of `total_steps`, rounded up (HF / OpenRLHF use ceil).
        warmup_steps: explicit warmup length; overrides `warmup_ratio` when set.
        schedule: after warmup, "cosine" (HF `cosine_with_min_lr`), "linear", or "constant".
        min_lr_ratio: floor of the decay as a share of `lr` (0.5 in the original RL run, §8.2).
        weight_decay: decoupled weight decay, applied to matrices only (ndim >= 2), as HF Trainer exempts
            biases and norm scales.
        b1, b2, eps: Adam moments and epsilon.
        grad_clip: maximum global gradient norm over the trainable parameters; 0 disables clipping.
        prefix_steps, prefix_lr: with prefix_lr > 0, the first `prefix_steps` updates run at `prefix_lr`
            (grpo mode's SFT warm start) and the warmup + decay above span the remaining
            `total_steps - prefix_steps` alone; 0 = one schedule over every step.
        prefix_schedule: "constant" (the prefix runs at `prefix_lr` throughout) or "cosine" (from
            `prefix_lr` down to `lr` over the prefix, where the schedule above takes over).
    """

    lr: float
    total_steps: int
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    prefix_steps: int = 0
    prefix_lr: float = 0.0
    prefix_schedule: str = "constant"

    def __post_init__(self):
        checks = [
            ("lr", self.lr > 0, "> 0"),
            ("total_steps", isinstance(self.total_steps, int) and self.total_steps >= 1, "an int >= 1"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "in [0, 1)"),
            ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
            ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("b1", 0.0 <= self.b1 < 1.0, "in [0, 1)"),
            ("b2", 0.0 <= self.b2 < 1.0, "in [0, 1)"),
            ("eps", self.eps > 0, "> 0"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0 = off)"),
            ("prefix_lr", self.prefix_lr >= 0, ">= 0 (0 = no prefix)"),
            ("prefix_schedule", self.prefix_schedule in PREFIX_SCHEDULES, f"one of {PREFIX_SCHEDULES}"),
            (
                "prefix_steps",
                isinstance(self.prefix_steps, int) and 0 <= self.prefix_steps < self.total_steps,
                f"an int in [0, total_steps={self.total_steps})",
            ),
        ]
        if self.warmup_steps is not None:
            ok = isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps <= self.total_steps
            checks.append(("warmup_steps", ok, f"an int in [0, total_steps={self.total_steps}]"))
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"OptimConfig.{name} must be {want}, got {getattr(self, name)!r}")

    @property
    def num_prefix_steps(self) -> int:
        """Updates at `prefix_lr` before the schedule starts (0 without a prefix)."""
        return self.prefix_steps if self.prefix_lr > 0 else 0

    @property
    def num_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * (self.total_steps - self.num_prefix_steps))


def make_schedule(cfg: OptimConfig) -> Callable[[jax.Array], jax.Array]:
    """Learning rate as a function of the number of updates already applied (optax's `count`).

    Linear warmup from 0 (the first update uses lr 0, as HF's LambdaLR does), then the decay from `lr` to
    `min_lr_ratio * lr` over the remaining steps, flat after `total_steps`. A prefix (`prefix_lr > 0`)
    comes first (constant, or cosine from `prefix_lr` to `lr`) and shifts the schedule by `prefix_steps`.
    """
    lr, floor = cfg.lr, cfg.min_lr_ratio
    prefix = cfg.num_prefix_steps
    warmup, total = cfg.num_warmup_steps, cfg.total_steps - prefix

    def scheduled(step):
        progress = jnp.clip((step - warmup) / max(1, total - warmup), 0.0, 1.0)
        if cfg.schedule == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif cfg.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = jnp.ones_like(progress)
        after = lr * (floor + (1.0 - floor) * decay)
        if warmup == 0:
            return after
        return jnp.where(step < warmup, lr * step / warmup, after)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        if prefix == 0:
            return scheduled(step)
        if cfg.prefix_schedule == "cosine":
            head = cfg.lr + (cfg.prefix_lr - cfg.lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * step / prefix))
        else:
            head = jnp.full_like(step, cfg.prefix_lr)
        return jnp.where(step < prefix, head, scheduled(step - prefix))

    return schedule


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    raise TypeError(f"unknown pytree key entry {entry!r}")


def path_str(keypath) -> str:
    """'visual/blocks/0/attn/qkv/kernel' for the key path of a Variable inside an nnx.State."""
    return "/".join(_key_name(k) for k in keypath)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def freeze_prefixes(*prefixes: str) -> Callable[[str], bool]:
    """Predicate on parameter paths: True under any of `prefixes` (whole path components)."""
    if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
        raise ValueError(f"freeze_prefixes needs non-empty path prefixes, got {prefixes!r}")
    return lambda path: any(path == p or path.startswith(p + "/") for p in prefixes)


def trainable_labels(params, frozen: Callable[[str], bool] | None) -> Any:
    """Tree (prefix of `params`, one label per Variable): "frozen" where `frozen(path)`, else "train"."""

    def label(keypath, _):
        return "frozen" if frozen is not None and frozen(path_str(keypath)) else "train"

    labels = jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_var)
    names = jax.tree.leaves(labels)
    if frozen is not None and "frozen" not in names:
        paths = [path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_var)[0]]
        raise ValueError(f"the frozen predicate matched no parameter; parameter paths are like {paths[:5]}")
    return labels


def make_optimizer(
    cfg: OptimConfig, frozen: Callable[[str], bool] | None = None
) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule), with the parameters where `frozen(path)` holds frozen.

    Frozen parameters get zero updates and no Adam moments (`optax.multi_transform` keeps a masked state),
    and their gradients do not enter the clipping norm, as in PyTorch where they have no `.grad`.

    Args:
        cfg: optimizer settings.
        frozen: predicate on '/'-joined parameter paths (e.g. `freeze_prefixes(VISION_TOWER)`); None
            trains everything.
    """
    chain = []
    if cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))

    def decay_mask(params):
        return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)

    chain.append(
        optax.adamw(
            make_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    train = optax.chain(*chain)
    if frozen is None:
        return train
    return optax.multi_transform(
        {"train": train, "frozen": optax.set_to_zero()}, lambda p: trainable_labels(p, frozen)
    )


# ---------------------------------------------------------------------------------------------------------
# Train state
# ---------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step changes, as one pytree (checkpointed as is).

    Attributes:
        params: nnx.State of the model's nnx.Param variables.
        buffers: nnx.State of the model's other variables (constants, RNG streams); often empty.
        opt_state: the optax state of `params`.
        step: int32 scalar, optimizer updates applied so far.
        rng: typed PRNG key for the step's randomness.
    """

    params: Any
    buffers: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def tree_shardings(tree, mesh: Mesh, rules: sharding.Rules | str = "train"):
    """NamedSharding per array leaf: Variables by their logical names, anything else replicated.

    Unlike `nnx.get_named_sharding`, a Variable holding an optax `MaskedNode` (a frozen parameter's missing
    Adam moment) stays a node without leaves, so the result matches `tree` leaf for leaf.
    """
    replicated = NamedSharding(mesh, P())

    def one(x):
        if isinstance(x, nnx.Variable):
            if isinstance(x.get_value(), optax.MaskedNode):
                return x
            return sharding.state_shardings(x, mesh, rules)
        return replicated

    return jax.tree.map(one, tree, is_leaf=_is_var)


def abstract_like(state, shardings):
    """Restore target: ShapeDtypeStruct leaves carrying the concrete `shardings` of the current mesh.

    `state` may be concrete or abstract (e.g. from `nnx.eval_shape`, whose AbstractMesh shardings orbax
    cannot restore onto: every leaf gets the matching concrete sharding from `shardings` instead).
    """
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def _split_model(model: nnx.Module):
    graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
    return graphdef, params, buffers


def _init_fn(optimizer: optax.GradientTransformation, seed: int):
    def init(params, buffers):
        return TrainState(
            params=params,
            buffers=buffers,
            opt_state=optimizer.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key(seed),
        )

    return init


def create_train_state(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.Rules | str = "train",
    seed: int = 0,
):
    """Splits `model` once and places a fresh TrainState on `mesh`.

    Params keep their values and are moved to the shardings of their logical names; the optimizer state
    is created by a jit whose `out_shardings` give each moment its parameter's sharding.

    Returns:
        (graphdef, state, shardings): `nnx.merge(graphdef, state.params, state.buffers)` rebuilds the
        model; `shardings` is a TrainState of NamedShardings for `jit(in_shardings=/out_shardings=)`.
    """
    graphdef, params, buffers = _split_model(model)
    init = _init_fn(optimizer, seed)
    shardings = tree_shardings(jax.eval_shape(init, params, buffers), mesh, rules)
    params = jax.device_put(params, shardings.params)
    buffers = jax.device_put(buffers, shardings.buffers)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    # Made by a jit: a multi-host mesh is not addressable, and device_put of a local key array onto it fails.
    rng = jax.jit(lambda: jax.random.key(seed), out_shardings=shardings.rng)()
    state = TrainState(params=params, buffers=buffers, opt_state=opt_state, step=step, rng=rng)
    return graphdef, state, shardings


def abstract_train_state(
    model_fn: Callable[[], nnx.Module],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.Rules | str = "train",
    seed: int = 0,
):
    """Like `create_train_state` without allocating: the restore target for a checkpoint on `mesh`.

    Args:
        model_fn: builds the model (run under `nnx.eval_shape` inside the mesh and rules, so nothing is
            allocated).

    Returns:
        (graphdef, abstract_state, shardings); `abstract_state` leaves are ShapeDtypeStructs carrying
        `shardings`, ready for `Checkpointer.restore`.
    """
    with sharding.use_mesh(mesh, rules):
        abstract_model = nnx.eval_shape(model_fn)
    graphdef, params, buffers = _split_model(abstract_model)
    abstract = jax.eval_shape(_init_fn(optimizer, seed), params, buffers)
    shardings = tree_shardings(abstract, mesh, rules)
    return graphdef, abstract_like(abstract, shardings), shardings


def random_train_state(model_fn: Callable[[], nnx.Module], optimizer, shardings, mesh: Mesh, seed: int = 0):
    """A fresh TrainState of a randomly initialised model, made on the devices by one jit (`model_fn` runs
    inside it), laid out as `shardings` (`abstract_train_state`'s): benchmarks at real sizes, with no
    host copy of the weights (7B float32 would not fit a small host)."""

    def build():
        _, params, buffers = _split_model(model_fn())
        return _init_fn(optimizer, seed)(params, buffers)

    with sharding.use_mesh(mesh, "train"):
        return jax.jit(build, out_shardings=shardings)()


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation) -> TrainState:
    """One optimizer update (pure, jit-able); `grads` has the structure of `state.params`."""
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return dataclasses.replace(state, params=params, opt_state=opt_state, step=state.step + 1)


def reset_adam_moments(state: TrainState) -> TrainState:
    """`state` with every Adam moment (mu, nu) and Adam's bias-correction count at zero, as a freshly
    initialised optimizer has them; the learning-rate schedule's count (`state.step` and optax's schedule
    state) is kept, so the schedule goes on where it was. Arrays keep their shardings.

    The old optimizer state is donated (its arrays are deleted): the zeros take its buffers, so the switch
    never holds two copies of the moments (~56 GB across the mesh for 7B with f32 moments).
    """

    def fresh(node):
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(
                count=node.count * 0,
                mu=jax.tree.map(jnp.zeros_like, node.mu),
                nu=jax.tree.map(jnp.zeros_like, node.nu),
            )
        return node

    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
    reset = jax.jit(
        lambda o: jax.tree.map(fresh, o, is_leaf=is_adam),
        out_shardings=shardings,
        donate_argnums=0,
        keep_unused=True,  # the zeros do not read the moments: without it jit drops them and never donates
    )
    return dataclasses.replace(state, opt_state=reset(state.opt_state))


def split_rng(state: TrainState, num: int = 1) -> tuple[TrainState, jax.Array]:
    """(state with an advanced key, `num` fresh keys); the key stream is part of the checkpoint."""
    keys = jax.random.split(state.rng, num + 1)
    return dataclasses.replace(state, rng=keys[0]), keys[1:]


def global_norm(tree, frozen: Callable[[str], bool] | None = None) -> jax.Array:
    """L2 norm over all array leaves (float32), skipping Variables whose path is `frozen`.

    With the optimizer's predicate this is the norm the clipping sees (trainable gradients only).
    """
    total = jnp.zeros((), jnp.float32)
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)[0]:
        if frozen is not None and frozen(path_str(keypath)):
            continue
        for x in jax.tree.leaves(leaf):
            total = total + jnp.sum(jnp.square(x.astype(jnp.float32)))
    return jnp.sqrt(total)


def update_norm(old_params, new_params) -> jax.Array:
    """L2 norm of the parameter change of one step (float32; frozen parameters contribute 0)."""
    diff = jax.tree.map(lambda a, b: b.astype(jnp.float32) - a.astype(jnp.float32), old_params, new_params)
    return global_norm(diff)


# ---------------------------------------------------------------------------------------------------------
# Exact gradient accumulation
# ---------------------------------------------------------------------------------------------------------


class Accumulated(NamedTuple):
    """Result of `accumulate`: the big-batch gradient of sum / denominator, and the totals."""

    grads: Any
    loss: jax.Array
    loss_sum: jax.Array
    denom: jax.Array
    aux: Any


def _acc_dtype(dtype, accum_dtype):
    return jnp.promote_types(dtype, accum_dtype) if jnp.issubdtype(dtype, jnp.floating) else dtype


def accumulate(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, jax.Array, Any]],
    params,
    micro_batches,
    *,
    grad_shardings=None,
    accum_dtype=jnp.float32,
) -> Accumulated:
    """Gradient of (sum of loss sums) / (sum of denominators) over micro-batches, divided once.

    Each micro-batch contributes grad(sum) and its denominator; uneven micro-batches (different token
    counts) therefore give exactly the token-mean gradient of the whole batch, not a mean of means.

    Args:
        loss_fn: `(params, micro_batch) -> (loss_sum, denominator, aux)`; `aux` is a pytree of sums
            (e.g. metric numerators), added across micro-batches.
        params: differentiated argument of `loss_fn`.
        micro_batches: a pytree whose leaves share a leading micro-batch axis (run under `lax.scan`, one
            compiled body), or a list/tuple of micro-batches (unrolled; shapes may differ, e.g. buckets).
        grad_shardings: optional shardings of `params`; the running gradient sum is constrained to them
            so the accumulator is sharded like the parameters instead of by propagation.
        accum_dtype: dtype of the running sums (float32 keeps bf16 gradients exact enough to add).

    Returns:
        Accumulated(grads in the params' dtypes, loss = loss_sum / denom, loss_sum, denom, aux sums).
        A zero total denominator (nothing trained) gives zero gradients, not NaN.
    """

    def sum_and_grad(p, batch):
        def f(q):
            s, d, aux = loss_fn(q, batch)
            return s, (s, d, aux)

        grads, (s, d, aux) = jax.grad(f, has_aux=True)(p)
        return grads, s, d, aux

    def add(acc, new):
        out = jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, new)
        if grad_shardings is not None:
            out = (jax.lax.with_sharding_constraint(out[0], grad_shardings),) + tuple(out[1:])
        return out

    if isinstance(micro_batches, (list, tuple)):
        if not micro_batches:
            raise ValueError("accumulate: micro_batches is an empty sequence")
        acc = None
        for batch in micro_batches:
            new = sum_and_grad(params, batch)
            if acc is None:
                acc = jax.tree.map(lambda x: x.astype(_acc_dtype(x.dtype, accum_dtype)), new)
            else:
                acc = add(acc, new)
    else:
        leaves = jax.tree.leaves(micro_batches)
        sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
        if not leaves or len(sizes) != 1 or None in sizes or 0 in sizes:
            raise ValueError(
                f"accumulate: micro_batches leaves need one shared non-empty leading axis, got sizes {sizes}"
            )
        first = jax.tree.map(lambda x: x[0], micro_batches)
        shapes = jax.eval_shape(sum_and_grad, params, first)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, _acc_dtype(s.dtype, accum_dtype)), shapes)
        acc, _ = jax.lax.scan(lambda c, b: (add(c, sum_and_grad(params, b)), None), zeros, micro_batches)

    grad_sum, loss_sum, denom, aux = acc
    safe = jnp.where(denom > 0, denom, 1.0)
    grads = jax.tree.map(lambda g, p: (g / safe).astype(jnp.result_type(p)), grad_sum, params)
    return Accumulated(grads=grads, loss=loss_sum / safe, loss_sum=loss_sum, denom=denom, aux=aux)
