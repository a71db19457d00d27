"""FLOP counts of traced programs: matmul FLOPs read off the jaxpr with loops multiplied out, XLA's own
count of a compiled program, and the 6·N·T model-FLOP reference.

XLA's cost analysis counts a while-loop body once (a scan over 28 layers reports one layer) and custom
calls (cuDNN attention, Pallas kernels) as 0, so the plan's FLOPs come from the jaxpr: every dot_general
times the trip counts of the scans around it, cuDNN attention counted from its operand shapes, a Pallas
kernel's body times its grid.
"""

import math
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

from pixel_reasoner_jax.models.layers import CUDNN_ATTENTION_BWD as _CUDNN_BWD
from pixel_reasoner_jax.models.layers import CUDNN_ATTENTION_FWD as _CUDNN_FWD

# JAX's cuDNN fused attention primitives are custom calls to XLA, counted from the q/k shapes here (QK^T and
# PV forward; the backward recomputes QK^T and adds dV, dP, dQ, dK: 5 products).


def _dot_flops(eqn) -> float:
    lhs = eqn.invars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    k = math.prod(lhs.shape[d] for d in lhs_contract)
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * k


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    groups = eqn.params.get("feature_group_count", 1)
    kernel = math.prod(rhs.shape[d] for d in dn.rhs_spec[2:])
    in_features = rhs.shape[dn.rhs_spec[1]]
    return 2.0 * math.prod(out.shape) * kernel * in_features / max(1, groups) * groups


# cuDNN's flash kernels run query x key tiles of this size; under a causal mask type they skip the tiles
# wholly above the diagonal (the count keeps the diagonal tiles whole).
_CUDNN_TILE = 128


def _attention_flops(eqn, products: int) -> float:
    """cuDNN attention: `products` matmuls of (T, S, H) per batch row and head, over the tiles it runs:
    all of them, or the causal triangle when its mask type is causal (`is_causal`, T == S)."""
    q, k = eqn.invars[0].aval, eqn.invars[1].aval
    b, t, n, h = q.shape
    s = k.shape[1]
    tiles = 1.0
    if "CAUSAL" in str(eqn.params.get("mask_type", "")) and t == s:
        nb = -(-t // _CUDNN_TILE)
        tiles = (nb + 1) / (2 * nb)
    return 2.0 * products * b * n * t * s * h * tiles


def _sub_jaxprs(params: dict[str, Any]):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
                yield v


def _known(closed, known: dict) -> dict:
    """`known` plus the small integer / boolean constants a closed jaxpr carries (splash's block tables,
    the vision tower's per-layer full-attention flags)."""
    consts = getattr(closed, "consts", ())
    if not consts:
        return known
    out = dict(known)
    for var, c in zip(closed.jaxpr.constvars, consts):
        c = np.asarray(c)
        if c.ndim and c.dtype.kind in "iub" and c.size <= 1 << 20:  # arrays only, not scalars
            out[var] = c
    return out


def _passed(outer_vars, inner, known: dict) -> dict:
    """The known constants among `outer_vars`, under the names of `inner`'s matching input variables."""
    inner_vars = getattr(inner, "jaxpr", inner).invars
    if len(inner_vars) != len(outer_vars):
        return {}
    return {i: known[o] for o, i in zip(outer_vars, inner_vars) if isinstance(o, jex_core.Var) and o in known}


def _returned(eqn, inner, inner_known: dict, known: dict) -> None:
    """Adds to `known` the outputs of `eqn` that its sub-jaxpr `inner` returns as known constants (a
    custom VJP's forward hands splash's block tables to the backward as residuals)."""
    inner_out = getattr(inner, "jaxpr", inner).outvars
    if len(inner_out) == len(eqn.outvars):
        for o, i in zip(eqn.outvars, inner_out):
            if isinstance(i, jex_core.Var) and i in inner_known:
                known[o] = inner_known[i]


def _is_known(v, known: dict) -> bool:
    return isinstance(v, jex_core.Var) and v in known


def _scan_flops(eqn, while_trips: int, known: dict) -> float:
    """A scan: its body times its length. Scanned-over inputs known from constants (per-layer flags) are
    sliced per iteration, iterations with equal slices share one count, and per-iteration outputs that
    are known (a cond's branch index saved for the backward pass) become known stacked outputs."""
    body, length = eqn.params["jaxpr"], eqn.params["length"]
    inner = _passed(eqn.invars, body, known)
    first_xs, n_carry = eqn.params["num_consts"] + eqn.params["num_carry"], eqn.params["num_carry"]
    body_jaxpr = getattr(body, "jaxpr", body)
    xs = [
        (body_jaxpr.invars[i], known[v])
        for i, v in enumerate(eqn.invars)
        if i >= first_xs and _is_known(v, known)
    ]
    if not xs:
        return length * _walk(body, while_trips, inner)
    keys = [b"".join(np.ascontiguousarray(value[t]).tobytes() for _, value in xs) for t in range(length)]
    walked: dict[bytes, tuple[float, dict]] = {}
    for t, key in enumerate(keys):
        if key not in walked:
            env = {**inner, **{var: value[t] for var, value in xs}}
            walked[key] = (_walk(body, while_trips, env), env)
    for j, out in enumerate(body_jaxpr.outvars[n_carry:]):
        if isinstance(out, jex_core.Var) and all(out in walked[key][1] for key in walked):
            known[eqn.outvars[n_carry + j]] = np.stack([walked[key][1][out] for key in keys])
    return sum(walked[key][0] for key in keys)


def _pallas_flops(eqn, while_trips: int, known: dict) -> float:
    """A Pallas kernel: its body once per grid cell. Splash attention's kernels take their block table
    (0 = tile skipped) as the second operand: when that table is a constant of the trace (the static
    causal / full masks of models/splash.py), only the grid cells of its non-zero tiles count."""
    grid = math.prod(eqn.params["grid_mapping"].grid)
    body = jaxpr_flops(eqn.params["jaxpr"], while_trips)
    share = 1.0
    if str(eqn.params.get("name", "")).startswith("splash_mha") and len(eqn.invars) > 1:
        table = known.get(eqn.invars[1]) if isinstance(eqn.invars[1], jex_core.Var) else None
        share = float(np.mean(table != 0)) if table is not None else 1.0
    return grid * body * share


def jaxpr_flops(jaxpr, while_trips: int = 1, known: dict | None = None) -> float:
    """Matmul FLOPs of a (closed) jaxpr: dot_general and convolutions, scans times their length, the
    larger branch of a cond, while loops times `while_trips` (their trip count is a run-time value).

    Pallas calls count their kernel body once per grid cell; splash attention's only for the tiles its
    static block table runs (the causal triangle, `_pallas_flops`). The blocked kernel's `cond` skips
    fully masked tiles at run time (segment ids, causal): every one of its tiles counts, an upper bound.
    `known`: constant integer arrays by variable (filled from the closed jaxprs' constants).
    """
    return _walk(jaxpr, while_trips, dict(known or {}))


def _walk(closed, while_trips: int, known: dict) -> float:
    """`jaxpr_flops`; `known` gains the constants this jaxpr's equations pass on (for `_returned`)."""
    known.update(_known(closed, {}))
    jaxpr = getattr(closed, "jaxpr", closed)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name in _CUDNN_FWD:
            total += _attention_flops(eqn, 2)
        elif name in _CUDNN_BWD:
            total += _attention_flops(eqn, 5)
        elif name == "pallas_call":
            total += _pallas_flops(eqn, while_trips, known)
        elif name == "scan":
            total += _scan_flops(eqn, while_trips, known)
        elif name == "convert_element_type" and _is_known(eqn.invars[0], known):
            known[eqn.outvars[0]] = np.asarray(known[eqn.invars[0]]).astype(eqn.params["new_dtype"])
        elif name == "while":
            body = _walk(eqn.params["body_jaxpr"], while_trips, {})
            total += while_trips * body + (while_trips + 1) * _walk(eqn.params["cond_jaxpr"], while_trips, {})
        elif name == "cond" and _is_known(eqn.invars[0], known) and np.ndim(known[eqn.invars[0]]) == 0:
            # A branch index known from constants (a scanned layer's flag): only that branch runs.
            b = eqn.params["branches"][int(np.clip(known[eqn.invars[0]], 0, len(eqn.params["branches"]) - 1))]
            inner = _passed(eqn.invars[1:], b, known)
            total += _walk(b, while_trips, inner)
            _returned(eqn, b, inner, known)
        elif name == "cond":
            branches = []
            for b in eqn.params["branches"]:
                inner = _passed(eqn.invars[1:], b, known)
                branches.append(_walk(b, while_trips, inner))
                _returned(eqn, b, inner, known)
            total += max(branches)
        else:  # pjit, remat, custom_vjp/jvp calls, shard_map: whatever runs inside
            # A shard_map body sees one device's shard and runs on every device of its mesh: the rest of
            # the count is global (the plan divides by the devices), so the body counts once per device.
            copies = eqn.params["mesh"].size if name == "shard_map" else 1
            for sub in _sub_jaxprs(eqn.params):
                inner = _passed(eqn.invars, sub, known)
                total += copies * _walk(sub, while_trips, inner)
                _returned(eqn, sub, inner, known)
    return total


def xla_flops(compiled: jax.stages.Compiled) -> float | None:
    """XLA's per-device FLOP count of a compiled program (loop bodies counted once, custom calls 0).

    GPU executables compiled without a GPU return no cost analysis; their per-device HLO module is then
    analysed through the CPU client with `_jax.hlo_module_cost_analysis`, a private jaxlib API used only
    here. None when neither works.
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:  # deviceless executables may not implement it
        cost = None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        try:
            from jax._src import xla_bridge
            from jax._src.lib import _jax

            module = compiled.runtime_executable().hlo_modules()[0]
            cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
        except Exception:  # a private API: its absence must not stop a plan
            return None
    flops = cost.get("flops") if cost else None
    return None if flops is None else float(flops)


def count_params(tree, skip: tuple[str, ...] = ()) -> int:
    """Elements of every array leaf of an nnx.State / pytree whose key path mentions none of `skip`."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        text = jax.tree_util.keystr(path)
        if any(s in text for s in skip):
            continue
        total += int(np.prod(np.shape(leaf)))
    return total
