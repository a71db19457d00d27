"""Jitted SFT / GRPO steps: loss masking, exact accumulation, the GRPO gradient by hand, sharded equals
single-device, frozen vision; on a small-vocabulary Qwen2.5-VL with images in every sample.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.models.config import PRESETS, ModelConfig, TextConfig
from pixel_reasoner_jax.models.qwen25vl import Qwen25VL
from pixel_reasoner_jax.processing.batch import Example
from pixel_reasoner_jax.processing.rope import get_rope_index
from pixel_reasoner_jax.train import state as st
from pixel_reasoner_jax.train import steps

# A 320-token vocabulary keeps the (B, T, V) log-softmax cheap on CPU; the special ids sit above the text ids.
TEXT_IDS = 290
IMG, VID, VS, VE, PAD = 300, 301, 302, 303, 304
CFG = ModelConfig(
    TextConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=(2, 3, 3),
    ),
    PRESETS["tiny"].vision,
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
GRPO = steps.GRPOLossSettings(
    eps_low=0.2, eps_high=0.28, loss_agg="token-mean", kl_coef=0.05, entropy_coef=0.0, tis_cap=2.0, max_len=96
)
OPTIM = st.OptimConfig(lr=1e-3, total_steps=10, warmup_steps=0, schedule="constant", grad_clip=1.0)


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


def stacked(examples, n_micro) -> dict:
    return steps.stack(
        steps.micro_batches(
            examples,
            n_micro,
            pad_id=PAD,
            vision_cfg=CFG.vision,
            seq_buckets=SEQ_BUCKETS,
            patch_buckets=PATCH_BUCKETS,
        )
    )


class Setup:
    """A model's host parameters and the train functions of one mesh; `state()` is a fresh TrainState."""

    def __init__(self, mesh, graphdef, host_params, frozen=None):
        self.mesh, self.graphdef, self.host_params = mesh, graphdef, host_params
        self.optimizer = st.make_optimizer(OPTIM, frozen)
        _, _, self.shardings = st.create_train_state(self.model(), self.optimizer, mesh)
        self.fns = steps.make_train_fns(
            graphdef,
            self.optimizer,
            self.shardings,
            mesh,
            logprob_chunk=32,
            grpo=GRPO,
            schedule=st.make_schedule(OPTIM),
            frozen=frozen,
        )

    def model(self):
        # Fresh device buffers each time: the steps donate the state.
        with sharding.use_mesh(self.mesh):
            return nnx.merge(self.graphdef, jax.tree.map(jnp.array, self.host_params))

    def state(self) -> st.TrainState:
        return st.create_train_state(self.model(), self.optimizer, self.mesh)[1]


@pytest.fixture(scope="module")
def model_parts():
    with sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
        model = Qwen25VL(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def one(model_parts):
    return Setup(sharding.make_mesh(devices=jax.devices()[:1]), *model_parts)


def host(tree):
    return jax.tree.map(np.asarray, tree)


def test_sft_step_smoke(one):
    micro = stacked(make_examples(4, seed=0), 2)
    assert micro["input_ids"].shape == (2, 2, 64) and micro["pixel_values"].shape[:2] == (2, 64)
    state = one.state()
    before = host(state.params)
    state, metrics = one.fns.sft_step(state, micro)
    m = {k: float(v) for k, v in metrics.items()}
    assert set(m) >= {"loss", "grad_norm", "update_norm", "lr", "tokens", "entropy"}
    assert int(state.step) == 1 and m["lr"] == pytest.approx(1e-3)
    assert m["tokens"] == micro["loss_mask"].sum()
    # A random model over 320 tokens: the NLL and entropy are near log(320) = 5.77.
    assert 4.0 < m["loss"] < 8.0 and 4.0 < m["entropy"] < 6.0
    assert m["grad_norm"] > 0 and m["update_norm"] > 0
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, host(state.params))
    assert all(jax.tree.leaves(changed))
    state, metrics = one.fns.sft_step(state, micro)
    assert float(metrics["loss"]) < m["loss"]  # same batch again: one Adam step lowered its loss
