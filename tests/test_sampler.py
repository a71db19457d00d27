"""The in-process JAX sampler: log-probs, parity with transformers' greedy generate, batching, seeds,
stops, weight updates without recompiles, a sharded mesh, and request validation."""

import copy
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from PIL import Image

from pixel_reasoner_jax.models import hf_io
from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.kv_slots import slot_shardings
from pixel_reasoner_jax.rollout.policy import GenerationRequest, SamplingParams, Video
from pixel_reasoner_jax.rollout.sampler import JaxSampler, sample_tokens, truncation_mask
from pixel_reasoner_jax.rollout.sampler_inputs import PromptBatch, expand_request, pack_prompts
from pixel_reasoner_jax.rollout.sampling import PASSES, sampling_passes
from pixel_reasoner_jax.sharding import make_mesh, use_mesh

IM_START, IM_END, VS, VE = 151644, 151645, 151652, 151653
IMG, VID = 151655, 151656
NEW = 8
# One compiled shape per batch size for every request below: prompt + NEW <= 32 tokens, <= 256 patch rows.
T_BUCKET = 32
KW = dict(max_batch=4, seq_buckets=(T_BUCKET,), patch_buckets=(256,), decode_bucket=NEW)


def image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def prompt(*items, text=(100, 200)) -> tuple[int, ...]:
    """<|im_start|> text, then per item (IMG or VID) a vision block with ONE pad and more text."""
    ids = [IM_START, *text]
    for k, pad in enumerate(items):
        ids += [VS, pad, VE, 300 + k]
    return tuple(ids)


def req(ids, media=(), rid="", seed=None, **sampling) -> GenerationRequest:
    sp = dict(max_new_tokens=NEW, temperature=0.0)
    sp.update(sampling)
    return GenerationRequest(tuple(ids), tuple(media), SamplingParams(**sp), rid=rid, seed=seed)


def mixed_requests(**sampling) -> list[GenerationRequest]:
    """Four prompts of different lengths: one image, two images of different sizes, text, video + image."""
    video = Video(frames=(image(56, 56, 20), image(56, 56, 21)), fps=2.0)
    return [
        req(prompt(IMG), (image(56, 84, 1),), rid="a", seed=11, **sampling),
        req(
            prompt(IMG, IMG, text=(5, 6, 7)),
            (image(56, 56, 2), image(112, 56, 3)),
            rid="b",
            seed=12,
            **sampling,
        ),
        req(prompt(text=tuple(range(400, 420))), rid="c", seed=13, **sampling),
        req(prompt(VID, IMG), (video, image(84, 56, 4)), rid="d", seed=14, **sampling),
    ]


@pytest.fixture(scope="module")
def setup(tiny_ckpt):
    cfg = ModelConfig.from_pretrained(tiny_ckpt)
    image_cfg = ImageProcessorConfig.from_pretrained(tiny_ckpt)
    model = hf_io.load_model(tiny_ckpt)
    sampler = JaxSampler(model, cfg, image_cfg, **KW)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)

    @jax.jit
    def score(params, ids, pos, mask, pix, vi, temperature_b):
        """Full forward; for the last NEW tokens: log-prob under log_softmax(logits / T), and the argmax."""
        m = nnx.merge(graphdef, params)
        hidden, _ = m.hidden_states(ids, pos, mask, pix, vi)
        logits = m.logits(hidden[:, -NEW - 1 : -1])  # rows predicting the (left-padded) last NEW tokens
        logp = jax.nn.log_softmax(logits / temperature_b[:, None, None], axis=-1)
        return jnp.take_along_axis(logp, ids[:, -NEW:, None], axis=-1)[..., 0], jnp.argmax(logits, axis=-1)

    def recompute(requests, results, params=params):
        """(log-probs, argmax) of each result's output ids, recomputed over prompt + output."""
        full = [
            dataclasses.replace(r, input_ids=r.input_ids + res.output_ids)
            for r, res in zip(requests, results)
        ]
        expanded = [expand_request(r, i, cfg, image_cfg) for i, r in enumerate(full)]
        b = pack_prompts(expanded, cfg, batch_size=len(full), seq_buckets=(T_BUCKET,), patch_buckets=(256,))
        temps = np.array([r.sampling.temperature or 1.0 for r in requests], np.float32)  # greedy: raw logits
        lp, best = score(
            params, b.input_ids, b.positions, b.attention_mask, b.pixel_values, b.vision_inputs, temps
        )
        lp, best = np.asarray(lp), np.asarray(best)
        return [
            (lp[row, NEW - len(res.output_ids) :], best[row, NEW - len(res.output_ids) :])
            for row, res in enumerate(results)
        ]

    return dict(
        cfg=cfg, image_cfg=image_cfg, model=model, sampler=sampler, params=params, recompute=recompute
    )


# ------------------------------------------------------------------------------- log-probs and parity


def test_sampled_logprobs_equal_recomputed_full_forward(setup):
    sampler = setup["sampler"]
    requests = mixed_requests(temperature=1.0)
    # A tempered, truncated row: log-probs stay those of the full tempered distribution.
    requests[2] = dataclasses.replace(requests[2], sampling=SamplingParams(NEW, temperature=0.6, top_p=0.8))
    results = sampler.generate(requests)
    for res, r, (lp, _) in zip(results, requests, setup["recompute"](requests, results)):
        assert len(res.output_ids) == NEW and res.finish_reason == "length" and res.matched_stop is None
        assert res.prompt_tokens == len(expand_request(r, 0, setup["cfg"], setup["image_cfg"]).input_ids)
        np.testing.assert_allclose(res.logprobs, lp, atol=1e-4, rtol=0)
    # SGLang's rule: collapsed length + sum(tokens per item - 1), tokens = (H/28) * (W/28) per frame pair.
    assert [r.prompt_tokens for r in results] == [7 + 5, 12 + 3 + 7, 21, 11 + 3 + 5]


def test_greedy_equals_transformers_generate(setup, tiny_ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration

    r = req(prompt(IMG), (image(56, 84, 1),))
    (res,) = setup["sampler"].generate([r])
    ex = expand_request(r, 0, setup["cfg"], setup["image_cfg"])
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    gen_cfg = copy.deepcopy(hf.generation_config)
    gen_cfg.eos_token_id = None  # run the full budget, as the request (no stop ids) does
    gen_cfg.max_new_tokens, gen_cfg.do_sample = NEW, False
    gen_cfg.output_logits = gen_cfg.return_dict_in_generate = True
    ids = torch.tensor(ex.input_ids[None].astype(np.int64))
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=(ids == IMG).long(),
            pixel_values=torch.tensor(ex.pixel_values),
            image_grid_thw=torch.tensor(ex.grid_thw),
            generation_config=gen_cfg,
        )
    hf_new = out.sequences[0, ids.shape[1] :].tolist()
    assert list(res.output_ids) == hf_new
    hf_lp = [torch.log_softmax(lg[0], -1)[t].item() for lg, t in zip(out.logits, hf_new)]
    np.testing.assert_allclose(res.logprobs, hf_lp, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- batching and sampling


def test_batch_independence_and_no_recompile(setup):
    sampler = setup["sampler"]
    requests = mixed_requests()
    together = sampler.generate(requests)
    for r, res in [(requests[i], together[i]) for i in (0, 1, 3)]:  # the rows with media, against 3 others
        (alone,) = sampler.generate([r])
        assert alone.output_ids == res.output_ids
        np.testing.assert_allclose(alone.logprobs, res.logprobs, atol=1e-4, rtol=0)
    # Each shape class (B=4, B=1) compiled once, whatever the prompt lengths and image sizes inside it.
    counts = sampler.compile_counts
    sampler.generate(requests[::-1])
    sampler.generate([requests[1]])
    sampler.generate([dataclasses.replace(requests[0], media=(image(112, 112, 9),))])  # another image size
    assert sampler.compile_counts == counts


def test_seeded_sampling_reproducible_regardless_of_batch_mates(setup):
    sampler = setup["sampler"]
    requests = mixed_requests(temperature=1.0)
    first = sampler.generate(requests)
    again = sampler.generate(requests)
    assert [r.output_ids for r in first] == [r.output_ids for r in again]
    (alone,) = sampler.generate([requests[1]])
    assert alone.output_ids == first[1].output_ids
    # Same seed, same prompt: same draw in one batch; another seed: another draw.
    twins = [requests[0], requests[0], dataclasses.replace(requests[0], seed=99)]
    a, b, c = sampler.generate(twins)
    assert a.output_ids == b.output_ids == first[0].output_ids and c.output_ids != a.output_ids
    # Unseeded requests draw fresh seeds.
    free = sampler.generate([dataclasses.replace(requests[0], seed=None)] * 4)
    assert len({r.output_ids for r in free}) == 4


def _assert_same_as_alone(sampler, requests, results):
    for r, res in zip(requests, results):
        (alone,) = sampler.generate([r])
        assert alone.output_ids == res.output_ids, r.rid
        assert alone.finish_reason == res.finish_reason
        np.testing.assert_allclose(alone.logprobs, res.logprobs, atol=1e-4, rtol=0)


def test_shared_prefill_and_refilled_slots_equal_alone(setup):
    sampler = setup["sampler"]  # 4 slots
    base = mixed_requests(temperature=1.0)
    # G = 4 samples of one prompt (one holds a separate copy of the same image) with their own seeds and
    # budgets, then 3 requests that wait for slots: each fills the slot of a finished sample.
    group = [
        dataclasses.replace(base[0], rid=f"g{k}", seed=100 + k, sampling=SamplingParams(n, temperature=1.0))
        for k, n in enumerate((2, NEW, NEW, 4))
    ]
    group[3] = dataclasses.replace(group[3], media=(image(56, 84, 1),))
    waiting = [dataclasses.replace(r, sampling=SamplingParams(3, temperature=1.0)) for r in base[1:]]
    requests = group + waiting
    before = sampler.stats
    results = sampler.generate(requests)
    used = {k: v - before[k] for k, v in sampler.stats.items()}
    # One prefill for the four samples, one per waiting prompt; refills happen while others decode.
    assert used["prompts_prefilled"] == 4 and used["slots_filled"] == 7 and used["decode_calls"] >= 3
    assert [len(r.output_ids) for r in results] == [2, NEW, NEW, 4, 3, 3, 3]
    assert len({r.output_ids[:2] for r in results[:4]}) > 1  # the shared prompt's samples are distinct
    _assert_same_as_alone(sampler, requests, results)


def test_group_larger_than_the_slots_is_split(setup):
    sampler = setup["sampler"]  # 4 slots
    r = mixed_requests(temperature=1.0)[3]  # video + image
    requests = [dataclasses.replace(r, seed=200 + k, rid=f"s{k}") for k in range(6)]
    before = sampler.stats
    results = sampler.generate(requests)
    assert sampler.stats["prompts_prefilled"] - before["prompts_prefilled"] == 2  # 4 slots, then 2
    _assert_same_as_alone(sampler, requests[3:5], results[3:5])  # one from each prefill


def test_top_k_one_equals_greedy(setup):
    sampler = setup["sampler"]
    greedy = sampler.generate(mixed_requests())
    top1 = sampler.generate(mixed_requests(temperature=1.0, top_k=1))
    assert [r.output_ids for r in top1] == [r.output_ids for r in greedy]
    # temperature 1 log-probs are log_softmax(logits), the greedy ones too.
    for a, b in zip(top1, greedy):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


def test_stop_ids_and_length(setup):
    sampler = setup["sampler"]
    base = mixed_requests()
    ref = sampler.generate(base)
    toks = ref[0].output_ids
    j = next(i for i in range(1, NEW) if toks[i] not in toks[:i])
    stopped = dataclasses.replace(
        base[0], sampling=SamplingParams(NEW, temperature=0.0, stop_token_ids=(7, toks[j]))
    )
    short = dataclasses.replace(base[1], sampling=SamplingParams(3, temperature=0.0))
    a, b, c = sampler.generate([stopped, short, base[2]])
    assert a.output_ids == toks[: j + 1] and a.finish_reason == "stop" and a.matched_stop == toks[j]
    assert len(a.logprobs) == j + 1
    assert b.output_ids == ref[1].output_ids[:3] and b.finish_reason == "length" and b.matched_stop is None
    assert c.output_ids == ref[2].output_ids and c.finish_reason == "length"


def test_truncation_mask_matches_sorted_definition():
    mask_fn = jax.jit(truncation_mask)
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 300)).astype(np.float32) * 3
    top_p = np.array([1.0, 0.5, 0.9, 0.999, 1.0, 0.3], np.float32)
    top_k = np.array([5, -1, 20, -1, 1, 7], np.int32)
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    got = np.asarray(mask_fn(jnp.asarray(logp), jnp.asarray(top_p), jnp.asarray(top_k)))
    for r in range(6):
        order = np.argsort(-logp[r], kind="stable")
        p = np.exp(logp[r][order])
        before = np.cumsum(p) - p
        keep = (before < top_p[r]) | (np.arange(300) == 0)
        if top_k[r] > 0:
            keep &= np.arange(300) < top_k[r]
        want = np.zeros(300, bool)
        want[order[keep]] = True
        np.testing.assert_array_equal(got[r], want, err_msg=f"row {r}")


@pytest.mark.parametrize("static_passes", [False, True], ids=["bisection", "per-batch-passes"])
def test_sample_frequencies_follow_truncated_distribution(static_passes):
    # Also across the inverse CDF's 256-entry blocks: the five tokens sit at ids 0, 255, 256, 257, 599.
    n = 20000
    where = np.array([0, 255, 256, 257, 599])
    logits = jnp.full(600, -jnp.inf).at[where].set(jnp.log(jnp.array([0.4, 0.3, 0.2, 0.06, 0.04])))

    def freqs(top_p, top_k):
        passes = sampling_passes([1.0], [top_p], [top_k]) if static_passes else PASSES
        keys = jax.random.split(jax.random.key(0), n)
        tok, lp = jax.jit(functools.partial(sample_tokens, passes=passes))(
            jnp.broadcast_to(logits, (n, 600)),
            jnp.ones(n),
            jnp.full(n, top_p),
            jnp.full(n, top_k, jnp.int32),
            keys,
        )
        assert np.isin(np.asarray(tok), where).all()  # never a zero-probability id
        tok = np.searchsorted(where, np.asarray(tok))  # back to 0..4
        np.testing.assert_allclose(lp, np.log([0.4, 0.3, 0.2, 0.06, 0.04])[np.asarray(tok)], atol=1e-5)
        return np.bincount(np.asarray(tok), minlength=5) / n

    np.testing.assert_allclose(freqs(1.0, -1), [0.4, 0.3, 0.2, 0.06, 0.04], atol=0.015)
    np.testing.assert_allclose(freqs(1.0, 2), [4 / 7, 3 / 7, 0, 0, 0], atol=0.015)
    np.testing.assert_allclose(freqs(0.75, -1), [4 / 9, 3 / 9, 2 / 9, 0, 0], atol=0.015)
    np.testing.assert_allclose(freqs(0.5, 3), [4 / 7, 3 / 7, 0, 0, 0], atol=0.015)
    np.testing.assert_allclose(freqs(0.9, 3), [4 / 9, 3 / 9, 2 / 9, 0, 0], atol=0.015)


# ------------------------------------------------------------------------------- weights, mesh, errors


def test_update_weights_changes_outputs_without_recompiling(setup):
    sampler = setup["sampler"]
    requests = mixed_requests()
    old = sampler.generate(requests)
    counts = sampler.compile_counts
    rng = np.random.default_rng(5)
    state = nnx.state(setup["model"], nnx.Param)
    new = jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(np.float32), setup["params"])
    sampler.update_weights(new, "7")
    assert sampler.weight_version == "7"
    fresh = sampler.generate(requests)
    assert all(r.weight_version == "7" for r in fresh)
    assert [r.output_ids for r in fresh] != [r.output_ids for r in old]
    for res, (lp, best) in zip(fresh, setup["recompute"](requests, fresh, new)):
        assert list(res.output_ids) == best.tolist()
        np.testing.assert_allclose(res.logprobs, lp, atol=1e-4, rtol=0)
    # Host arrays of another dtype are cast and placed like the served ones: same programs, same outputs.
    sampler.update_weights(jax.tree.map(lambda x: np.asarray(x, np.float64), new), "7b")
    assert [r.output_ids for r in sampler.generate(requests)] == [r.output_ids for r in fresh]
    assert sampler.compile_counts == counts
    sampler.update_weights(state, "8")  # an nnx.State works too
    assert [r.output_ids for r in sampler.generate(requests)] == [r.output_ids for r in old]
    with pytest.raises(ValueError, match="lm_head"):
        sampler.update_weights({k: v for k, v in new.items() if k != "lm_head"}, "9")
    assert sampler.compile_counts == counts and sampler.weight_version == "8"


def test_sharded_mesh_with_chunks_matches_single_device(setup):
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    sampler = JaxSampler(
        setup["model"], setup["cfg"], setup["image_cfg"], mesh=mesh, **{**KW, "max_batch": 2}
    )
    kernel = sampler._weights[0]["lm_head"]["kernel"]
    assert "tensor" in str(kernel.sharding.spec)
    requests = [mixed_requests()[i] for i in (0, 2, 3)]  # chunks of 2 and 1 rows, both with media
    got = sampler.generate(requests)
    want = setup["sampler"].generate(requests)
    for a, b in zip(got, want):
        assert a.output_ids == b.output_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    assert sampler.compile_counts == {"prefill": 1, "decode": 1, "vision": 1}  # both chunks: B=2


def test_trace_places_the_slot_state_as_generate_does(setup):
    # The planner's programs: traced from ShapeDtypeStructs of a real prompt batch, the slot state enters
    # decode placed as constrain_slots places it (batch over data, kv heads over tensor), so compiled
    # memory is per device; prefill takes the per-sample vision rows.
    cfg, image_cfg = setup["cfg"], setup["image_cfg"]
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    sampler = JaxSampler(setup["model"], cfg, image_cfg, mesh=mesh, **{**KW, "max_batch": 2})
    ex = [expand_request(r, i, cfg, image_cfg) for i, r in enumerate(mixed_requests()[:2])]
    batch = pack_prompts(ex, cfg, batch_size=2, seq_buckets=(T_BUCKET,), patch_buckets=(256,))
    to_struct = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    structs = PromptBatch(
        *(to_struct(getattr(batch, f)) for f in ("input_ids", "attention_mask", "positions", "pixel_values")),
        jax.tree.map(to_struct, batch.vision_inputs),
    )
    progs = sampler.trace(structs, 2, NEW)
    state = jax.eval_shape(lambda: sampler._init_fn(2, T_BUCKET + NEW, NEW))
    want = slot_shardings(state, mesh, "rollout")
    assert want.cache.k.spec == P(None, ("data", "fsdp"), None, "tensor", None)
    assert want.tokens.spec == P(("data", "fsdp"), None)
    with use_mesh(mesh, "rollout"):
        compiled = progs["decode"].lower().compile()
    got = compiled.input_shardings[0][2]
    for leaf, g, w in zip(jax.tree.leaves(state), jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.is_equivalent_to(w, leaf.ndim), (g, w)
    assert progs["prefill"].args_info[0][6].shape == batch.pixel_values.shape


def test_prefill_takes_pixels_in_the_compute_dtype(setup, tiny_ckpt):
    # A bfloat16 sampler's prefill receives the prompts' pixels in bfloat16 (`batch.pixels_in`: the vision
    # tower casts them on entry, so the values it computes with are the same) whatever the batch holds.
    cfg, image_cfg = setup["cfg"], setup["image_cfg"]
    sampler = JaxSampler(hf_io.load_model(tiny_ckpt, dtype=jnp.bfloat16), cfg, image_cfg, **KW)
    ex = [expand_request(r, i, cfg, image_cfg) for i, r in enumerate(mixed_requests()[:2])]
    batch = pack_prompts(ex, cfg, batch_size=2, seq_buckets=(T_BUCKET,), patch_buckets=(256,))
    assert batch.pixel_values.dtype == np.float32
    to_struct = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
    structs = PromptBatch(
        *(to_struct(getattr(batch, f)) for f in ("input_ids", "attention_mask", "positions", "pixel_values")),
        jax.tree.map(to_struct, batch.vision_inputs),
    )
    args = sampler.trace(structs, 2, NEW)["prefill"].args_info[0]
    assert args[6].dtype == jnp.bfloat16 and args[6].shape == batch.pixel_values.shape
    assert args[3].dtype == batch.input_ids.dtype


def test_bad_requests_name_the_request(setup):
    sampler = setup["sampler"]
    good = mixed_requests()[0]
    with pytest.raises(ValueError, match=r"request 1 \(rid 'x'\).*2 image/video pads but 1 media"):
        sampler.generate([good, req(prompt(IMG, IMG), (image(56, 56, 0),), rid="x")])
    with pytest.raises(ValueError, match=r"request 0 \(rid 'odd'\).*50x56.*multiples of 28"):
        sampler.generate([req(prompt(IMG), (image(50, 56, 0),), rid="odd")])
    with pytest.raises(ValueError, match=r"request 0.*pad kinds \['image'\] do not match.*\['video'\]"):
        sampler.generate([req(prompt(IMG), (Video((image(56, 56, 0),) * 2),))])
    with pytest.raises(
        ValueError, match=r"request 0 \(rid 'long'\).*longer than the largest sequence bucket 32"
    ):
        sampler.generate([req(tuple(range(100, 180)), rid="long")])


def test_sampling_passes_name_what_a_batch_needs():
    assert sampling_passes([0.0, 0.0], [1.0, 0.5], [-1, 3]) == ("greedy",)  # greedy rows never truncate
    assert sampling_passes([1.0, 0.0], [1.0, 1.0], [-1, -1]) == ("greedy", "sample")
    assert sampling_passes([1.0], [0.95], [40]) == ("topk:64",)  # the recipe's top-k, in 64 candidates
    assert sampling_passes([1.0, 1.0], [0.9, 1.0], [-1, 20]) == ("sample", "truncate", "topk:32")
    assert sampling_passes([1.0], [1.0], [5000]) == ("sample", "truncate")  # above TOPK_CAP: bisection
    with pytest.raises(ValueError, match="unknown pass"):
        sample_tokens(jnp.zeros((1, 4)), jnp.ones(1), jnp.ones(1), -jnp.ones(1, jnp.int32), None, ("top",))
