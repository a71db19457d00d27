"""Jitted SFT / GRPO steps: loss masking, exact accumulation, the GRPO gradient by hand, sharded equals
single-device, frozen vision; on a small-vocabulary Qwen2.5-VL with images in every sample.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_options import FAST_COMPILE
from flax import nnx

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.config import GRPOConfig
from pixel_reasoner_jax.models.config import PRESETS
from pixel_reasoner_jax.models.qwen25vl import Qwen25VL
from pixel_reasoner_jax.processing.batch import Example, pack_vision
from pixel_reasoner_jax.processing.rope import get_rope_index
from pixel_reasoner_jax.train import replay, steps
from pixel_reasoner_jax.train import state as st

# A 320-token vocabulary keeps the (B, T, V) log-softmax cheap on CPU; the special ids sit above the text ids.
TEXT_IDS = 290
IMG, VID, VS, VE, PAD = 300, 301, 302, 303, 304
TINY = PRESETS["tiny"]
CFG = dataclasses.replace(
    TINY,
    text=dataclasses.replace(TINY.text, vocab_size=320),
    image_token_id=IMG,
    video_token_id=VID,
    vision_start_token_id=VS,
    vision_end_token_id=VE,
    bos_token_id=305,
    eos_token_id=306,
).validate()
PATCH_DIM = CFG.vision.patch_dim
SEQ_BUCKETS = (64, 96)
PATCH_BUCKETS = (64, 128, 256)
# The train functions' log-prob chunk and the trained-position buckets `stack` pads to (model.logprob_chunk,
# model.logprob_bucket_steps).
STACK = dict(logprob_chunk=32, bucket_steps=4)
GRPO = steps.GRPOLossSettings(
    eps_low=0.2, eps_high=0.28, loss_agg="token-mean", kl_coef=0.05, entropy_coef=0.0, tis_cap=2.0, max_len=96
)
# eps 1e-6, not 1e-8: the k_proj bias gradient is zero in exact arithmetic (softmax is shift invariant), so
# Adam with a tiny eps turns its float32 rounding noise into full-size updates that differ between two
# equally valid summation orders (1 vs 8 devices); a larger eps keeps that noise below 1e-6.
OPTIM = st.OptimConfig(lr=1e-3, total_steps=10, warmup_steps=0, schedule="constant", grad_clip=1.0, eps=1e-6)


def make_example(rng: np.random.Generator, n_answer: int, qid: str) -> Example:
    """system, user (text + image), assistant (trained), tool observation (text + image), a masked
    erroneous assistant turn, final assistant answer (trained); token alignment as `Example` wants."""
    ids: list[int] = []
    mask: list[int] = []
    grids: list[tuple[int, int, int]] = []

    def text(n, trained):
        ids.extend(rng.integers(0, TEXT_IDS, n).tolist())
        mask.extend([int(trained)] * n)

    def image(grid):
        n = int(np.prod(grid)) // CFG.vision.merge_unit
        ids.extend([VS] + [IMG] * n + [VE])
        mask.extend([0] * (n + 2))
        grids.append(grid)

    text(5, False)  # system
    text(3, False)  # user
    image((1, 4, 4))
    text(4, True)  # assistant: a tool call
    text(3, False)  # tool observation
    image((1, 2, 4))
    text(3, False)  # erroneous assistant turn, masked (self-correction data)
    text(n_answer, True)  # final answer
    input_ids = np.asarray(ids, np.int32)
    grid_thw = np.asarray(grids, np.int64)
    positions, _ = get_rope_index(
        input_ids,
        image_grid_thw=grid_thw,
        spatial_merge_size=CFG.vision.spatial_merge_size,
        tokens_per_second=CFG.vision.tokens_per_second,
        image_token_id=IMG,
        video_token_id=VID,
    )
    is_pad = np.concatenate([[0], (input_ids == IMG).astype(np.int8), [0]])
    edges = np.diff(is_pad)
    spans = np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], 1)
    n_rows = int(grid_thw.prod(1).sum())
    loss_mask = np.asarray(mask, np.int8)
    return Example(
        input_ids=input_ids,
        loss_mask=loss_mask,
        logprobs=np.where(loss_mask > 0, rng.uniform(-3.0, -0.1, len(ids)), 0.0).astype(np.float32),
        positions=positions[:, 0],
        pixel_values=rng.standard_normal((n_rows, PATCH_DIM)).astype(np.float32),
        grid_thw=grid_thw,
        is_video=np.zeros(len(grids), bool),
        second_per_grid_ts=np.zeros((0,), np.float32),
        vision_spans=spans.astype(np.int64),
        qid=qid,
    )


def make_examples(n: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [make_example(rng, int(rng.integers(2, 20)), f"q{seed}-{i}") for i in range(n)]


def split(examples, n_micro, **kw):
    kw = dict(pad_id=PAD, vision_cfg=CFG.vision, seq_buckets=SEQ_BUCKETS, patch_buckets=PATCH_BUCKETS) | kw
    return steps.micro_batches(examples, n_micro, **kw)


def stacked(examples, n_micro) -> dict:
    return steps.stack(split(examples, n_micro), **STACK)


def host_params(seed: int = 0):
    """(graphdef, NumPy params) of a randomly initialised model.

    Filled on the host: the model's own initialisers run op by op and take ~20 s on a loaded CPU.
    Norm scales near 1, small kernels and biases, unit embeddings give O(1) activations.
    """
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Qwen25VL(CFG, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(seed)

    def init(keypath, var):
        name = st.path_str(keypath).rsplit("/", 1)[-1]
        shape = var.shape
        if name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "embedding":
            value = rng.standard_normal(shape)
        else:  # kernels and biases
            value = 0.1 * rng.standard_normal(shape)
        return var.replace(np.asarray(value, np.float32))

    params = jax.tree_util.tree_map_with_path(init, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, params


class Setup:
    """A model's host parameters and the train functions of one mesh; `state()` is a fresh TrainState."""

    def __init__(self, mesh, graphdef, params, frozen=None, grpo=GRPO, pixel_dtype=None):
        self.mesh, self.graphdef, self.params = mesh, graphdef, params
        self.optimizer = st.make_optimizer(OPTIM, frozen)
        _, _, self.shardings = st.create_train_state(self.model(), self.optimizer, mesh)
        self.fns = steps.make_train_fns(
            graphdef,
            self.optimizer,
            self.shardings,
            mesh,
            logprob_chunk=STACK["logprob_chunk"],
            grpo=grpo,
            schedule=st.make_schedule(OPTIM),
            frozen=frozen,
            compiler_options=FAST_COMPILE,
            pixel_dtype=pixel_dtype,
        )

    def model(self):
        # Fresh device buffers each time: the steps donate the state.
        with sharding.use_mesh(self.mesh):
            return nnx.merge(self.graphdef, jax.tree.map(jnp.array, self.params))

    def state(self) -> st.TrainState:
        return st.create_train_state(self.model(), self.optimizer, self.mesh)[1]


@pytest.fixture(scope="module")
def parts():
    return host_params()


@pytest.fixture(scope="module")
def one(parts):
    return Setup(sharding.make_mesh(devices=jax.devices()[:1]), *parts)


@pytest.fixture(scope="module")
def examples():
    return make_examples(8, seed=0)


@pytest.fixture(scope="module")
def big(examples):
    """The 8 examples as one micro-batch of 8 (the shape most tests share, so they share compiles)."""
    return stacked(examples, 1)


def host(tree):
    return jax.tree.map(np.asarray, tree)


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def rel_err(a, b) -> float:
    """Largest per-leaf ||a - b|| / ||b|| of two pytrees of the same structure."""
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    return max(float(np.linalg.norm(fa[k] - fb[k]) / max(np.linalg.norm(fb[k]), 1e-30)) for k in fa)


def test_sft_step_smoke(one, big):
    assert big["input_ids"].shape == (1, 8, 64) and big["pixel_values"].shape == (1, 8, 64, PATCH_DIM)
    state = one.state()
    before = host(state.params)
    state, metrics = one.fns.sft_step(state, big)
    m = {k: float(v) for k, v in metrics.items()}
    assert set(m) == {"loss", "grad_norm", "update_norm", "lr", "tokens", "entropy"}
    assert int(state.step) == 1 and m["lr"] == pytest.approx(1e-3)
    assert m["tokens"] == big["loss_mask"].sum()
    # A random model over 320 tokens: NLL and entropy of order log(320) = 5.77.
    assert 3.0 < m["loss"] < 12.0 and 2.0 < m["entropy"] < 5.8
    assert m["grad_norm"] > 0 and m["update_norm"] > 0
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, host(state.params))
    assert all(jax.tree.leaves(changed)), "every parameter (vision tower included) takes an update"
    state, metrics = one.fns.sft_step(state, big)
    assert float(metrics["loss"]) < m["loss"]  # the same batch again: one Adam step lowered its loss


# ------------------------------------------------------------------------------------------ host side


def test_micro_batches_share_buckets_and_stack(examples):
    batches = split(examples, 4)
    assert len(batches) == 4 and all(b.input_ids.shape == (2, 64) for b in batches)
    assert {b.pixel_values.shape for b in batches} == {(2, 64, PATCH_DIM)}  # per sample: 24 rows -> 64
    assert len({b.vision_inputs.window_gather.shape for b in batches}) == 1
    assert len({b.vision_inputs.slot_gather.shape for b in batches}) == 1
    micro = steps.stack(batches, **STACK)
    assert micro["positions"].shape == (4, 3, 2, 64) and micro["advantages"].shape == (4, 2)
    assert micro["vision_inputs"].perm.shape == (4, 2, 64)
    np.testing.assert_array_equal(micro["ref_logprobs"], 0.0)
    # Contiguous groups: micro-batch k holds examples 2k, 2k + 1.
    for k, b in enumerate(batches):
        np.testing.assert_array_equal(b.lengths, [examples[2 * k].length, examples[2 * k + 1].length])
    # Trained targets are exactly the assistant tokens after the first (prediction alignment).
    n_trained = sum(int(ex.loss_mask[1:].sum()) for ex in examples)
    assert micro["loss_mask"].sum() == n_trained

    with pytest.raises(ValueError, match="8 examples do not split into 3"):
        split(examples, 3)
    no_media = dataclasses.replace(batches[1], pixel_values=None, vision_inputs=None)
    with pytest.raises(ValueError, match="all have vision items or none"):
        steps.stack([batches[0], no_media], **STACK)
    with pytest.raises(ValueError, match="does not divide over the 8 data-parallel devices"):
        steps.shard_batch(micro, sharding.make_mesh(2, 4, 1))


def test_micro_batches_share_the_slot_layout(examples):
    """Groups whose images differ in size still stack: one full-attention slot length for all groups (from
    the largest image of any), the slot count padded to the largest group's."""
    small = [(1, 2, 4)] * 3  # the same 24 patch rows and 6 merged tokens as (1, 4, 4) + (1, 2, 4)
    exs = [dataclasses.replace(ex, grid_thw=np.array(small)) for ex in examples[:2]] + list(examples[2:])
    alone = [pack_vision([e.pixel_values for e in g], [e.grid_thw for e in g], CFG.vision, patch_buckets=(64,))[1]
             for g in (exs[:2], exs[2:4])]  # fmt: skip
    assert [v.slot_gather.shape[1:] for v in alone] == [(3, 8), (2, 16)]  # apart they would not stack
    batches = split(exs, 4)
    assert {b.vision_inputs.slot_gather.shape for b in batches} == {(2, 2, 16)}
    micro = steps.stack(batches, **STACK)
    assert micro["vision_inputs"].slot_gather.shape == (4, 2, 2, 16)


def test_trained_values_round_trip_in_example_order(examples):
    micro = stacked(examples, 4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(micro["loss_mask"].shape).astype(np.float32)
    rows = replay.trained_values(x, micro["loss_mask"])
    # One row per example, in the order given: each holds its trained targets (assistant tokens after the first).
    assert [r.size for r in rows] == [int(ex.loss_mask[1:].sum()) for ex in examples]
    back = replay.with_trained_values(rows, micro["loss_mask"])
    np.testing.assert_array_equal(back, np.where(micro["loss_mask"] != 0, x, 0.0))
    with pytest.raises(ValueError, match="row 1 has"):
        replay.with_trained_values([rows[0], rows[1][:-1], *rows[2:]], micro["loss_mask"])
    with pytest.raises(ValueError, match="values for 7 rows"):
        replay.with_trained_values(rows[:-1], micro["loss_mask"])


def test_micro_batches_truncate_to_largest_bucket(examples):
    batches = split(examples, 2, seq_buckets=(32,))
    cut = np.concatenate([b.truncated for b in batches])
    np.testing.assert_array_equal(cut, [ex.length > 32 for ex in examples])
    assert all(b.input_ids.shape == (4, 32) for b in batches)
    with pytest.raises(ValueError, match="pass truncate=True"):
        split(examples, 2, seq_buckets=(32,), truncate=False)


def test_grpo_settings_from_config():
    given = dict(
        eps_low=0.2, eps_high=0.3, kl_coef=0.0, entropy_coef=0.01, tis_cap=0.0, loss_agg="seq-mean-token-mean"
    )
    cfg = GRPOConfig(**({f.name: 1 for f in dataclasses.fields(GRPOConfig)} | given))
    s = steps.GRPOLossSettings.from_config(cfg, 512, temperature=0.7)
    assert (s.eps_low, s.eps_high, s.tis_cap, s.max_len, s.temperature) == (0.2, 0.3, None, 512, 0.7)
    assert steps.GRPOLossSettings.from_config(dataclasses.replace(cfg, tis_cap=2.0), 8).tis_cap == 2.0
    with pytest.raises(ValueError, match="loss_agg"):
        steps.GRPOLossSettings.from_config(dataclasses.replace(cfg, loss_agg="mean"), 8)


# ------------------------------------------------------------------------------------------ device side


def grpo_inputs(micro, lp0, seed):
    """Old / sampler / reference log-probs near the current ones, and random advantages."""
    rng = np.random.default_rng(seed)
    out = dict(micro)
    old = lp0 + 0.1 * rng.standard_normal(lp0.shape)
    out["old_logprobs"] = old.astype(np.float32)
    out["sampler_logprobs"] = (old + 0.4 * rng.standard_normal(lp0.shape)).astype(np.float32)
    out["ref_logprobs"] = (lp0 + 0.2 * rng.standard_normal(lp0.shape)).astype(np.float32)
    out["advantages"] = rng.standard_normal(micro["advantages"].shape).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def lp0(one, big):
    """Current log-probs of the targets of `big` under the initial parameters, (1, 8, T)."""
    lp = np.asarray(one.fns.logprobs(one.state().params, big))
    assert lp.shape == big["targets"].shape and lp.dtype == np.float32
    return lp


def test_masked_tokens_get_zero_gradient(one, big, lp0):
    """System, user, tool-observation and masked assistant tokens (and padding): changing what is there
    (targets, old / sampler / reference log-probs) leaves the gradient bit-identical."""
    state = one.state()
    rng = np.random.default_rng(1)
    free = big["loss_mask"] == 0
    micro = grpo_inputs(big, lp0, seed=2)
    other = dict(micro)
    other["targets"] = np.where(free, rng.integers(0, TEXT_IDS, free.shape), micro["targets"]).astype(
        np.int32
    )
    for key in ("old_logprobs", "sampler_logprobs", "ref_logprobs"):
        other[key] = np.where(free, micro[key] - 3.0, micro[key]).astype(np.float32)
    assert (other["targets"] != micro["targets"]).sum() > 100
    for kind in ("sft", "grpo"):
        a, b = one.fns.grads(state, micro, kind), one.fns.grads(state, other, kind)
        assert float(a.loss) == float(b.loss) and float(a.denom) == float(b.denom)
        for x, y in zip(jax.tree.leaves(host(a.grads)), jax.tree.leaves(host(b.grads))):
            np.testing.assert_array_equal(x, y)
    # The check has teeth: changing one trained target changes the gradient.
    t = tuple(np.argwhere(~free)[0])
    third = dict(micro, targets=micro["targets"].copy())
    third["targets"][t] = (third["targets"][t] + 1) % TEXT_IDS
    a, c = one.fns.grads(state, micro, "sft"), one.fns.grads(state, third, "sft")
    assert rel_err(c.grads, a.grads) > 1e-6


def test_trained_positions_only_projection_is_exact(one, big, lp0):
    """Projecting only the trained positions onto the vocabulary (steps.loss_index) gives the loss and
    gradient of projecting every position, and its index lists exactly the trained positions."""
    idx, valid = big["loss_index"], big["loss_valid"]
    assert valid.sum() == (big["loss_mask"] != 0).sum() and idx.shape[-1] < big["loss_mask"].shape[-1]
    np.testing.assert_array_equal(np.take_along_axis(big["loss_mask"], idx, -1)[valid], 1)
    state = one.state()
    micro = grpo_inputs(big, lp0, seed=3)
    full = {k: v for k, v in micro.items() if k not in ("loss_index", "loss_valid")}
    for kind in ("sft", "grpo"):
        a, b = one.fns.grads(state, micro, kind), one.fns.grads(state, full, kind)
        np.testing.assert_allclose(float(a.loss), float(b.loss), rtol=1e-6)
        assert rel_err(a.grads, b.grads) < 1e-6


def test_loss_buckets_bound_the_padding():
    """`loss_bucket`: quarter-octave widths up to one log-prob chunk (at most 25 % padding, 100 % with
    powers of two), whole chunks past it (the log-prob pass pads to them), never below the minimum."""
    b = steps.loss_bucket
    assert [b(n, 1024, 4) for n in (1, 16, 17, 21, 100, 129, 161, 513, 641, 1024)] == [
        16, 16, 20, 24, 112, 160, 192, 640, 768, 1024
    ]  # fmt: skip
    assert [b(n, 1024, 1) for n in (17, 100, 513, 1024)] == [32, 128, 1024, 1024]
    assert [b(n, 128, 4) for n in (129, 300, 513)] == [256, 384, 640]
    assert b(90, 96, 4) == 96  # a chunk that is not a power of two caps the buckets below it
    for chunk in (96, 128, 1024):
        for n in range(1, 3000):
            k = b(n, chunk, 4)
            assert k >= max(n, 16), (n, chunk, k)
            if n > chunk:
                assert k % chunk == 0 and k - n < chunk, (n, chunk, k)
            elif n > 16:
                assert k <= 1.25 * n + 1 or k == chunk, (n, chunk, k)
    with pytest.raises(ValueError, match="steps"):
        b(10, 1024, 0)
    # The width of loss_index: the model_step benchmark's 513 trained of 770 project 640 (770 with powers
    # of two, capped at T).
    mask = np.zeros((2, 770), np.float32)
    mask[0, :513] = 1
    mask[1, 100:400] = 1
    idx, valid = steps.loss_index(mask, 1024, 4)
    assert idx.shape == (2, 640) and valid.sum() == 813
    np.testing.assert_array_equal(idx[1, :300], np.arange(100, 400))
    assert steps.loss_index(mask, 1024, 1)[0].shape == (2, 770)


def test_exact_accumulation(one, big, lp0, examples):
    """4 micro-batches of 2 (uneven real lengths and trained-token counts) = one batch of 8."""
    small = stacked(examples, 4)
    state = one.state()
    for kind in ("sft", "grpo"):
        b = grpo_inputs(big, lp0, seed=3)
        s = dict(small)
        for key in ("old_logprobs", "sampler_logprobs", "ref_logprobs", "advantages"):
            # Same T bucket, contiguous groups: the small layout is a reshape of the big one.
            s[key] = b[key].reshape(small[key].shape)
        np.testing.assert_array_equal(s["loss_mask"].reshape(big["loss_mask"].shape), big["loss_mask"])
        assert len(set(s["loss_mask"].sum(axis=(1, 2)).tolist())) > 1, "micro-batches should be uneven"
        acc_small, acc_big = one.fns.grads(state, s, kind), one.fns.grads(state, b, kind)
        np.testing.assert_allclose(float(acc_small.loss), float(acc_big.loss), rtol=1e-6)
        assert float(acc_small.denom) == float(acc_big.denom) == big["loss_mask"].sum()
        assert rel_err(acc_small.grads, acc_big.grads) < 1e-6, kind


def test_on_policy_rows_take_old_logprobs_from_the_step_itself(one, big, lp0):
    """`old_current` rows (the params have not moved since sampling) use the step's own forward as their
    old log-probs: the same loss, gradient, ratio and log-prob gap as feeding the separate log-prob pass's
    values, whatever `old_logprobs` holds; a 0 row still reads `old_logprobs`."""
    state = one.state()
    micro = grpo_inputs(big, lp0, seed=4)
    fed = dict(micro, old_logprobs=lp0)  # the separate pass, as GRPOTrainer._micro feeds it
    skip = dict(micro, old_logprobs=np.full_like(lp0, -7.0), old_current=np.ones_like(micro["advantages"]))
    assert not big["old_current"].any()
    step = one.fns.grpo_step
    a, b = one.fns.grads(state, fed, "grpo"), one.fns.grads(state, skip, "grpo")
    np.testing.assert_allclose(float(b.loss), float(a.loss), rtol=1e-6)
    assert rel_err(b.grads, a.grads) < 1e-6
    ma, mb = step(one.state(), fed)[1], step(one.state(), skip)[1]
    np.testing.assert_allclose(float(mb["ratio"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(ma["ratio"]), 1.0, rtol=1e-5)
    mask = big["loss_mask"] != 0
    gap = np.abs(micro["sampler_logprobs"] - lp0)[mask].mean()
    np.testing.assert_allclose([float(ma["logprob_gap"]), float(mb["logprob_gap"])], gap, rtol=1e-5)
    # Teeth: the same garbage old log-probs without the flag change the loss.
    c = one.fns.grads(state, dict(skip, old_current=np.zeros_like(micro["advantages"])), "grpo")
    assert abs(float(c.loss) - float(a.loss)) > 1e-3


def test_grpo_gradient_of_a_group_by_hand(one, big, lp0):
    """Rows 0 and 1 form a group (advantages +1, -1), the other rows are masked out. Per row i the ratio
    r_i = exp(logp - old) and the TIS weight w_i = min(exp(old - sampler), cap) are constants, and the
    reference equals the current policy (the k3 gradient vanishes there), so with n = n_0 + n_1 trained
    tokens the token-mean loss is -(1/n) sum_i A_i w_i r_i n_i when unclipped and its gradient is
    -(1/n) sum_i A_i w_i r_i sum_t dlogp_t = (1/n) sum_i A_i w_i r_i n_i G_i, where
    G_i = -(1/n_i) sum_t dlogp_t is the SFT (mean NLL) gradient of row i alone; a clipped row adds 0."""
    state = one.state()
    mask = big["loss_mask"].copy()
    mask[:, 2:] = 0
    sft_g, n_i = [], []
    for i in (0, 1):
        only = np.zeros_like(mask)
        only[:, i] = mask[:, i]
        acc = one.fns.grads(state, dict(big, loss_mask=only), "sft")
        sft_g.append(host(acc.grads))
        n_i.append(float(acc.denom))
    n = sum(n_i)
    adv = np.array([1.0, -1.0])
    gap = np.array([0.2, 1.0])  # old - sampler per row: w = [e^0.2, min(e^1, cap 2) = 2]
    w = np.minimum(np.exp(gap), GRPO.tis_cap)

    def run(delta):
        """GRPO accumulation with old = lp0 - delta_i on row i (ratio e^delta_i)."""
        old = lp0.copy()
        old[:, :2] -= np.asarray(delta)[None, :, None]
        sampler = old.copy()
        sampler[:, :2] -= gap[None, :, None]
        a = np.zeros_like(big["advantages"])
        a[:, :2] = adv
        micro = dict(
            big,
            loss_mask=mask,
            old_logprobs=old.astype(np.float32),
            sampler_logprobs=sampler.astype(np.float32),
            ref_logprobs=lp0,
            advantages=a,
        )
        return one.fns.grads(state, micro, "grpo")

    def expected(delta, clipped):
        coef = [0.0 if c else adv[i] * w[i] * np.exp(delta[i]) * n_i[i] / n for i, c in enumerate(clipped)]
        grads = jax.tree.map(lambda g0, g1: coef[0] * g0 + coef[1] * g1, sft_g[0], sft_g[1])
        return grads, -sum(coef)

    # Inside the clip range [0.8, 1.28]: ratios 1.105 and 0.951.
    delta = [0.1, -0.05]
    acc = run(delta)
    grads, loss = expected(delta, [False, False])
    assert float(acc.denom) == n
    np.testing.assert_allclose(float(acc.loss), loss, rtol=1e-5)
    assert rel_err(acc.grads, grads) < 1e-5
    assert float(acc.aux["clip_low"]) == float(acc.aux["clip_high"]) == 0.0
    np.testing.assert_allclose(float(acc.aux["tis_truncated"]), n_i[1])  # row 1's weight hit the cap
    unclipped_norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(host(acc.grads))))

    # Row 0 (A > 0) at ratio e > 1 + eps_high is clipped: only row 1 pulls.
    delta = [1.0, -0.05]
    acc = run(delta)
    grads, loss = expected(delta, [True, False])
    assert rel_err(acc.grads, grads) < 1e-5
    assert float(acc.aux["clip_high"]) == n_i[0] and float(acc.aux["clip_low"]) == 0.0

    # Both clipped (row 1, A < 0, at ratio 1/e < 1 - eps_low): no gradient. What remains is the k3 term at
    # ref = old policy, whose gradient (1 - exp(ref - logp)) is float32 rounding (~1e-7) times kl_coef.
    acc = run([1.0, -1.0])
    assert float(acc.aux["clip_high"]) == n_i[0] and float(acc.aux["clip_low"]) == n_i[1]
    clipped_norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(host(acc.grads))))
    assert clipped_norm < 1e-6 * unclipped_norm


@pytest.fixture(scope="module")
def eight(parts):
    return Setup(sharding.make_mesh(2, 4, 1), *parts)


def test_sharded_steps_equal_single_device(one, eight, big, lp0, capfd):
    """SFT and GRPO steps on a data 2 x fsdp 4 mesh give the one-device parameters (images in the batch);
    the per-sample vision rows are split like the tokens, and XLA never has to replicate a tensor to
    reshard it (its "Involuntary full rematerialization" warning, which the former batch-wide vision rows
    caused, goes to stderr while these programs compile)."""
    placed = steps.shard_batch(big, eight.mesh)
    assert placed["input_ids"].sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None)
    assert placed["positions"].sharding.spec[2] == ("data", "fsdp")
    assert placed["pixel_values"].sharding.spec[:2] == (None, ("data", "fsdp"))
    assert placed["vision_inputs"].window_gather.sharding.spec[:2] == (None, ("data", "fsdp"))
    s8 = eight.state()
    emb = s8.params["model"]["embed_tokens"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")  # FSDP-sharded weights
    np.testing.assert_allclose(np.asarray(eight.fns.logprobs(s8.params, big)), lp0, atol=1e-5)

    micro = grpo_inputs(big, lp0, seed=4)
    for step in ("sft_step", "grpo_step"):
        s1, m1 = getattr(one.fns, step)(one.state(), micro)
        s8, m8 = getattr(eight.fns, step)(eight.state(), micro)
        assert set(m1) == set(m8)
        for k in m1:
            np.testing.assert_allclose(
                float(m8[k]), float(m1[k]), rtol=1e-5, atol=1e-7, err_msg=f"{step} {k}"
            )
        for a, b in zip(jax.tree.leaves(host(s8.params)), jax.tree.leaves(host(s1.params))):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        assert int(s8.step) == 1
    assert float(m8["clip_low"]) + float(m8["clip_high"]) > 0 and float(m8["kl"]) > 0
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_vision_tower_is_split_over_the_batch_devices(parts, big):
    """Each device encodes only its own samples' images: per device, the 8-device tower program does an
    eighth of the one-device program's work and holds its output split by sample."""
    graphdef, params = parts

    def encode(params, pix, vi):
        return nnx.merge(graphdef, params).encode_vision(pix[0], jax.tree.map(lambda x: x[0], vi))

    flops, specs = {}, {}
    for name, mesh in (
        ("one", sharding.make_mesh(devices=jax.devices()[:1])),
        ("eight", sharding.make_mesh(2, 4, 1)),
    ):
        placed = steps.shard_batch(big, mesh)
        p = jax.device_put(params, sharding.state_shardings(params, mesh))
        with sharding.use_mesh(mesh):
            compiled = (
                jax.jit(encode, compiler_options=FAST_COMPILE)
                .lower(p, placed["pixel_values"], placed["vision_inputs"])
                .compile()
            )
        cost = compiled.cost_analysis()
        flops[name] = (cost[0] if isinstance(cost, list) else cost)["flops"]
        specs[name] = compiled.output_shardings.spec
    assert specs["eight"][0] == ("data", "fsdp")
    # Replicated compute would do all the work on every device (ratio ~1); split by sample it is ~1/8.
    assert flops["eight"] < 0.2 * flops["one"], flops


def test_frozen_vision_tower(parts, one, big):
    """With the vision tower frozen, its parameters stay bit-identical and get no gradient; the rest moves,
    and grad_norm is the norm of the trainable gradients only."""
    frozen = st.freeze_prefixes(st.VISION_TOWER)
    setup = Setup(one.mesh, *parts, frozen=frozen)
    state = setup.state()
    before = flat(host(state.params))
    acc = setup.fns.grads(state, big, "sft")
    full = flat(host(one.fns.grads(one.state(), big, "sft").grads))
    for k, g in flat(host(acc.grads)).items():
        if "'visual'" in k:
            np.testing.assert_array_equal(g, 0.0, err_msg=k)
        else:  # the same gradient from a different program (no vision backward): rounding differs
            assert np.linalg.norm(g - full[k]) <= 1e-5 * np.linalg.norm(full[k]), k
    state, metrics = setup.fns.sft_step(state, big)
    trainable = [v for k, v in full.items() if "'visual'" not in k]
    np.testing.assert_allclose(
        float(metrics["grad_norm"]), np.sqrt(sum(np.sum(g**2) for g in trainable)), rtol=1e-5
    )
    after = flat(host(state.params))
    n_vision = 0
    for k in before:
        if "'visual'" in k:
            n_vision += 1
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)
        else:
            assert not np.array_equal(after[k], before[k]), k
    assert n_vision == 18  # every vision-tower parameter was checked


def test_seq_mean_aggregation_and_entropy_bonus(parts, one, big, examples):
    """seq-mean-token-mean with an entropy bonus: exact over uneven micro-batches too (the denominator is
    the number of sequences), and with zero advantages and no KL the loss is exactly -coef * the mean over
    sequences of each one's token-mean entropy, checked against entropies from the full logits."""
    settings = dataclasses.replace(
        GRPO, loss_agg="seq-mean-token-mean", kl_coef=0.0, entropy_coef=0.1, tis_cap=None
    )
    setup = Setup(one.mesh, *parts, grpo=settings)
    state = setup.state()
    small = stacked(examples, 4)
    acc_small, acc_big = setup.fns.grads(state, small, "grpo"), setup.fns.grads(state, big, "grpo")
    assert float(acc_small.denom) == float(acc_big.denom) == len(examples)
    np.testing.assert_allclose(float(acc_small.loss), float(acc_big.loss), rtol=1e-6)
    # 5e-6, not 1e-6: the entropy's gradient runs through a softmax-weighted sum over the vocabulary per
    # token, whose float32 rounding depends on the batch layout (measured 1.6e-6). Exactness of the
    # denominators themselves is pinned by the denom and loss checks above.
    assert rel_err(acc_small.grads, acc_big.grads) < 5e-6
    assert float(acc_big.aux["pg_sum"]) == 0.0  # stack() leaves the advantages at zero

    mb = jax.tree.map(lambda x: x[0], big)

    @jax.jit
    def entropies(params):
        model = nnx.merge(setup.graphdef, params)
        logp = jax.nn.log_softmax(
            model(
                mb["input_ids"],
                mb["positions"],
                mb["attention_mask"],
                mb["pixel_values"],
                mb["vision_inputs"],
            )
        )
        return -jnp.sum(jnp.exp(logp) * logp, -1)

    with sharding.use_mesh(one.mesh):
        ent = np.asarray(entropies(state.params))
    mask = mb["loss_mask"] > 0
    per_seq = (ent * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(float(acc_big.loss), -0.1 * per_seq.mean(), rtol=1e-5)


def test_per_token_temperatures(parts, one, big, lp0):
    """`sampled_temperatures`: each target's log-prob at its own temperature. Rows at 0.7 equal a scalar
    temperature of 0.7, rows at 1.0 equal the raw log-probs (what the original's trainer computes)."""
    mesh = one.mesh
    per_token = Setup(mesh, *parts, grpo=dataclasses.replace(GRPO, sampled_temperatures=True))
    scalar = Setup(mesh, *parts, grpo=dataclasses.replace(GRPO, temperature=0.7))
    params = one.state().params
    temps = np.ones_like(big["temperatures"])
    temps[:, ::2] = 0.7  # even rows sampled at 0.7
    micro = dict(big, temperatures=temps)
    mixed = np.asarray(per_token.fns.logprobs(params, micro))
    cold = np.asarray(scalar.fns.logprobs(params, big))
    trained = big["loss_mask"] != 0
    np.testing.assert_allclose(
        mixed[:, ::2][trained[:, ::2]], cold[:, ::2][trained[:, ::2]], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        mixed[:, 1::2][trained[:, 1::2]], lp0[:, 1::2][trained[:, 1::2]], rtol=1e-5, atol=1e-5
    )
    assert np.abs(cold - lp0)[trained].max() > 1e-2  # the temperature matters on these targets
    # "raw" (the default) ignores the temperatures entirely.
    np.testing.assert_array_equal(np.asarray(one.fns.logprobs(params, micro)), lp0)


def test_pixels_in_the_compute_dtype_change_nothing(parts, big):
    """A bfloat16 model takes its pixels as bfloat16 (half the batch's largest array) with the same loss,
    gradients and log-probs as from float32 pixels: the vision tower casts them on entry either way."""
    with nnx.use_eager_sharding(False):
        graphdef16 = nnx.graphdef(nnx.eval_shape(lambda: Qwen25VL(CFG, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    f32 = Setup(mesh, graphdef16, parts[1], grpo=None)
    b16 = Setup(mesh, graphdef16, parts[1], grpo=None, pixel_dtype="bfloat16")
    assert big["pixel_values"].dtype == np.float32
    got, want = b16.fns.grads(b16.state(), big, "sft"), f32.fns.grads(f32.state(), big, "sft")
    assert float(got.loss) == float(want.loss)
    for key, g in flat(got.grads).items():
        np.testing.assert_array_equal(g, flat(want.grads)[key], err_msg=key)
    np.testing.assert_array_equal(
        np.asarray(b16.fns.logprobs(b16.params, big)), np.asarray(f32.fns.logprobs(f32.params, big))
    )
    # What the program receives: the pixels in bfloat16, the rest as the batch holds it.
    traced = b16.fns.trace("sft", b16.state(), big)["grads"]
    micro = traced.args_info[0][1]
    assert micro["pixel_values"].dtype == jnp.bfloat16 and micro["input_ids"].dtype == np.int32
    assert steps.cast_pixels({"input_ids": big["input_ids"]}, "bfloat16").keys() == {"input_ids"}
