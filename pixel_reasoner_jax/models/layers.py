"""Shared building blocks: logically-annotated Linear / RMSNorm / Embed, rotary helpers, segment attention.

Everything here is layout-agnostic about a leading stacked-layer axis: parameters are created with it
(`num_layers=L`) and used without it inside `lax.scan`, where each step sees one layer's slice.
"""

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pixel_reasoner_jax.models import row_attention
from pixel_reasoner_jax.models.blocked_attention import blocked_attention, segment_mask
from pixel_reasoner_jax.models.layout import swap_last
from pixel_reasoner_jax.models.splash import splash_attention
from pixel_reasoner_jax.sharding import constrain, constrain_lookup

__all__ = [
    "ATTENTION_IMPLS",
    "LAYER_LOOPS",
    "REMAT_POLICIES",
    "Embed",
    "Linear",
    "RMSNorm",
    "WEIGHT_GRADS",
    "apply_rotary",
    "attention",
    "constrain",
    "resolve_attention",
    "resolve_weight_grad",
    "layer_slice",
    "remat",
    "rotate_half",
    "run_layers",
    "set_weight_grad",
]

Names = tuple[str | None, ...]
# "auto" is resolved per backend by `resolve_attention` when a model is built; the rest are kernels.
ATTENTION_IMPLS = ("auto", "dense", "blocked", "rows", "splash", "splash_fused", "cudnn", "xla")
REMAT_POLICIES = ("none", "full", "dots", "dots_attention", "offload_dots", "offload_dots_attention")
# How a stack of layers runs: "scan" (`lax.scan`: one layer body in the program) | "unroll" (one copy per
# layer: no per-step slicing of the stacked weights and carried residuals; on CPU 6 % faster per step at 12
# layers for 1.75x the compile time, no gain at the tiny job's 2: benchmarks/CPU_SPEED.md).
LAYER_LOOPS = ("scan", "unroll")
# Primitive names of JAX's cuDNN fused attention (jax._src.cudnn.fused_attention_stablehlo), by which remat
# "dots_attention" keeps the forward's outputs and the planner counts the kernels' FLOPs (a test checks
# that JAX still defines them: a rename would make both miss the kernel silently).
CUDNN_ATTENTION_FWD = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")
CUDNN_ATTENTION_BWD = ("dot_product_attention_bwd", "dot_product_attention_bwd_wrapper")
# How a weight's gradient (x^T . g, a sum over the tokens) is formed: "xla" (autodiff's product, which
# contracts the token axis of both operands) or "transposed" (the input copied into its transpose first,
# then a row-major product). XLA's CPU backend hands only row-major products to its fast GEMM library
# (YNNPACK) and the other to Eigen's, 1.7x slower at the CPU benchmark's shapes (benchmarks/CPU_SPEED.md);
# accelerators take either form natively, where the copy would only cost memory traffic. "auto" is
# resolved per backend by `resolve_weight_grad`: "transposed" on CPU, "xla" elsewhere.
WEIGHT_GRADS = ("auto", "xla", "transposed")


def _normal(stddev: float) -> Callable:
    def init(key, shape, dtype):
        return (stddev * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def _stack(shape: tuple[int, ...], names: Names, num_layers: int | None) -> tuple[tuple[int, ...], Names]:
    if num_layers is None:
        return shape, names
    return (num_layers, *shape), ("layers", *names)


class Linear(nnx.Module):
    """y = x . W (+ b) contracting the trailing `in_shape` axes of x; kernel (in..., out...) as in Flax.

    Attributes:
      kernel: (L?, *in_shape, *out_shape), logical names `names` (prefixed by "layers" when stacked).
      bias: (L?, *out_shape) when `bias_names` is given.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        *,
        names: Names,
        bias_names: Names | None = None,
        num_layers: int | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        if len(names) != len(in_shape) + len(out_shape):
            raise ValueError(f"Linear names {names} do not match kernel shape {in_shape + out_shape}")
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.weight_grad = "xla"  # WEIGHT_GRADS, set model-wide by `set_weight_grad`
        shape, full_names = _stack(in_shape + out_shape, names, num_layers)
        self.kernel = nnx.Param(_normal(init_std)(rngs.params(), shape, param_dtype), out_sharding=full_names)
        if bias_names is not None:
            shape, full_names = _stack(out_shape, bias_names, num_layers)
            self.bias = nnx.Param(
                _normal(init_std)(rngs.params(), shape, param_dtype), out_sharding=full_names
            )
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if self.weight_grad == "transposed":
            y = _dense_transposed_grad(x, kernel, self.n_in)
        else:
            y = jnp.tensordot(x, kernel, axes=self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def resolve_weight_grad(mode: str, platform: str | None = None) -> str:
    """The `WEIGHT_GRADS` form `mode` names on `platform` (default: JAX's default backend)."""
    if mode not in WEIGHT_GRADS:
        raise ValueError(f"weight_grad must be one of {WEIGHT_GRADS}, got {mode!r}")
    if mode != "auto":
        return mode
    return "transposed" if (platform or jax.default_backend()) == "cpu" else "xla"


def set_weight_grad(module: nnx.Module, mode: str) -> None:
    """Every `Linear` inside `module` forms its kernel gradient the resolved `mode` way."""
    for _, m in nnx.iter_modules(module):
        if isinstance(m, Linear):
            m.weight_grad = mode


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_transposed_grad(x, kernel, n_in):
    """`jnp.tensordot(x, kernel, n_in)` whose kernel gradient is `layout.swap_last(x) . g` (WEIGHT_GRADS)."""
    return jnp.tensordot(x, kernel, axes=n_in)


def _dense_fwd(x, kernel, n_in):
    return jnp.tensordot(x, kernel, axes=n_in), (x, kernel)


def _dense_bwd(n_in, res, g):
    x, kernel = res
    lead = g.ndim - (kernel.ndim - n_in)
    dx = jnp.tensordot(g, kernel, axes=(tuple(range(lead, g.ndim)), tuple(range(n_in, kernel.ndim))))
    k_in = math.prod(kernel.shape[:n_in])
    dk = swap_last(x.reshape(-1, k_in)) @ g.reshape(-1, kernel.size // k_in)
    return dx, dk.reshape(kernel.shape)


_dense_transposed_grad.defvjp(_dense_fwd, _dense_bwd)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, normalised in float32 and cast back before the scale (HF Qwen2RMSNorm order)."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float,
        names: Names,
        num_layers: int | None = None,
        param_dtype=jnp.float32,
    ):
        self.eps = eps
        shape, full_names = _stack((dim,), names, num_layers)
        self.scale = nnx.Param(jnp.ones(shape, param_dtype), out_sharding=full_names)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table (V, D); `attend` gives tied-embedding logits in float32."""

    def __init__(self, vocab: int, dim: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(
            _normal(0.02)(rngs.params(), (vocab, dim), param_dtype), out_sharding=("vocab", "embed")
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return constrain_lookup(jnp.take(self.embedding[...], ids, axis=0), "embed").astype(self.dtype)


# ----------------------------------------------------------------------------------------- rotary


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin in the dtype of cos/sin; cos/sin broadcast over the head axis."""
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------- attention


def resolve_attention(impl: str, dtype, platform: str | None = None) -> str:
    """The kernel `impl` names on `platform` (default: JAX's default backend); checks the choice.

    "auto": cuDNN on GPU with a 16-bit compute dtype ("xla" with float32, which cuDNN does not take),
    "splash" on TPU, "rows" elsewhere (CPU: causal row blocks, the dense path for the other small calls, the
    tiled kernel for large ones). A CPU host compiling ahead of time for a TPU names "splash" itself (or
    passes platform="tpu").
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "cudnn" and not half:
        raise ValueError(f"cudnn attention needs a bfloat16 or float16 compute dtype, got {jnp.dtype(dtype)}")
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform == "gpu":
        return "cudnn" if half else "xla"
    return "splash" if platform == "tpu" else "rows"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_segments: jax.Array,
    kv_segments: jax.Array,
    causal: bool,
    impl: str = "dense",
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    **blocks: int,
) -> jax.Array:
    """Softmax attention where query i sees key j iff their segment ids are equal (and j <= i if causal).

    One code path for every mask in the model: block-diagonal vision windows / frames, text padding,
    KV-cache validity. A query always sees at least itself under the conventions of the callers (padding
    shares a segment with padding), so no row is fully masked.

    Args:
      q: (B, T, N, H); k, v: (B, S, K, H) with N a multiple of K (grouped-query attention, query head n
        uses kv head n // (N // K), as HF `repeat_kv`).
      q_segments: (B, T) int; kv_segments: (B, S) int.
      causal: also mask keys whose position is after the query's.
      impl: "dense" (masked softmax in float32 over the whole (T, S), the reference), "blocked" (query x
        key tiles with online softmax, fully masked tiles skipped, models/blocked_attention.py), "rows"
        (the CPU kernel: up to `row_attention.MAX_SCORES` score elements, causal calls from slot 0 in
        unrolled query row blocks, models/row_attention.py, and the other calls "dense"; past it
        "blocked"), "splash"
        (the TPU Pallas kernel, models/splash.py; Pallas interpret mode off TPU; calls with explicit
        positions, i.e. the KV cache, run "blocked" because splash's causal mask is static), "splash_fused"
        (the same with splash's fused backward kernel), "cudnn" or
        "xla" (`jax.nn.dot_product_attention` with a boolean mask; causal calls from slot 0 pass their
        causality as `is_causal`, the kernel's own mask type). "auto" must be resolved first
        (`resolve_attention`).
      q_positions, kv_positions: (B, T) / (B, S) slot indices for the causal test; default arange.
      **blocks: `block_q` / `block_k` tile sizes of "blocked", `block` of "splash" (benchmarks, tests).

    Returns:
      (B, T, N, H) in q's dtype.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"attention: {n} query heads is not a multiple of {kh} kv heads")
    if impl in ("splash", "splash_fused"):
        if q_positions is None and kv_positions is None:
            fused = impl == "splash_fused"
            return splash_attention(
                q, k, v, q_segments, kv_segments, causal=causal, fused_backward=fused, **blocks
            )
        impl = "blocked"
        blocks = {}
    from_zero = q_positions is None and kv_positions is None and t == s  # no KV cache
    if impl == "rows":
        # Small problems: causal ones from slot 0 in row blocks, the rest (vision windows and image blocks,
        # KV-cache steps) through the dense path, whose one masked softmax beats tiles at these sizes.
        small = b * n * t * s <= row_attention.MAX_SCORES
        if small and causal and from_zero:
            return row_attention.row_block_attention(q, k, v, q_segments, kv_segments)
        impl = "dense" if small else "blocked"
        blocks = {}
    # A causal call from slot 0 (training, log-probs): cuDNN applies causality itself (its CAUSAL mask type
    # skips the tiles above the diagonal) and takes only the segment part as a dense mask; a dense causal
    # mask would make it run every tile.
    own_causal = impl in ("cudnn", "xla") and causal and from_zero
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    if impl == "blocked":
        return blocked_attention(
            q, k, v, q_segments, kv_segments, q_positions, kv_positions, causal=causal, **blocks
        )
    causal_mask = causal and not own_causal
    mask = segment_mask(q_segments, kv_segments, q_positions, kv_positions, causal_mask)  # (B, T, S)
    scale = 1.0 / math.sqrt(h)
    if impl == "dense":
        g = n // kh
        q_btkgh = q.reshape(b, t, kh, g, h)
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q_btkgh, k, preferred_element_type=jnp.float32) * scale
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
        return out.reshape(b, t, n, h)
    if impl in ("cudnn", "xla"):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None], scale=scale, is_causal=own_causal, implementation=impl
        ).astype(q.dtype)
    raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS[1:]} (resolved), got {impl!r}")


# ------------------------------------------------------------------------------------------ remat


def layer_slice(tree, i: int):
    """Layer `i` of a stacked-layer pytree (what one `lax.scan` step would see)."""
    return jax.tree.map(lambda a: a[i], tree)


def run_layers(body: Callable, carry, xs, num_layers: int, loop: str):
    """`body(carry, x_i) -> (carry, None)` over the layers' slices `xs`: a `lax.scan` or, with loop "unroll",
    one traced call per layer. Returns the final carry."""
    if loop == "scan":
        return jax.lax.scan(body, carry, xs)[0]
    if loop != "unroll":
        raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {loop!r}")
    for i in range(num_layers):
        carry, _ = body(carry, layer_slice(xs, i))
    return carry


def _dots_and_attention(prim, *avals, **params) -> bool:
    """Save matmul outputs (no batch dims) and the attention kernels' forward outputs."""
    if jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params):
        return True
    name = prim.name
    if name in CUDNN_ATTENTION_FWD:
        return True
    return name == "pallas_call" and str(params.get("name", "")).startswith("splash_mha_fwd")


def _to_host(saves: Callable) -> Callable:
    """`saves` turned into an offload policy: what it saves goes to pinned host memory in the forward and
    comes back for the backward; the rest is recomputed."""
    to_host = jax.ad_checkpoint.Offloadable(src="device", dst="pinned_host")

    def policy(prim, *avals, **params):
        return to_host if saves(prim, *avals, **params) else False

    return policy


def remat(fn: Callable, policy: str) -> Callable:
    """Wraps a scan body in jax.checkpoint by policy name: "none", "full" (save nothing), "dots" (save matmul
    outputs without batch dimensions), "dots_attention" (those and the cuDNN / splash attention forward's
    outputs, so the backward does not run the attention forward again; the blocked, rows and dense kernels
    are made of matmuls with batch dimensions and are recomputed as under "dots"); "offload_dots" and
    "offload_dots_attention" keep the same residuals in host memory instead of the device's (the FLOPs of
    "dots" for about the device memory of "full"; the residuals cross PCIe / the host link twice)."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    saves = {
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        "dots_attention": _dots_and_attention,
    }
    base = policy.removeprefix("offload_")
    if base in saves:
        return jax.checkpoint(fn, policy=saves[base] if base == policy else _to_host(saves[base]))
    raise ValueError(f"remat policy must be one of {REMAT_POLICIES}, got {policy!r}")
