"""The full Qwen2.5-VL (HF Qwen2_5_VLForConditionalGeneration): vision -> splice -> decoder -> logits.

Also the token log-probabilities and entropies used by every loss, which never materialise the (B, T, V)
logits (models/logprobs.py holds the chunked kernel and its hand-written backward pass).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.models.layers import (
    LAYER_LOOPS,
    REMAT_POLICIES,
    Linear,
    resolve_attention,
    resolve_weight_grad,
    set_weight_grad,
)
from pixel_reasoner_jax.models.logprobs import chunked_logprobs
from pixel_reasoner_jax.models.text import KVCache, Qwen2Decoder, init_cache
from pixel_reasoner_jax.models.vision import Qwen25VisionTower, VisionInputs, prepare_vision, stack_vision

__all__ = [
    "KVCache",
    "Qwen25VL",
    "check_vision_tokens",
    "VisionInputs",
    "init_cache",
    "prepare_vision",
    "splice_vision",
    "stack_vision",
    "token_logprobs",
    "indexed_token_logprobs",
]


def splice_vision(
    embeds: jax.Array, input_ids: jax.Array, merged: jax.Array, image_token_id: int, video_token_id: int
) -> jax.Array:
    """Each row's image / video pad positions take that sample's merged vision rows, in order.

    A cumulative count over the row's pad mask gives each pad its row; no Python loop, any number of pads.
    The caller guarantees each row's pad count equals its sample's real merged rows (`check_vision_tokens`).

    Args:
      embeds: (B, T, D); input_ids: (B, T); merged: (B, M, D) rows of each sample in placeholder order.
    """
    is_pad = (input_ids == image_token_id) | (input_ids == video_token_id)
    row = jnp.clip(jnp.cumsum(is_pad, axis=1) - 1, 0, merged.shape[1] - 1)
    rows = jnp.take_along_axis(merged.astype(embeds.dtype), row[..., None], axis=1)
    return jnp.where(is_pad[..., None], rows, embeds)


def check_vision_tokens(input_ids, vision_inputs: VisionInputs | None, cfg: ModelConfig) -> None:
    """Host check that each row's image + video pad count equals its sample's merged rows.

    Raises:
      ValueError: naming the first rows whose counts differ.
    """
    ids = np.asarray(input_ids)
    n_pad = ((ids == cfg.image_token_id) | (ids == cfg.video_token_id)).sum(-1).reshape(-1)
    if vision_inputs is None:
        n_rows = np.zeros_like(n_pad)
    else:
        n_rows = np.asarray(vision_inputs.num_merged).reshape(-1)
    if n_rows.shape != n_pad.shape:
        raise ValueError(
            f"input_ids hold {n_pad.size} rows but the vision inputs describe {n_rows.size} samples "
            "(stack one prepare_vision per row: models.vision.stack_vision)"
        )
    bad = np.flatnonzero(n_pad != n_rows)
    if bad.size:
        shown = ", ".join(f"row {r}: {n_pad[r]} pads vs {n_rows[r]} rows" for r in bad[:4])
        raise ValueError(f"image/video pad tokens do not match the vision rows of their sample ({shown})")


class Qwen25VL(nnx.Module):
    """Qwen2.5-VL: `visual` tower, `model` decoder, `lm_head` (absent when embeddings are tied).

    Args:
      cfg: architecture.
      dtype: compute dtype (float32 | bfloat16); norms, softmax and logits stay float32.
      param_dtype: parameter storage dtype.
      remat: `layers.REMAT_POLICIES` rematerialisation of each scanned layer (`layers.remat`).
      vision_remat: the vision tower's policy; "same" = `remat`.
      attention: `layers.ATTENTION_IMPLS`; "auto" picks the backend's kernel (`layers.resolve_attention`).
      layer_loop: `layers.LAYER_LOOPS`, for the decoder and the vision tower: "scan" or "unroll"; the
        parameters are stacked either way (same checkpoints, same state).
      weight_grad: `layers.WEIGHT_GRADS`, how every weight's gradient is formed (the linear layers' and
        the vocabulary head's); "auto" picks the backend's (`layers.resolve_weight_grad`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        vision_remat: str = "same",
        attention: str = "dense",
        layer_loop: str = "scan",
        weight_grad: str = "xla",
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
        if vision_remat not in ("same", *REMAT_POLICIES):
            raise ValueError(f"vision_remat must be 'same' or one of {REMAT_POLICIES}, got {vision_remat!r}")
        if layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {layer_loop!r}")
        attention = resolve_attention(attention, dtype)
        weight_grad = resolve_weight_grad(weight_grad)
        self.cfg = cfg
        self.dtype = dtype
        kw = dict(
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            attention=attention,
            layer_loop=layer_loop,
            rngs=rngs,
        )
        vision_kw = dict(kw, remat=remat if vision_remat == "same" else vision_remat)
        self.visual = Qwen25VisionTower(cfg.vision, cfg.text.hidden_size, **vision_kw)
        self.model = Qwen2Decoder(cfg.text, **kw)
        if cfg.text.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                (cfg.text.hidden_size,),
                (cfg.text.vocab_size,),
                names=("embed", "vocab"),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        self.weight_grad = weight_grad
        set_weight_grad(self, weight_grad)

    # ------------------------------------------------------------------------------ pieces

    def encode_vision(self, pixel_values: jax.Array, vision_inputs: VisionInputs) -> jax.Array:
        """Merged vision rows (B, Mb, D) per sample in placeholder order (rows past `num_merged` pad)."""
        return self.visual(pixel_values, vision_inputs)

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        vision_inputs: VisionInputs | None = None,
    ) -> jax.Array:
        """Token embeddings (B, T, D) with the vision rows spliced into the pad positions."""
        x = self.model.embed_tokens(input_ids)
        if pixel_values is not None:
            if vision_inputs is None:
                raise ValueError("embed: pixel_values given without vision_inputs")
            merged = self.encode_vision(pixel_values, vision_inputs)
            x = splice_vision(x, input_ids, merged, self.cfg.image_token_id, self.cfg.video_token_id)
        return x

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        pixel_values: jax.Array | None = None,
        vision_inputs: VisionInputs | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states (B, T, D) and the updated cache (None when `cache` is None).

        Args:
          input_ids: (B, T) ids (ignored when `inputs_embeds` is given).
          positions: (3, B, T) M-RoPE positions from `processing.rope` (decode: p + rope_delta).
          attention_mask: (B, T) 1 real / 0 padding.
          pixel_values, vision_inputs: (B, Pb, C) patch rows of each row's images / videos in placeholder
            order and their stacked `prepare_vision` index arrays (`processing.batch.pack_vision`).
          cache, cache_index: see `Qwen2Decoder.__call__`.
          inputs_embeds: precomputed `embed(...)` output (the sampler's separate splice jit).
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, vision_inputs)
        return self.model(inputs_embeds, positions, attention_mask, cache=cache, cache_index=cache_index)

    def lm_kernel(self) -> jax.Array:
        """(D, V) output projection (the embedding table transposed when tied)."""
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(B, T, V) float32 logits. Materialises the vocabulary axis: tests and decoding only."""
        w = self.lm_kernel().astype(self.dtype)
        return jnp.einsum("BTD,DV->BTV", hidden.astype(self.dtype), w, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, positions, attention_mask, pixel_values=None, vision_inputs=None):
        """Full-sequence logits (B, T, V) float32 (convenience for tests)."""
        hidden, _ = self.hidden_states(input_ids, positions, attention_mask, pixel_values, vision_inputs)
        return self.logits(hidden)


def token_logprobs(
    model: Qwen25VL,
    hidden: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """log p(target) and the entropy of the tempered next-token distribution at every position.

    `models.logprobs.chunked_logprobs` with the model's output projection: at most (B, chunk, V) float32
    logits are live in the forward pass, and as many in each vocabulary tile of the backward pass.

    Args:
      model: the (merged) model whose output projection is used.
      hidden: (B, T, D) final hidden states (position t predicts `targets[:, t]`).
      targets: (B, T) int token ids (any value where masked; the caller masks).
      temperature: logits are divided by it (the sampler's temperature).
      chunk: tokens per chunk; T is padded up to a multiple.

    Returns:
      logprobs (B, T) float32, entropy (B, T) float32.
    """
    w = model.lm_kernel().astype(model.dtype)
    return chunked_logprobs(
        hidden.astype(model.dtype),
        w,
        targets,
        temperature=temperature,
        chunk=chunk,
        weight_grad=model.weight_grad,
    )


def indexed_token_logprobs(
    model: Qwen25VL,
    hidden: jax.Array,
    targets: jax.Array,
    index: jax.Array,
    valid: jax.Array,
    *,
    temperature: float = 1.0,
    chunk: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """`token_logprobs` at the positions `index` of each row only; (B, T) results, 0 elsewhere.

    Only the K listed positions per row go through the (D, V) projection (forward and backward), so the
    cost of the largest matmuls follows the trained tokens, not the sequence (image pads, prompts and tool
    observations are most of a vision-language sequence and are never trained).

    Args:
      hidden, targets: as `token_logprobs`.
      index: (B, K) int positions in T (any value in unused slots).
      valid: (B, K) bool, False in unused slots (they contribute nothing).
    """
    h_bkd = jnp.take_along_axis(hidden, index[..., None], axis=1)
    y_bk = jnp.take_along_axis(targets, index, axis=1)
    lp_bk, ent_bk = token_logprobs(model, h_bkd, y_bk, temperature=temperature, chunk=chunk)
    rows = jnp.arange(index.shape[0])[:, None]

    def scatter(x_bk):
        return jnp.zeros(hidden.shape[:2], jnp.float32).at[rows, index].add(jnp.where(valid, x_bk, 0.0))

    return scatter(lp_bk), scatter(ent_bk)
