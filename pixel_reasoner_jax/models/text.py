"""Qwen2 text decoder with sectioned multimodal rotary (HF Qwen2_5_VLTextModel) and its KV cache.

Layers are stacked and run under `lax.scan` (or unrolled: `layers.LAYER_LOOPS`); one attention path serves
training, prefill and decode: keys are the layer's own tokens, or a fixed-size cache written at a `cache_index`
shared by the rows or given per row.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pixel_reasoner_jax.models.config import ModelConfig, TextConfig
from pixel_reasoner_jax.models.layers import (
    Embed,
    Linear,
    RMSNorm,
    apply_rotary,
    attention,
    constrain,
    remat,
    run_layers,
)

__all__ = ["KVCache", "Qwen2Decoder", "init_cache", "mrope_cos_sin", "write_slots"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer plus which slots hold real tokens.

    Attributes:
      k, v: (L, B, S, K, H) rotated keys / values.
      mask: (B, S) int32, 1 where a slot holds a real (non-padding) token that has been written.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(cfg: ModelConfig | TextConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache of `max_len` slots per row."""
    t = cfg.text if isinstance(cfg, ModelConfig) else cfg
    shape = (t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), mask=jnp.zeros((batch, max_len), jnp.int32)
    )


def write_slots(x, new, index: jax.Array, layer: jax.Array | None = None) -> jax.Array:
    """`x` (B, S, ...) with `new` (B, T, ...) written at slots [index, index + T) of each row.

    `index` is a scalar (every row) or (B,) (each row at its own slot; out-of-range writes clamp, as
    dynamic_update_slice does). With `layer`, `x` is (L, B, S, ...) and only that layer's slice is written.
    """
    new = new.astype(x.dtype)
    if layer is not None:
        new, x_starts = new[None], (layer,)
    else:
        x_starts = ()
    tail = (0,) * (new.ndim - len(x_starts) - 2)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(x, new, (*x_starts, 0, index, *tail))
    # Per-row slots as one scatter over explicit (row, slot) indices, each start normalised and clamped as
    # dynamic_update_slice does it (negative from the end, then into range). (A vmapped
    # dynamic_update_slice with a layer index lowered to a scatter with a repeated operand dimension that
    # XLA's GPU compiler rejects.)
    b, t = new.shape[len(x_starts)], new.shape[len(x_starts) + 1]
    s = x.shape[len(x_starts) + 1]
    start = jnp.clip(jnp.where(index < 0, index + s, index), 0, s - t)
    rows = jnp.arange(b)[:, None]
    slots = start[:, None] + jnp.arange(t)[None, :]
    if layer is None:
        return x.at[rows, slots].set(new, indices_are_sorted=True, unique_indices=True)
    return x.at[layer, rows, slots].set(new[0], indices_are_sorted=True, unique_indices=True)


def mrope_cos_sin(
    positions: jax.Array, head_dim: int, theta: float, section: tuple[int, int, int], dtype
) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, T, head_dim) of multimodal rotary: frequency slots [t | h | w] by `section`, doubled.

    Args:
      positions: (3, B, T) int rows t, h, w.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (3, B, T, head_dim / 2)
    bounds = [0, section[0], section[0] + section[1], head_dim // 2]
    angles = jnp.concatenate([angles[r, ..., bounds[r] : bounds[r + 1]] for r in range(3)], axis=-1)
    angles = jnp.concatenate([angles, angles], axis=-1)
    # HF casts cos/sin to the activation dtype before rotating.
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


class Attention(nnx.Module):
    """HF Qwen2_5_VLAttention (stacked): q/k/v with bias, o without, grouped-query heads."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(num_layers=cfg.num_hidden_layers, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(
            (d,), (n, h), names=("embed", "heads", "head_dim"), bias_names=("heads", "head_dim"), **kw
        )
        self.k_proj = Linear(
            (d,), (k, h), names=("embed", "kv_heads", "head_dim"), bias_names=("kv_heads", "head_dim"), **kw
        )
        self.v_proj = Linear(
            (d,), (k, h), names=("embed", "kv_heads", "head_dim"), bias_names=("kv_heads", "head_dim"), **kw
        )
        self.o_proj = Linear((n, h), (d,), names=("heads", "head_dim", "embed"), **kw)


class MLP(nnx.Module):
    """HF Qwen2MLP: SwiGLU without bias."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(num_layers=cfg.num_hidden_layers, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear((d,), (f,), names=("embed", "mlp"), **kw)
        self.up_proj = Linear((d,), (f,), names=("embed", "mlp"), **kw)
        self.down_proj = Linear((f,), (d,), names=("mlp", "embed"), **kw)
        if cfg.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}: Qwen2.5-VL uses 'silu'")

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(h, ("act_batch", "act_seq", "act_mlp")))


class DecoderLayers(nnx.Module):
    """All HF Qwen2_5_VLDecoderLayer layers, parameters stacked on a leading `layers` axis."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(
            eps=cfg.rms_norm_eps, names=("embed",), num_layers=cfg.num_hidden_layers, param_dtype=param_dtype
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **kw)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def layer(self, x, cos, sin, kv, ctx: dict, impl: str):
        """One layer on a single layer's slice. `kv` is None (own tokens) or (k_cache, v_cache) (B, S, K, H).

        Returns the new hidden states and the (B, T, K, H) keys / values to store.
        """
        a = self.self_attn
        h = self.input_layernorm(x)
        q = apply_rotary(a.q_proj(h), cos[:, :, None], sin[:, :, None])
        k = apply_rotary(a.k_proj(h), cos[:, :, None], sin[:, :, None])
        v = a.v_proj(h)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
        if kv is None:
            keys, values = k, v
        else:
            keys = write_slots(kv[0], k, ctx["cache_index"]).astype(k.dtype)
            values = write_slots(kv[1], v, ctx["cache_index"]).astype(v.dtype)
        out = attention(
            q,
            keys,
            values,
            q_segments=ctx["q_segments"],
            kv_segments=ctx["kv_segments"],
            causal=True,
            impl=impl,
            q_positions=ctx["q_positions"],
            kv_positions=ctx["kv_positions"],
        )
        x = x + a.o_proj(out)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("act_batch", "act_seq", "act_embed")), (k, v)


class Qwen2Decoder(nnx.Module):
    """HF Qwen2_5_VLTextModel: embed_tokens -> scanned decoder layers -> final norm."""

    def __init__(
        self,
        cfg: TextConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        attention: str = "dense",
        layer_loop: str = "scan",
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.attention = attention
        self.layer_loop = layer_loop
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.layers = DecoderLayers(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, names=("embed",), param_dtype=param_dtype)

    def __call__(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states (B, T, D) and the updated cache (None without one).

        Args:
          embeds: (B, T, D) input embeddings (text + spliced vision rows).
          positions: (3, B, T) int M-RoPE positions.
          attention_mask: (B, T) 1 for real tokens, 0 for padding.
          cache: None for a plain causal forward; else the T tokens are written at slots
            [cache_index, cache_index + T) of every row and attend to all valid earlier slots.
          cache_index: write offset: a scalar shared by every row (0 for prefill), or (B,) one per row
            (continuous batching: each row decodes at its own slot).
        """
        cfg = self.cfg
        b, t, _ = embeds.shape
        x = constrain(embeds.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        cos, sin = mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, self.dtype)
        q_seg = attention_mask.astype(jnp.int32)
        graphdef, state = nnx.split(self.layers)
        impl = self.attention
        if cache is None:
            ctx = dict(q_segments=q_seg, kv_segments=q_seg, q_positions=None, kv_positions=None)

            def body(x, layer_state):
                x, _ = nnx.merge(graphdef, layer_state).layer(x, cos, sin, None, ctx, impl)
                return x, None

            x = run_layers(remat(body, self.remat), x, state, cfg.num_hidden_layers, self.layer_loop)
            new_cache = None
        else:
            idx = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
            s = cache.max_len
            kv_mask = write_slots(cache.mask, q_seg, idx)
            q_pos = jnp.broadcast_to(idx[..., None] + jnp.arange(t, dtype=jnp.int32), (b, t))
            kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            ctx = dict(
                q_segments=q_seg, kv_segments=kv_mask, q_positions=q_pos, kv_positions=kv_pos, cache_index=idx
            )

            # The whole cache rides in the carry and is updated in place one layer slice at a time.
            def body(carry, xs):
                x, k_all, v_all = carry
                layer_state, i = xs
                kv = (k_all[i], v_all[i])
                x, (k, v) = nnx.merge(graphdef, layer_state).layer(x, cos, sin, kv, ctx, impl)
                k_all = write_slots(k_all, k, idx, layer=i)
                v_all = write_slots(v_all, v, idx, layer=i)
                return (x, k_all, v_all), None

            layer_ids = jnp.arange(cfg.num_hidden_layers, dtype=jnp.int32)
            x, k_all, v_all = run_layers(
                remat(body, self.remat),
                (x, cache.k, cache.v),
                (state, layer_ids),
                len(layer_ids),
                self.layer_loop,
            )
            new_cache = KVCache(k=k_all, v=v_all, mask=kv_mask)
        return self.norm(x), new_cache
