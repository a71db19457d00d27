"""Device mesh, logical-axis rules per role (train: FSDP; rollout: tensor), and the constraint helper.

Model code names logical axes only; this module alone maps them to the mesh axes ('data', 'fsdp', 'tensor').
"""

import contextlib
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical names of parameter axes and activation axes used by the model.
PARAM_AXES = (
    "vocab",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "layers",
    "vit_patch",
    "vit_embed",
    "vit_qkv",
    "vit_heads_out",
    "vit_mlp",
    "vit_merge",
    "vit_merge_out",
)
ACT_AXES = (
    "act_batch",
    "act_seq",
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_mlp",
    "act_vocab",
    "act_patches",
)
LOGICAL_AXES = PARAM_AXES + ACT_AXES

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Training: parameters sharded over `fsdp` on their width axis (ZeRO-3 style, gathered per layer inside the
# scan) and over `tensor` on heads / mlp / vocab when a tensor axis is used; activations split on batch.
# The vision MLP width (3420) does not divide by 8, so the vision tower shards its 1280-wide axis instead.
TRAIN_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("vit_patch", None),
    ("vit_embed", "fsdp"),
    ("vit_qkv", "tensor"),
    ("vit_heads_out", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_merge", "fsdp"),
    ("vit_merge_out", "tensor"),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_patches", None),
)

# Sampling: no FSDP gathers on every decode step; weights split over `tensor` (Megatron style), batch over
# `data` (and `fsdp`, which a rollout mesh normally sizes 1).
ROLLOUT_RULES: Rules = (
    ("vocab", "tensor"),
    ("embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("vit_patch", None),
    ("vit_embed", None),
    ("vit_qkv", "tensor"),
    ("vit_heads_out", "tensor"),
    ("vit_mlp", "tensor"),
    ("vit_merge", None),
    ("vit_merge_out", "tensor"),
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_patches", None),
)

RULES = {"train": TRAIN_RULES, "rollout": ROLLOUT_RULES}


def check_rules(rules: Rules) -> None:
    """Every logical name exactly once, every target a mesh axis.

    NNX applies rules as a plain rename, so a name missing from a table would silently be taken as a mesh
    axis name; this check turns that into an error.
    """
    names = [name for name, _ in rules]
    missing = sorted(set(LOGICAL_AXES) - set(names))
    unknown = sorted(set(names) - set(LOGICAL_AXES))
    dupes = sorted({n for n in names if names.count(n) > 1})
    if missing or unknown or dupes:
        raise ValueError(f"bad sharding rules: missing {missing}, unknown {unknown}, duplicated {dupes}")
    for name, target in rules:
        targets = target if isinstance(target, tuple) else (target,)
        for t in targets:
            if t is not None and t not in MESH_AXES:
                raise ValueError(f"rule {name!r} -> {target!r} names no mesh axis of {MESH_AXES}")


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Mesh sizes with at most one -1 ("the rest of the devices") resolved; the product must match."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
        raise ValueError(f"mesh: data={data} fsdp={fsdp} tensor={tensor} does not fit {num_devices} devices")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axes (GSPMD style, what sharding constraints need)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    # Keep the tensor axis innermost so its collectives stay on neighbouring devices.
    grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | str = "train") -> Iterator[Mesh]:
    """Sets the mesh and the logical rules for model construction, jit tracing and `constrain`."""
    rules = RULES[rules] if isinstance(rules, str) else rules
    check_rules(rules)
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
        yield mesh


def logical_to_spec(names: Sequence[str | None], rules: Rules | None = None) -> P:
    """PartitionSpec of logical axis names under `rules` (default: the active rules)."""
    table = dict(flax_spmd.get_logical_axis_rules() if rules is None else rules)
    out = []
    for name in names:
        if name is None:
            out.append(None)
        elif name not in table:
            raise KeyError(f"logical axis {name!r} is not in the sharding rules")
        else:
            out.append(table[name])
    return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op only without a mesh or on a one-device mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of rank {x.ndim}")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def constrain_lookup(x: jax.Array, width: str = "embed") -> jax.Array:
    """Constraint for rows looked up in a table whose width axis is split: (B, ..., D) with D split like
    the table's `width` axis and B over the batch mesh axes that D does not use.

    Why: the lookup's gradient flows from batch-split rows into the width-split table. Straight from
    ("data", "fsdp") on B to "fsdp" on D, XLA's SPMD partitioner replicates the whole (B, T, D) cotangent
    ("Involuntary full rematerialization"); through this layout it is an all-to-all and an all-gather.
    A no-op where `constrain` is one.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    batch, split = logical_to_spec(("act_batch", width))

    def axes(a):
        return () if a is None else a if isinstance(a, tuple) else (a,)

    rest = tuple(a for a in axes(batch) if a not in axes(split))
    return jax.lax.with_sharding_constraint(x, P(rest or None, *[None] * (x.ndim - 2), split))


def state_shardings(state, mesh: Mesh, rules: Rules | str = "train"):
    """NamedSharding tree for an nnx.State whose Variables carry logical `out_sharding` names."""
    rules = RULES[rules] if isinstance(rules, str) else rules
    with flax_spmd.logical_axis_rules(rules):
        return nnx.get_named_sharding(state, mesh)


def check_divisible(abstract_state, mesh_shape: dict[str, int], rules: Rules | str = "train") -> list[str]:
    """Names of parameters whose sharded dimensions do not divide evenly by their mesh axes."""
    rules = RULES[rules] if isinstance(rules, str) else rules
    with flax_spmd.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(abstract_state)
    bad = []
    flat_specs = dict(nnx.to_flat_state(specs))
    for path, var in nnx.to_flat_state(abstract_state):
        spec = flat_specs[path]
        spec = spec.get_value() if hasattr(spec, "get_value") else spec
        for dim, axes in zip(var.shape, tuple(spec)):
            axes = axes if isinstance(axes, tuple) else (axes,)
            n = math.prod(mesh_shape.get(a, 1) for a in axes if a is not None)
            if dim % n:
                bad.append(f"{'.'.join(map(str, path))}: dim {dim} on {axes} (size {n})")
    return bad
