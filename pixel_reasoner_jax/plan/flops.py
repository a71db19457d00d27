"""FLOP counts of traced programs: matmul FLOPs read off the jaxpr with loops multiplied out, XLA's own
count of a compiled program, and the 6·N·T model-FLOP reference.

XLA's cost analysis counts a while-loop body once (a scan over 28 layers reports one layer) and custom
calls (cuDNN attention, Pallas kernels) as 0, so the plan's FLOPs come from the jaxpr: every dot_general
times the trip counts of the scans around it, cuDNN attention counted from its operand shapes.
"""

import math
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex_core

# Primitive names of JAX's cuDNN fused attention (jax._src.cudnn.fused_attention_stablehlo): custom calls
# to XLA, counted from the q/k shapes here (QK^T and PV forward; the backward recomputes QK^T and adds dV,
# dP, dQ, dK: 5 products).
_CUDNN_FWD = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")
_CUDNN_BWD = ("dot_product_attention_bwd", "dot_product_attention_bwd_wrapper")


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


def _attention_flops(eqn, products: int) -> float:
    q, k = eqn.invars[0].aval, eqn.invars[1].aval
    b, t, n, h = q.shape
    s = k.shape[1]
    return 2.0 * products * b * n * t * s * h


def _sub_jaxprs(params: dict[str, Any]):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jex_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jex_core.Jaxpr):
                yield v


def jaxpr_flops(jaxpr, while_trips: int = 1) -> float:
    """Matmul FLOPs of a (closed) jaxpr: dot_general and convolutions, scans times their length, the
    larger branch of a cond, while loops times `while_trips` (their trip count is a run-time value).

    Counts every tile of the blocked attention kernel, whose `cond` skips fully masked tiles at run time
    (about half of them under a causal mask): for attention the count is an upper bound.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
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
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"], while_trips)
        elif name == "while":
            body = jaxpr_flops(eqn.params["body_jaxpr"], while_trips)
            total += while_trips * body + (while_trips + 1) * jaxpr_flops(
                eqn.params["cond_jaxpr"], while_trips
            )
        elif name == "cond":
            total += max(jaxpr_flops(b, while_trips) for b in eqn.params["branches"])
        else:  # pjit, remat, custom_vjp/jvp calls, shard_map: whatever runs inside
            total += sum(jaxpr_flops(sub, while_trips) for sub in _sub_jaxprs(eqn.params))
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
