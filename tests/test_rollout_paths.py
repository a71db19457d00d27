"""Greedy tool-using episodes of a memorised checkpoint through JaxSampler and through our SGLang-API server:
token-identical paths, sampler log-probs equal to the trainer's recomputation, 32 concurrent episodes.
"""

import jax
import numpy as np
import portpicker
import pytest
from flax import nnx
from memorize import MEMO_IMAGE_SIZE, greedy_config, memo_episode, memorize_checkpoint, noise_image

from pixel_reasoner_jax.models import hf_io
from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.models.qwen25vl import token_logprobs
from pixel_reasoner_jax.processing.batch import collate
from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.episode import UNTRAINABLE, run_episodes
from pixel_reasoner_jax.rollout.sglang_client import SGLangClient
from pixel_reasoner_jax.rollout.trajectory import expand_trajectory
from pixel_reasoner_jax.serve.backend import JaxBackend
from pixel_reasoner_jax.serve.http import SGLangServer

VERSION = "memo-1"
CFG = greedy_config()
# One program per batch size: every prompt fits one sequence bucket (CFG caps the episode at 760 tokens),
# every turn one decode budget (40 new tokens), and every batch one of two patch buckets (a query holds
# at most 48 + 2 * 36 patch rows, so 32 of them fit 4096).
SAMPLER_KW = dict(max_batch=32, seq_buckets=(768,), patch_buckets=(128, 4096), decode_bucket=40)
N_CONCURRENT = 32


@pytest.fixture(scope="module")
def memo(tiny_ckpt, tmp_path_factory):
    return memorize_checkpoint(tiny_ckpt, tmp_path_factory.mktemp("memo") / "ckpt")


@pytest.fixture(scope="module")
def env(memo):
    return QwenTokenizer.from_pretrained(memo.path), ImageProcessorConfig.from_pretrained(memo.path)


@pytest.fixture(scope="module")
def server(memo):
    backend = JaxBackend(memo.path, VERSION, **SAMPLER_KW)
    # A long batching window lets the 32 concurrent requests of a round meet in one policy call.
    srv = SGLangServer(backend, port=portpicker.pick_unused_port(), batch_wait_s=0.5).start()
    yield srv
    srv.stop()


def _client(srv):
    return SGLangClient(
        [srv.url], timeout_s=300, retries=0, connect_timeout_s=5, expected_weight_version=VERSION
    )


@pytest.fixture(scope="module")
def direct(server, env):
    """The memorised query run in-process by the JaxSampler the server wraps (no HTTP)."""
    tok, proc = env
    return run_episodes(server.backend.policy, [memo_episode(tok, proc, CFG, episode_id="direct")])[0]


def _same_tokens(a, b):
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    assert (a.status, a.num_calls, a.num_valid_calls) == (b.status, b.num_calls, b.num_valid_calls)
    assert [(t.start, t.end, t.finish_reason) for t in a.turns] == [
        (t.start, t.end, t.finish_reason) for t in b.turns
    ]
    assert len(a.media) == len(b.media) and all(np.array_equal(x, y) for x, y in zip(a.media, b.media))


def test_greedy_episode_in_process_equals_served(memo, env, server, direct):
    tok, proc = env
    with _client(server) as client:
        served = run_episodes(client, [memo_episode(tok, proc, CFG, episode_id="served")])[0]
    # Both replay the memorised episode: crop, crop of the crop, answer.
    for traj in (direct, served):
        assert traj.status == "answered" and traj.num_valid_calls == 2 and traj.num_failed_calls == 0
        assert traj.turn_versions == (VERSION,) * 3
        _same_tokens(traj, memo.trajectory)
    np.testing.assert_allclose(served.logprobs, direct.logprobs, atol=1e-4, rtol=0)
    assert (direct.logprobs[direct.loss_mask == 1] > np.log(0.5)).all()  # greedy picks of a fitted model


def test_sampler_logprobs_equal_recomputed(memo, env, direct):
    """The trainer's view of the finished episode (expanded ids, M-RoPE, pixels) scores each sampled token
    as the sampler did: no drift between the rollout and the training forward."""
    tok, proc = env
    mcfg = ModelConfig.from_pretrained(memo.path)
    ex = expand_trajectory(direct, proc, mcfg)
    b = collate([ex], pad_id=tok.endoftext, vision_cfg=mcfg.vision)
    where = np.flatnonzero(b.loss_mask[0])
    graphdef, state = nnx.split(hf_io.load_model(memo.path))

    @jax.jit
    def recompute(state, ids, positions, mask, pixels, vision, targets):
        model = nnx.merge(graphdef, state)
        hidden, _ = model.hidden_states(ids, positions, mask, pixels, vision)
        return token_logprobs(model, hidden[:, where], targets[:, where])[0][0]

    lp = recompute(
        state, b.input_ids, b.positions, b.attention_mask, b.pixel_values, b.vision_inputs, b.targets
    )
    assert len(where) == int(direct.loss_mask.sum())
    np.testing.assert_allclose(np.asarray(lp), b.sampler_logprobs[0, where], atol=1e-4, rtol=0)


def test_32_concurrent_episodes_through_the_server(env, server):
    tok, proc = env

    images = [noise_image(*MEMO_IMAGE_SIZE, seed=100 + k) for k in range(N_CONCURRENT)]
    # Every prompt has its own length, so a result returned for another request fails the client's check
    # of the server's expanded prompt_tokens, and differs from the in-process reference below.
    questions = [f"Question {k}: which letter is in the corner?" + " Look." * k for k in range(N_CONCURRENT)]

    def episodes():
        return [
            memo_episode(tok, proc, CFG, episode_id=f"c{k:02d}", image=images[k], question=questions[k])
            for k in range(N_CONCURRENT)
        ]

    mine = episodes()
    prompts = [ep.input_ids for ep in mine]
    assert len({len(p) for p in prompts}) == N_CONCURRENT
    before = len(server.worker.batch_sizes)
    with _client(server) as client:
        trajs = run_episodes(client, mine)
    assert len(trajs) == N_CONCURRENT
    assert max(server.worker.batch_sizes[before:]) > 1  # the server really batched concurrent requests
    for k, traj in enumerate(trajs):
        assert traj.episode_id == f"c{k:02d}" and traj.status not in UNTRAINABLE and traj.turns
        assert tuple(traj.input_ids[: traj.prompt_length]) == prompts[k] and traj.media[0] is images[k]
    # Mixed-up results would not be the greedy continuation of their own conversation: the in-process
    # sampler, run on the same 32 queries in one batch, produces the same trajectories.
    reference = run_episodes(server.backend.policy, episodes())
    for traj, ref in zip(trajs, reference):
        _same_tokens(traj, ref)
        np.testing.assert_allclose(traj.logprobs, ref.logprobs, atol=1e-4, rtol=0)
