"""In-process JAX sampler (a rollout Policy): continuous batching over decode slots with shared prefill.

Identical prompts (GRPO's G samples) are prefilled once and their KV rows copied to every slot; finished slots
are refilled from the waiting requests. Weights are jit arguments (an update never recompiles), the slot state
is donated to each program, and shapes are bucketed (slots, prompt, patches, new tokens), so a rollout
compiles a handful of programs: `prefill` (encode prompts into given slots) and `decode` (the step loop).
"""

import collections
import contextlib
import functools
import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.models.qwen25vl import check_vision_tokens, init_cache
from pixel_reasoner_jax.processing.batch import pick_bucket, pixels_in
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.kv_slots import (
    SlotState,
    constrain_slots,
    decode_steps,
    fill_slots,
    init_slots,
    slot_shardings,
)
from pixel_reasoner_jax.rollout.policy import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationRequest,
    GenerationResult,
    Policy,
)
from pixel_reasoner_jax.rollout.sampler_inputs import (
    MIN_STOP_SLOTS,
    ExpandedRequest,
    PromptBatch,
    SlotParams,
    check_fits,
    expand_request,
    pack_prompts,
    prompt_groups,
    request_label,
    stop_slots,
)
from pixel_reasoner_jax.rollout.sampling import PASSES, sample_tokens, sampling_passes, truncation_mask

__all__ = ["JaxSampler", "sample_tokens", "truncation_mask"]


class JaxSampler(Policy):
    """Batched token-in/token-out generation with the project's Qwen2.5-VL.

    Args:
      model: a `Qwen25VL`; its graph is split once and its parameters become jit arguments.
      cfg: its architecture; image_cfg: patch sizes (media arrive at their final size, never resized).
      max_batch: decode slots; longer request lists wait and fill slots as they free up.
      refill_fraction: a decode call returns to refill once this share of the slots (at least one, at most
        the waiting requests) is free; smaller refills sooner, larger prefills more prompts per call.
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
        refill_fraction: float = 0.25,
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
        if not 0 < refill_fraction <= 1:
            raise ValueError(f"refill_fraction must be in (0, 1], got {refill_fraction}")
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
        self.refill_fraction = refill_fraction
        self._mesh, self._rules = mesh, rules
        self._cache_dtype = cache_dtype or model.dtype
        self._pixel_dtype = model.dtype  # prompts' pixels in the compute dtype (`batch.pixels_in`)
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
        self._stats = {"prompts_prefilled": 0, "slots_filled": 0, "decode_calls": 0}
        self._vision_shapes: set[tuple[int, ...]] = set()
        self._lock = threading.Lock()
        self._init = jax.jit(self._init_fn, static_argnums=(0, 1, 2))
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(2,), static_argnames=("passes",))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(2,), static_argnames=("passes",))

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

    @property
    def stats(self) -> dict[str, int]:
        """Running totals: prompts prefilled, slots filled from them (more when G samples share a prefill),
        and decode calls (one more per refill)."""
        return dict(self._stats)

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
        """One result per request, in order, decoded in up to `max_batch` slots at a time.

        Requests with identical prompts share one prefill; a finished slot takes the next waiting request.
        A request's tokens and log-probs depend on it alone (and the weights), not on its slot or batch-mates.

        Raises:
          ValueError: a malformed request (named), before any device work starts.
        """
        requests = list(requests)
        if not requests:
            return []
        groups = prompt_groups(requests)
        expanded: dict[int, ExpandedRequest] = {}
        for g in groups:
            i = g[0]
            expanded[i] = expand_request(requests[i], i, self.cfg, self.image_cfg)
        buckets = [
            check_fits(
                expanded[g[0]], request_label(g[0], requests[g[0]]), self.seq_buckets, self.patch_buckets
            )
            for g in groups
        ]
        seeds = [r.seed if r.seed is not None else int(self._rng.integers(1 << 63)) for r in requests]
        slots = -(-pick_bucket(len(requests), None) // self._batch_shards) * self._batch_shards
        slots = min(slots, self.max_batch)
        budget = max(r.sampling.max_new_tokens for r in requests)
        num_new = -(-budget // self.decode_bucket) * self.decode_bucket
        # One weight snapshot per call: every result is labelled with the version that produced it.
        params, version = self._weights
        run = _Run(requests, seeds, expanded, groups, SlotParams.empty(slots, stop_slots(requests)))
        with self._scope():
            state = self._init(slots, max(buckets) + num_new, num_new)
            while True:
                if run.queue and run.free:
                    state = self._fill(run, state, params)
                running = slots - len(run.free)
                if not running:
                    break
                waiting = sum(len(members) for members in run.queue)
                want = min(waiting, max(1, int(self.refill_fraction * slots))) if waiting else slots
                state = self._decode(
                    params, self._rest, state, run.params_now(), np.int32(len(run.free) + want),
                    passes=run.passes,
                )  # fmt: skip
                self._stats["decode_calls"] += 1
                run.collect(state, version)
        return run.results

    def trace(
        self,
        prompts: PromptBatch,
        slots: int,
        num_new: int,
        passes: tuple[str, ...] = PASSES,
    ) -> dict[str, jax.stages.Traced]:
        """The prefill and decode programs of a `generate` call, traced with the current weights at `slots`
        decode slots of `num_new` new tokens after `prompts` (one prefill call; its arrays may be
        ShapeDtypeStructs): ahead-of-time planning (`pixel_reasoner_jax.plan`). `passes` are the call's
        sampling passes (`sampling.sampling_passes` of the run's requests); the default holds every pass
        but the top-k one.

        The slot state is abstract and, under a mesh, placed as `constrain_slots` places it, so compiled
        memory is per device. Lower and compile under the sampler's mesh (`sharding.use_mesh(mesh, "rollout")`).
        """
        params, _ = self._weights
        cache_len = prompts.input_ids.shape[1] + num_new
        state = jax.eval_shape(functools.partial(self._init_fn, slots, cache_len, num_new))
        if self._mesh is not None:
            state = jax.tree.map(
                lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                state,
                slot_shardings(state, self._mesh, self._rules),
            )
        src_b = jax.ShapeDtypeStruct((slots,), jnp.int32)
        slot_p = SlotParams.empty(slots, MIN_STOP_SLOTS)
        with self._scope():
            prefill = self._prefill.trace(
                params, self._rest, state, prompts.input_ids, prompts.positions, prompts.attention_mask,
                pixels_in(prompts.pixel_values, self._pixel_dtype), prompts.vision_inputs, src_b, slot_p,
                passes=passes,
            )  # fmt: skip
            decode = self._decode.trace(params, self._rest, state, slot_p, np.int32(slots), passes=passes)
        return {"prefill": prefill, "decode": decode}

    # ------------------------------------------------------------------------------ device

    def _scope(self):
        if self._mesh is None:
            return contextlib.nullcontext()
        return sharding.use_mesh(self._mesh, self._rules)

    def _fill(self, run: "_Run", state: SlotState, params) -> SlotState:
        """Prefills the next waiting prompts (as many as free slots and the largest patch bucket allow)."""
        slot_rows = run.take(self.patch_buckets)
        rows = sorted(set(slot_rows.values()))
        k = -(-pick_bucket(len(rows), None) // self._batch_shards) * self._batch_shards
        k = min(k, len(run.owner))
        ex = [run.expanded[i] for i in rows]
        batch = pack_prompts(
            ex, self.cfg, batch_size=k, seq_buckets=self.seq_buckets, patch_buckets=self.patch_buckets
        )
        check_vision_tokens(batch.input_ids, batch.vision_inputs, self.cfg)
        self._stats["prompts_prefilled"] += len(rows)
        self._stats["slots_filled"] += len(slot_rows)
        src = np.full(len(run.owner), -1, np.int32)
        base = batch.input_ids.shape[1]
        for slot, leader in slot_rows.items():
            src[slot] = rows.index(leader)
            run.assign(slot, base)
        return self._prefill(
            params,
            self._rest,
            state,
            batch.input_ids,
            batch.positions,
            batch.attention_mask,
            pixels_in(batch.pixel_values, self._pixel_dtype),
            batch.vision_inputs,
            src,
            run.params_now(),
            passes=run.passes,
        )

    def _model(self, params, rest):
        return nnx.merge(self._graphdef, params, rest)

    def _init_fn(self, slots: int, cache_len: int, num_new: int) -> SlotState:
        return constrain_slots(init_slots(self.cfg, slots, cache_len, num_new, self._cache_dtype))

    def _prefill_fn(
        self,
        params,
        rest,
        state,
        ids_kt,
        positions_3kt,
        mask_kt,
        pixel_values,
        vision_inputs,
        src_b,
        slot_p,
        passes=PASSES,
    ):
        """Vision encode + splice + decoder over k left-padded prompts, written into the slots `src_b` names.

        Each filled slot also samples its first token from its prompt's last-token logits.
        """
        with self._lock:
            self._traces["prefill"] += 1
            if pixel_values is not None:
                vi = vision_inputs
                self._vision_shapes.add((*pixel_values.shape, *vi.window_gather.shape, *vi.slot_gather.shape))
        model = self._model(params, rest)
        prompt = init_cache(self.cfg, ids_kt.shape[0], ids_kt.shape[1], self._cache_dtype)
        hidden_ktd, prompt = model.hidden_states(
            ids_kt, positions_3kt, mask_kt, pixel_values, vision_inputs, cache=prompt, cache_index=0
        )
        logits_kv = model.logits(hidden_ktd[:, -1:])[:, 0]
        return constrain_slots(fill_slots(constrain_slots(state), prompt, logits_kv, src_b, slot_p, passes))

    def _decode_fn(self, params, rest, state, slot_p, exit_after, passes=PASSES):
        """Decodes the live slots until `exit_after` slots are done (kv_slots.decode_steps)."""
        with self._lock:
            self._traces["decode"] += 1
        model = self._model(params, rest)
        b = state.last.shape[0]

        def step(tok_b, pos_b, slot_b, cache):
            hidden_b1d, cache = model.hidden_states(
                tok_b[:, None],
                jnp.broadcast_to(pos_b[None, :, None], (3, b, 1)),
                jnp.ones((b, 1), jnp.int32),
                cache=cache,
                cache_index=slot_b,
            )
            return model.logits(hidden_b1d)[:, 0], cache

        # Returning the state lets XLA alias it with the donated input: the loop updates it in place.
        return decode_steps(step, constrain_slots(state), slot_p, exit_after, passes)


class _Run:
    """Host bookkeeping of one generate call: the waiting prompt groups, slot owners and results."""

    def __init__(self, requests, seeds, expanded, groups, params: SlotParams):
        self.requests, self.seeds, self.expanded = requests, seeds, expanded
        self.queue = collections.deque(list(g) for g in groups)  # members waiting; [0] leads the group
        self.owner = [-1] * params.base.shape[0]  # request index per slot
        self.leader = [-1] * params.base.shape[0]  # the group leader whose prefill a slot took
        self.params = params
        self.results: list[GenerationResult | None] = [None] * len(requests)
        # The call's sampling passes, static in its programs (greedy evals never pay for a draw, and runs
        # without top-k / top-p never for the truncation).
        self.passes = sampling_passes(
            [r.sampling.temperature for r in requests],
            [r.sampling.top_p for r in requests],
            [r.sampling.top_k for r in requests],
        )

    @property
    def free(self) -> list[int]:
        return [s for s, o in enumerate(self.owner) if o < 0]

    def take(self, patch_buckets) -> dict[int, int]:
        """Moves waiting requests into free slots: {slot: its group's leader} (the leader's prefill row).

        Whole groups first; a group larger than the free slots fills them and keeps its rest waiting.
        Prompts are added while their patch rows fit the largest patch bucket together.
        """
        out, free = {}, self.free
        limit = None if patch_buckets is None else max(patch_buckets)
        patches = 0
        while self.queue and free:
            members = self.queue[0]
            n = self.expanded[members[0]].pixel_values.shape[0]
            if out and limit is not None and patches + n > limit:
                break
            patches += n
            leader = members[0]
            while members and free:
                slot = free.pop(0)
                out[slot] = leader
                self.owner[slot], self.leader[slot] = members.pop(0), leader
            if members:
                # The rest keep the expansion and prefill again later (the slots ran out).
                self.expanded[members[0]] = self.expanded[leader]
            else:
                self.queue.popleft()
        return out

    def assign(self, slot: int, base: int) -> None:
        i = self.owner[slot]
        ex = self.expanded[self.leader[slot]]
        self.params.assign(slot, self.requests[i], self.seeds[i], ex.next_pos, base)

    def params_now(self) -> SlotParams:
        # Copies: the host edits these arrays at the next fill while the device may still read them.
        return jax.tree.map(np.copy, self.params)

    def collect(self, state: SlotState, version: str) -> None:
        """Results of the slots that finished; they become free."""
        done, count, stopped = (np.asarray(x) for x in (state.done, state.count, state.stopped))
        finished = [s for s, o in enumerate(self.owner) if o >= 0 and done[s]]
        if not finished:
            return
        tokens, logprobs = np.asarray(state.tokens), np.asarray(state.logprobs)
        for s in finished:
            n, stop = int(count[s]), bool(stopped[s])
            ids = tuple(int(x) for x in tokens[s, :n])
            self.results[self.owner[s]] = GenerationResult(
                output_ids=ids,
                logprobs=tuple(float(x) for x in logprobs[s, :n]),
                finish_reason=FINISH_STOP if stop else FINISH_LENGTH,
                matched_stop=ids[-1] if stop else None,
                weight_version=version,
                prompt_tokens=self.expanded[self.leader[s]].length,
            )
            self.owner[s] = self.leader[s] = -1


def _place_like(old: jax.Array, x) -> jax.Array:
    """`x` on `old`'s sharding in `old`'s dtype; host arrays are cast on the host, before the transfer."""
    if not isinstance(x, jax.Array):
        x = np.asarray(x, dtype=old.dtype)
    x = jax.device_put(x, old.sharding)
    return x if x.dtype == old.dtype else x.astype(old.dtype)


def _place_abstract(x, sh):
    """`device_put`, except that a ShapeDtypeStruct (an abstract model) only takes the sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    return jax.device_put(x, sh)
