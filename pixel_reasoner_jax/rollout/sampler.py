"""In-process JAX sampler (a rollout Policy): one jitted prefill and one jitted `while_loop` decode.

Weights are jit arguments (an update never recompiles), the KV cache is donated to the decode loop, and
shapes are bucketed (batch, prompt, patches, new tokens) so a rollout compiles a handful of programs.
"""

import contextlib
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.models.qwen25vl import KVCache, check_vision_tokens, init_cache
from pixel_reasoner_jax.processing.batch import pick_bucket
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.policy import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationRequest,
    GenerationResult,
    Policy,
)
from pixel_reasoner_jax.rollout.sampler_inputs import SamplerBatch, expand_request, pack_batch

__all__ = ["JaxSampler", "sample_tokens", "truncation_mask"]


def _row_keys(seeds_b2: jax.Array, step) -> jax.Array:
    """One key per row from its own seed and the step only, so a row never depends on its batch-mates."""

    def one(words):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(words[0]), words[1]), step)

    return jax.vmap(one)(seeds_b2)


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> int32 keys with the same order (so a threshold can be bisected exactly over the keys)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def truncation_mask(logp_bv: jax.Array, top_p_b: jax.Array, top_k_b: jax.Array) -> jax.Array:
    """(B, V) True for the tokens top-k (-1 off) and top-p keep; the most likely token is always kept.

    Token i survives when fewer than k tokens are more likely and the mass of the more likely tokens is
    below top_p (the sort-based definition; tied tokens share a fate). Both tests are monotone in the
    token's log-prob, so one exact 32-step bisection over the ordered bit patterns finds the smallest
    surviving key without sorting the vocabulary (XLA's sort is slow on CPU and the vocabulary is 152k).
    """
    key_bv = _order_keys(logp_bv)
    p_bv = jnp.exp(logp_bv)

    def kept(kappa_b):  # would a token at key kappa survive?
        above_bv = key_bv > kappa_b[:, None]
        mass_ok = (top_p_b >= 1.0) | (jnp.sum(jnp.where(above_bv, p_bv, 0.0), axis=-1) < top_p_b)
        count_ok = (top_k_b <= 0) | (jnp.sum(above_bv, axis=-1) < top_k_b)
        return mass_ok & count_ok

    def step(_, lo_hi):
        lo_b, hi_b = lo_hi
        mid_b = (lo_b >> 1) + (hi_b >> 1) + (lo_b & hi_b & 1)  # floor((lo + hi) / 2) without overflow
        ok_b = kept(mid_b)
        return jnp.where(ok_b, lo_b, mid_b + 1), jnp.where(ok_b, mid_b, hi_b)

    # Invariant: a token at key hi survives (the maximum always does); lo only rises past rejected keys.
    lo_b, _ = jax.lax.fori_loop(0, 32, step, (key_bv.min(axis=-1), key_bv.max(axis=-1)))
    return key_bv >= lo_b[:, None]


def _inverse_cdf(p_bv: jax.Array, keys_b: jax.Array) -> jax.Array:
    """One draw per row from unnormalised probabilities: one uniform per row instead of V Gumbel draws."""
    cdf_bv = jnp.cumsum(p_bv, axis=-1)
    u_b = jax.vmap(jax.random.uniform)(keys_b) * cdf_bv[:, -1]
    v = p_bv.shape[-1]
    # The first index whose cdf exceeds u; u may round up to the total, so clip to the last live token.
    last_b = v - 1 - jnp.argmax((p_bv > 0)[:, ::-1], axis=-1)
    return jnp.minimum(jnp.sum(cdf_bv <= u_b[:, None], axis=-1), last_b).astype(jnp.int32)


def sample_tokens(
    logits_bv: jax.Array,
    temperature_b: jax.Array,
    top_p_b: jax.Array,
    top_k_b: jax.Array,
    keys_b: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Per-row sampled ids (B,) and their log-probs (B,) under SGLang's semantics.

    Log-probs are log_softmax(logits / temperature) over the whole vocabulary, before top-k / top-p
    truncation; temperature 0 is greedy (argmax) with log_softmax(logits). A row's draw depends only on
    its own logits, parameters and key, never on what its batch-mates ask for.
    """
    greedy_b = temperature_b <= 0
    scaled_bv = logits_bv / jnp.where(greedy_b, 1.0, temperature_b)[:, None]
    # log p(tok) = scaled[tok] - logsumexp(scaled): the (B, V) log_softmax is only built when sampling.
    lse_b = jax.nn.logsumexp(scaled_bv, axis=-1)
    best_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    truncate_b = ~greedy_b & ((top_p_b < 1.0) | (top_k_b > 0))

    def stochastic(_):
        logp_bv = scaled_bv - lse_b[:, None]
        keep_bv = jax.lax.cond(
            truncate_b.any(),
            lambda: truncation_mask(logp_bv, top_p_b, top_k_b) | ~truncate_b[:, None],
            lambda: jnp.ones(logp_bv.shape, bool),
        )
        return _inverse_cdf(jnp.where(keep_bv, jnp.exp(logp_bv), 0.0), keys_b)

    # All-greedy batches (evaluation, benchmarks) skip the vocabulary-wide sampling work.
    sampled_b = jax.lax.cond(greedy_b.all(), lambda _: best_b, stochastic, None)
    tok_b = jnp.where(greedy_b, best_b, sampled_b)
    return tok_b, jnp.take_along_axis(scaled_bv, tok_b[:, None], axis=-1)[:, 0] - lse_b


class JaxSampler(Policy):
    """Batched token-in/token-out generation with the project's Qwen2.5-VL.

    Args:
      model: a `Qwen25VL`; its graph is split once and its parameters become jit arguments.
      cfg: its architecture; image_cfg: patch sizes (media arrive at their final size, never resized).
      max_batch: rows per device call; larger request lists run in chunks.
      seq_buckets, patch_buckets: allowed prompt lengths / patch-row counts (None = powers of two).
      decode_bucket: new-token budgets are rounded up to multiples of it (bounds decode compilations).
      mesh, rules: run sharded over `mesh` with these logical rules; None = one device.
      weight_version: label of the initial weights.
      cache_dtype: KV-cache dtype (default: the model's compute dtype).
      seed: base of the seeds drawn for requests without one (None = fresh entropy).
    """

    def __init__(
        self,
        model,
        cfg: ModelConfig,
        image_cfg: ImageProcessorConfig,
        *,
        max_batch: int = 8,
        seq_buckets: Sequence[int] | None = None,
        patch_buckets: Sequence[int] | None = None,
        decode_bucket: int = 64,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules | str = "rollout",
        weight_version: str = "0",
        cache_dtype=None,
        seed: int | None = None,
    ):
        v = cfg.vision
        got = (image_cfg.patch_size, image_cfg.merge_size, image_cfg.temporal_patch_size)
        if got != (v.patch_size, v.spatial_merge_size, v.temporal_patch_size):
            raise ValueError(
                f"image_cfg (patch, merge, temporal) = {got} differs from the model's vision config "
                f"{(v.patch_size, v.spatial_merge_size, v.temporal_patch_size)}"
            )
        if decode_bucket < 1:
            raise ValueError(f"decode_bucket must be >= 1, got {decode_bucket}")
        if patch_buckets is not None and any(b % v.merge_unit for b in patch_buckets):
            raise ValueError(f"patch_buckets {tuple(patch_buckets)} must be multiples of {v.merge_unit}")
        self._batch_shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        if max_batch < 1 or max_batch % self._batch_shards:
            raise ValueError(
                f"max_batch must be a positive multiple of the mesh's data*fsdp size {self._batch_shards}, "
                f"got {max_batch}"
            )
        self.cfg, self.image_cfg = cfg, image_cfg
        self.max_batch = max_batch
        self.seq_buckets = None if seq_buckets is None else tuple(sorted(seq_buckets))
        self.patch_buckets = None if patch_buckets is None else tuple(sorted(patch_buckets))
        self.decode_bucket = decode_bucket
        self._mesh, self._rules = mesh, rules
        self._cache_dtype = cache_dtype or model.dtype
        self._rng = np.random.default_rng(seed)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self._graphdef = graphdef
        self._rest = nnx.to_pure_dict(rest)
        pure = nnx.to_pure_dict(params)
        if mesh is not None:
            placement = nnx.to_pure_dict(sharding.state_shardings(params, mesh, rules))
        else:
            placement = jax.tree.map(lambda x: x.sharding, pure)
        # Committed placement: update_weights puts new arrays on the same shardings, and jit keys its
        # executables on committedness too (an uncommitted -> committed switch would recompile). An abstract
        # model (nnx.eval_shape) keeps ShapeDtypeStructs: such a sampler can only `trace`.
        pure = jax.tree.map(_place_abstract, pure, placement)
        self._weights = (pure, str(weight_version))
        self._traces = {"prefill": 0, "decode": 0}
        self._vision_shapes: set[tuple[int, ...]] = set()
        self._lock = threading.Lock()
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("cache_len",))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(2,), static_argnames=("num_new",))

    # ------------------------------------------------------------------------------ Policy

    @property
    def weight_version(self) -> str:
        return self._weights[1]

    @property
    def compile_counts(self) -> dict[str, int]:
        """Executables compiled so far for prefill and decode, and distinct vision (patch, window) shapes.

        Counts the jit caches (an executable per argument signature, shardings included), which also
        catch recompiles that reuse a trace; the trace count stands in where the cache is not exposed.
        """
        counts = {}
        for name, fn in (("prefill", self._prefill), ("decode", self._decode)):
            size = getattr(fn, "_cache_size", None)
            counts[name] = max(size(), self._traces[name]) if size else self._traces[name]
        return {**counts, "vision": len(self._vision_shapes)}

    def update_weights(self, params, version: str) -> None:
        """Swaps in new parameters (an nnx.State of Params or its pure dict) without recompiling.

        Each array is cast to the current dtype and placed on the current sharding, so the jitted programs
        see identical argument types. An array already in that place is used as is (no copy): a caller
        that later donates its buffers must pass copies.

        Raises:
          ValueError: a parameter path or shape that differs from the served model's.
        """
        new = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
        old, _ = self._weights
        old_flat = dict(jax.tree_util.tree_flatten_with_path(old)[0])
        new_flat = dict(jax.tree_util.tree_flatten_with_path(new)[0])
        name = jax.tree_util.keystr
        if old_flat.keys() != new_flat.keys():
            missing = sorted(name(k) for k in old_flat.keys() - new_flat.keys())
            extra = sorted(name(k) for k in new_flat.keys() - old_flat.keys())
            raise ValueError(f"update_weights: params missing {missing[:5]}, unexpected {extra[:5]}")
        for k, x in new_flat.items():
            if tuple(np.shape(x)) != tuple(old_flat[k].shape):
                raise ValueError(
                    f"update_weights: parameter {name(k)} has shape {tuple(np.shape(x))}, "
                    f"expected {tuple(old_flat[k].shape)}"
                )
        self._weights = (jax.tree.map(_place_like, old, new), str(version))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order; chunks of `max_batch` rows share one prefill + decode call.

        Raises:
          ValueError: a malformed request (named), before any device work starts.
        """
        requests = list(requests)
        expanded = [expand_request(r, i, self.cfg, self.image_cfg) for i, r in enumerate(requests)]
        seeds = [r.seed if r.seed is not None else int(self._rng.integers(1 << 63)) for r in requests]
        chunks = []
        for s in range(0, len(requests), self.max_batch):
            e = slice(s, s + self.max_batch)
            rows = pick_bucket(len(expanded[e]), None)
            rows = min(-(-rows // self._batch_shards) * self._batch_shards, self.max_batch)
            batch = pack_batch(
                expanded[e],
                requests[e],
                seeds[e],
                self.cfg,
                batch_size=rows,
                seq_buckets=self.seq_buckets,
                patch_buckets=self.patch_buckets,
                decode_bucket=self.decode_bucket,
                first_index=s,
            )
            check_vision_tokens(batch.input_ids, batch.vision_inputs, self.cfg)
            chunks.append(batch)
        # One weight snapshot per call: every result is labelled with the version that produced it.
        params, version = self._weights
        out: list[GenerationResult] = []
        for batch in chunks:
            out += self._run(batch, params, version)
        return out

    def trace(self, b: SamplerBatch) -> dict[str, jax.stages.Traced]:
        """The prefill and decode programs of a `generate` chunk, traced at `b`'s shapes (its arrays may be
        ShapeDtypeStructs) with the current weights: ahead-of-time planning (`pixel_reasoner_jax.plan`).

        Lower and compile them under the sampler's mesh (`sharding.use_mesh(mesh, "rollout")`).
        """
        params, _ = self._weights
        t = b.input_ids.shape[1]
        with self._scope():
            prefill = self._prefill.trace(
                params, self._rest, b.input_ids, b.positions, b.attention_mask, b.pixel_values,
                b.vision_inputs, cache_len=t + b.num_new,
            )  # fmt: skip
            cache, logits = prefill.out_info
            if self._mesh is not None:  # the cache arrives as the prefill constrained it
                cache = KVCache(**{
                    f: jax.ShapeDtypeStruct(
                        getattr(cache, f).shape, getattr(cache, f).dtype,
                        sharding=NamedSharding(self._mesh, sharding.logical_to_spec(names)),
                    )
                    for f, names in _CACHE_AXES.items()
                })  # fmt: skip
            decode = self._decode.trace(
                params, self._rest, cache, logits, b.next_pos, b.temperature, b.top_p, b.top_k, b.max_new,
                b.stop_ids, b.seeds, b.live, num_new=b.num_new,
            )  # fmt: skip
        return {"prefill": prefill, "decode": decode}

    # ------------------------------------------------------------------------------ device

    def _scope(self):
        if self._mesh is None:
            return contextlib.nullcontext()
        return sharding.use_mesh(self._mesh, self._rules)

    def _run(self, b: SamplerBatch, params, version: str) -> list[GenerationResult]:
        t = b.input_ids.shape[1]
        with self._scope():
            cache, logits = self._prefill(
                params,
                self._rest,
                b.input_ids,
                b.positions,
                b.attention_mask,
                b.pixel_values,
                b.vision_inputs,
                cache_len=t + b.num_new,
            )
            out = self._decode(
                params,
                self._rest,
                cache,
                logits,
                b.next_pos,
                b.temperature,
                b.top_p,
                b.top_k,
                b.max_new,
                b.stop_ids,
                b.seeds,
                b.live,
                num_new=b.num_new,
            )
        tokens, logprobs, lengths, stopped = (np.asarray(x) for x in out[:4])
        results = []
        for r, prompt_tokens in enumerate(b.prompt_tokens):
            n = int(lengths[r])
            ids = tuple(int(x) for x in tokens[r, :n])
            stop = bool(stopped[r])
            results.append(
                GenerationResult(
                    output_ids=ids,
                    logprobs=tuple(float(x) for x in logprobs[r, :n]),
                    finish_reason=FINISH_STOP if stop else FINISH_LENGTH,
                    matched_stop=ids[-1] if stop else None,
                    weight_version=version,
                    prompt_tokens=prompt_tokens,
                )
            )
        return results

    def _model(self, params, rest):
        return nnx.merge(self._graphdef, params, rest)

    def _prefill_fn(
        self, params, rest, ids_bt, positions_3bt, mask_bt, pixel_values, vision_inputs, *, cache_len
    ):
        """Vision encode + splice + decoder over the left-padded prompts; the cache and last-token logits."""
        with self._lock:
            self._traces["prefill"] += 1
            if pixel_values is not None:
                self._vision_shapes.add((*pixel_values.shape, *vision_inputs.window_gather.shape))
        model = self._model(params, rest)
        cache = init_cache(self.cfg, ids_bt.shape[0], cache_len, self._cache_dtype)
        hidden_btd, cache = model.hidden_states(
            ids_bt,
            positions_3bt,
            mask_bt,
            pixel_values,
            vision_inputs,
            cache=_constrain(cache),
            cache_index=0,
        )
        return _constrain(cache), model.logits(hidden_btd[:, -1:])[:, 0]

    def _decode_fn(
        self,
        params,
        rest,
        cache,
        logits_bv,
        next_pos_b,
        temp_b,
        top_p_b,
        top_k_b,
        max_new_b,
        stop_bs,
        seeds_b2,
        live_b,
        *,
        num_new,
    ):
        """Samples up to `num_new` tokens per row in a `while_loop` that stops once every row finished.

        Token j of a row is fed at cache slot (prompt bucket + j) with position next_pos + j on all three
        M-RoPE axes (text after the prompt: the rope delta of decode_positions).
        """
        with self._lock:
            self._traces["decode"] += 1
        model = self._model(params, rest)
        b = logits_bv.shape[0]
        start = cache.max_len - num_new

        def pick(logits, step):
            return sample_tokens(logits, temp_b, top_p_b, top_k_b, _row_keys(seeds_b2, step))

        def finish(tok_b, step, done_b, stopped_b, lengths_b):
            active_b = ~done_b
            hit_b = active_b & (tok_b[:, None] == stop_bs).any(-1)
            lengths_b = jnp.where(active_b, step + 1, lengths_b)
            return done_b | hit_b | (step + 1 >= max_new_b), stopped_b | hit_b, lengths_b

        tok_b, lp_b = pick(logits_bv, 0)
        tokens_bn = jnp.zeros((b, num_new), jnp.int32).at[:, 0].set(tok_b)
        logprobs_bn = jnp.zeros((b, num_new), jnp.float32).at[:, 0].set(lp_b)
        flags = finish(tok_b, 0, ~live_b, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))

        def cond(state):
            step, done_b = state[0], state[5]
            return (step < num_new) & ~done_b.all()

        def body(state):
            step, cache, tok_b, tokens_bn, logprobs_bn, done_b, stopped_b, lengths_b = state
            pos_3b1 = jnp.broadcast_to((next_pos_b + step - 1)[None, :, None], (3, b, 1))
            hidden_b1d, cache = model.hidden_states(
                tok_b[:, None],
                pos_3b1,
                jnp.ones((b, 1), jnp.int32),
                cache=cache,
                cache_index=start + step - 1,
            )
            tok_b, lp_b = pick(model.logits(hidden_b1d)[:, 0], step)
            tokens_bn = tokens_bn.at[:, step].set(tok_b)
            logprobs_bn = logprobs_bn.at[:, step].set(lp_b)
            flags = finish(tok_b, step, done_b, stopped_b, lengths_b)
            return (step + 1, _constrain(cache), tok_b, tokens_bn, logprobs_bn, *flags)

        state = (jnp.int32(1), cache, tok_b, tokens_bn, logprobs_bn, *flags)
        _, cache, _, tokens_bn, logprobs_bn, _, stopped_b, lengths_b = jax.lax.while_loop(cond, body, state)
        # Returning the cache lets XLA alias it with the donated input: the loop updates it in place.
        return tokens_bn, logprobs_bn, lengths_b, stopped_b, cache


def _place_like(old: jax.Array, x) -> jax.Array:
    """`x` on `old`'s sharding in `old`'s dtype; host arrays are cast on the host, before the transfer."""
    if not isinstance(x, jax.Array):
        x = np.asarray(x, dtype=old.dtype)
    x = jax.device_put(x, old.sharding)
    return x if x.dtype == old.dtype else x.astype(old.dtype)


_KV_AXES = (None, "act_batch", None, "act_kv_heads", None)
_CACHE_AXES = {"k": _KV_AXES, "v": _KV_AXES, "mask": ("act_batch", None)}


def _constrain(cache: KVCache) -> KVCache:
    """KV cache sharded on batch and kv heads (a no-op without a mesh)."""
    return KVCache(**{f: sharding.constrain(getattr(cache, f), names) for f, names in _CACHE_AXES.items()})


def _place_abstract(x, sh):
    """`device_put`, except that a ShapeDtypeStruct (an abstract model) only takes the sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    return jax.device_put(x, sh)
