"""Decode slots of the JAX sampler: the device state of B rows and the traced row operations on it.

A slot holds one request: its prompt's KV rows (copied from a prefill that may serve several slots), its
generated tokens, and whether it finished. `fill_slots` writes prefilled prompts into chosen slots;
`decode_steps` runs the shared decode loop until enough slots are free to refill.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.models.qwen25vl import KVCache, init_cache
from pixel_reasoner_jax.rollout.sampling import PASSES, row_keys, sample_tokens

__all__ = [
    "SlotState",
    "constrain_slots",
    "decode_steps",
    "fill_slots",
    "init_slots",
    "slot_axes",
    "slot_shardings",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Device state of B decode slots (N = the call's token budget, S = cache slots per row).

    Attributes:
      cache: KV cache (L, B, S, K, H); a row's prompt sits left-padded in [0, base), token j at base + j.
      tokens, logprobs: (B, N) generated ids / log-probs; entries past `count` are stale.
      last: (B,) int32 the last generated token (fed at the next step).
      count: (B,) int32 tokens generated so far.
      done: (B,) bool finished (stop id or budget) or empty; stopped: (B,) bool ended on a stop id.
    """

    cache: KVCache
    tokens: jax.Array
    logprobs: jax.Array
    last: jax.Array
    count: jax.Array
    done: jax.Array
    stopped: jax.Array


def init_slots(cfg, slots: int, cache_len: int, num_new: int, cache_dtype) -> SlotState:
    """B empty slots (all done, so the decode loop never runs them before a fill)."""
    z = jnp.zeros((slots,), jnp.int32)
    return SlotState(
        cache=init_cache(cfg, slots, cache_len, cache_dtype),
        tokens=jnp.zeros((slots, num_new), jnp.int32),
        logprobs=jnp.zeros((slots, num_new), jnp.float32),
        last=z,
        count=z,
        done=jnp.ones((slots,), bool),
        stopped=jnp.zeros((slots,), bool),
    )


def slot_axes(state: SlotState) -> SlotState:
    """Logical axis names of every leaf of `state`: the batch axis over act_batch, the cache's kv heads over
    act_kv_heads, the rest unsplit."""
    kv = (None, "act_batch", None, "act_kv_heads", None)
    by_row = {
        f.name: ("act_batch",) + (None,) * (getattr(state, f.name).ndim - 1)
        for f in dataclasses.fields(state)
        if f.name != "cache"
    }
    return SlotState(cache=KVCache(k=kv, v=kv, mask=("act_batch", None)), **by_row)


def constrain_slots(state: SlotState) -> SlotState:
    """Every leaf sharded by `slot_axes` (no-op without a mesh): the programs' inputs and outputs keep one
    placement, so no call recompiles for a different one."""
    return jax.tree.map(sharding.constrain, state, slot_axes(state))


def slot_shardings(state: SlotState, mesh, rules: sharding.Rules | str) -> SlotState:
    """The NamedSharding of every leaf of `state` (arrays or ShapeDtypeStructs) that `constrain_slots`
    gives it on `mesh` under `rules`."""
    table = sharding.RULES.get(rules, rules)
    return jax.tree.map(
        lambda _, names: NamedSharding(mesh, sharding.logical_to_spec(names, table)), state, slot_axes(state)
    )


def _sample(logits_bv, p, step_b, passes):
    keys_b = row_keys(p.seeds, step_b)
    return sample_tokens(logits_bv, p.temperature, p.top_p, p.top_k, keys_b, passes)


def _hits(tok_b, p):
    return (tok_b[:, None] == p.stop_ids).any(-1)


def fill_slots(
    state: SlotState,
    prompt: KVCache,
    logits_kv: jax.Array,
    src_b: jax.Array,
    p,
    passes: tuple[str, ...] = PASSES,
) -> SlotState:
    """Writes prefilled prompts into slots and samples each filled slot's first token.

    Args:
      state: the slots (donated by the caller's program).
      prompt: the prefill's cache (L, k, T, K, H) of k prompts; logits_kv: their last-token logits.
      src_b: (B,) the prompt row each slot takes (one prompt may fill several slots: shared prefill), -1 to
        leave the slot as it is.
      p: SlotParams (as device arrays) with the filled slots' requests already assigned.
      passes: the sampling passes the slots' requests need (`sampling.sampling_passes`; static).
    """
    b = src_b.shape[0]
    t, s = prompt.max_len, state.cache.max_len
    fill_b = src_b >= 0
    src_b = jnp.maximum(src_b, 0)
    dest_b = jnp.where(fill_b, jnp.arange(b), b)  # out of range: the write is dropped
    # The copy is the shared prefill: G slots read one prompt row (no recompute of the images).
    cache = state.cache
    k = cache.k.at[:, dest_b, :t].set(prompt.k[:, src_b].astype(cache.k.dtype), mode="drop")
    v = cache.v.at[:, dest_b, :t].set(prompt.v[:, src_b].astype(cache.v.dtype), mode="drop")
    rows_bs = jnp.zeros((b, s), jnp.int32).at[:, :t].set(prompt.mask[src_b])
    mask = cache.mask.at[dest_b].set(rows_bs, mode="drop")
    tok_b, lp_b = _sample(logits_kv[src_b], p, jnp.zeros((b,), jnp.int32), passes)
    hit_b = _hits(tok_b, p)
    return SlotState(
        cache=KVCache(k=k, v=v, mask=mask),
        tokens=state.tokens.at[dest_b, 0].set(tok_b, mode="drop"),
        logprobs=state.logprobs.at[dest_b, 0].set(lp_b, mode="drop"),
        last=jnp.where(fill_b, tok_b, state.last),
        count=jnp.where(fill_b, 1, state.count),
        done=jnp.where(fill_b, hit_b | (p.max_new <= 1), state.done),
        stopped=jnp.where(fill_b, hit_b, state.stopped),
    )


def decode_steps(
    step_fn, state: SlotState, p, exit_after: jax.Array, passes: tuple[str, ...] = PASSES
) -> SlotState:
    """Decodes every live slot one token per step until `exit_after` slots are done (or all are).

    A slot's token j is fed at cache slot base + j with position next_pos + j on all three M-RoPE axes
    (text after the prompt) and its draw is keyed by (seed, j) alone, so a request's tokens do not depend
    on its slot, its batch-mates or when it was filled.

    Args:
      step_fn: (tokens (B,), positions (B,), cache slots (B,), cache) -> (logits (B, V), cache).
      p: SlotParams as device arrays.
      exit_after: int32 scalar, the done-slot count at which to return (so the host can refill them).
      passes: the sampling passes the slots' requests need (`sampling.sampling_passes`; static).
    """
    b, n = state.tokens.shape
    s = state.cache.max_len
    rows = jnp.arange(b)

    def cond(carry):
        i, st = carry
        return (i < n) & (jnp.sum(st.done) < jnp.minimum(exit_after, b))

    def body(carry):
        i, st = carry
        j_b = st.count - 1  # index of the token fed now
        logits_bv, cache = step_fn(st.last, p.next_pos + j_b, jnp.clip(p.base + j_b, 0, s - 1), st.cache)
        tok_b, lp_b = _sample(logits_bv, p, st.count, passes)
        active_b = ~st.done
        at_b = jnp.where(active_b, st.count, n)  # finished and empty slots write nothing
        hit_b = active_b & _hits(tok_b, p)
        count_b = st.count + active_b
        st = SlotState(
            cache=cache,
            tokens=st.tokens.at[rows, at_b].set(tok_b, mode="drop"),
            logprobs=st.logprobs.at[rows, at_b].set(lp_b, mode="drop"),
            last=jnp.where(active_b, tok_b, st.last),
            count=count_b,
            done=st.done | hit_b | (count_b >= p.max_new),
            stopped=st.stopped | hit_b,
        )
        return i + 1, constrain_slots(st)

    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state
