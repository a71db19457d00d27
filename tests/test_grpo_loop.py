"""The GRPO loop as the original ran it, end to end on the tiny checkpoint: selective sample replay (what is
trained, with which stored log-probs), skipped steps against optimizer steps and the LR schedule, the KL to a
frozen reference, and an exact resume after a checkpoint.

One scripted run of 4 rollouts (4 prompts x G 4 = 16 episodes, SSR trains 8), with a controlled accuracy:
  rollout 0: every group uniform, the replay buffer empty  -> skipped
  rollout 1: prompt 0's group informative (4 samples)      -> 4 fresh + 4 drawn from the buffer
  rollout 2: every group uniform                           -> 8 replayed: the buffer's 4, then 4 draws
  rollout 3: prompts 0-2 informative (12 samples)          -> 8 of them fresh, nothing replayed
"""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from pixel_reasoner_jax.eval import metrics as em
from pixel_reasoner_jax.metrics import read_metrics
from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.train import grpo, grpo_rollout, probe, replay, replay_samples, sft, steps
from pixel_reasoner_jax.train import state as st
from pixel_reasoner_jax.train.checkpoint import ARRAYS, ARRAYS_FILE, EXTRA, read_arrays
from pixel_reasoner_jax.train.run import CHECKPOINT_DIR, EXPORT_DIR, optim_config

INFORMATIVE = {0: set(), 1: {0}, 2: set(), 3: {0, 1, 2}}  # rollout (its first loop step) -> prompts
KL_COEF = 0.5
_TIMED = ("time/", "throughput/")


def scripted_accuracy(traj) -> float:
    """1 for the first episode of an informative group, else 0 (episode ids are s<step>-p<k>-g<j>)."""
    s, k, j = (int(part[1:]) for part in traj.episode_id.split("-"))
    return float(j == 0 and k in INFORMATIVE[s])


def _run(cfg) -> list[dict]:
    """grpo.run with every GRPO step's micro-batch recorded, with the policy's log-probs just before it."""
    made = sft.make_fns
    recorded = []

    def recording_fns(ctx, grpo=None):
        fns = made(ctx, grpo=grpo)
        if grpo is None:
            return fns

        def step(state, micro):
            current = np.asarray(jax.device_get(fns.logprobs(state.params, micro)))
            recorded.append({**micro, "current_logprobs": current})
            return fns.grpo_step(state, micro)

        return dataclasses.replace(fns, grpo_step=step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft, "make_fns", recording_fns)
        grpo.run(cfg, accuracy_fn=scripted_accuracy)
    return recorded


def _extra(workdir, step: int) -> dict:
    return json.loads((workdir / CHECKPOINT_DIR / str(step) / EXTRA / "metadata").read_text())


def _arrays(workdir, step: int) -> dict[str, np.ndarray]:
    return read_arrays(workdir / CHECKPOINT_DIR / str(step) / ARRAYS / ARRAYS_FILE)


def _tensors(export) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k: v for f in sorted(export.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def ssr_run(tmp_path_factory, toy_grpo_config):
    """The scripted run to the end (A), then a copy of it resumed from checkpoint 2 (B)."""
    root = tmp_path_factory.mktemp("ssr")
    cfg = toy_grpo_config(
        root,
        **{
            "grpo.filter": "ssr", "grpo.prompts_per_rollout": 4, "grpo.steps": 4, "grpo.kl_coef": KL_COEF,
            "optim.lr": 3e-3, "optim.schedule": "linear", "log.checkpoint_every": 1, "log.keep_checkpoints": 4,
            "log.rollouts_every": 2, "log.rollout_groups": 1, "log.call_probe": 2,
        },
    )  # fmt: skip
    recorded = _run(cfg)
    run_a = root / "run"
    # A kill after checkpoint 2 was committed and after loop step 4 logged its line: checkpoint 3 is lost.
    run_b = root / "resumed"
    shutil.copytree(run_a, run_b)
    shutil.rmtree(run_b / CHECKPOINT_DIR / "3")
    shutil.rmtree(run_b / EXPORT_DIR)
    resumed = _run(dataclasses.replace(cfg, workdir=str(run_b)))
    return cfg, run_a, recorded, run_b, resumed


def test_ssr_trains_fresh_first_then_replay_with_the_stored_log_probs(ssr_run, tiny_ckpt, proc):
    cfg, run_a, recorded, _, _ = ssr_run
    rows = read_metrics(run_a / "metrics.jsonl")
    assert [r["replay/fresh_samples"] for r in rows] == [0, 4, 0, 8]
    assert [r["replay/replayed_samples"] for r in rows] == [0, 4, 8, 0]
    assert [r["replay/buffer_size"] for r in rows] == [0, 4, 4, 16]  # maxlen 16: the rollout batch
    assert len(recorded) == 3 and all(m["advantages"].shape == (1, 8) for m in recorded)
    # Group rewards [1, 0, 0, 0] give advantages 0.75 and -0.25 (r - group mean), kept by replayed samples.
    for m in recorded:
        assert set(np.round(m["advantages"].ravel(), 6)) <= {0.75, -0.25}

    # Replayed samples carry the old log-probs stored when they were drawn (under the policy before step 1),
    # not a recomputation under the current policy.
    # The buffer of the last checkpoint, rebuilt from its arrays and the media store (which kept its media).
    buf = replay.SelectiveReplayBuffer(cfg.grpo.replay_size, seed=0)
    buf.load_state_dict(_extra(run_a, 3)["replay"], _arrays(run_a, 3))
    store = replay_samples.MediaStore(run_a / replay_samples.MEDIA_DIR)
    assert buf.media_refs() == store.digests() and len(buf) == 16
    mcfg = ModelConfig.from_pretrained(tiny_ckpt)
    stored = [replay_samples.decode_sample(s, store, proc, mcfg) for s in buf._samples]
    m = recorded[1]  # rollout 2: all 8 replayed
    for ids, old, current in zip(
        m["input_ids"][0],
        replay.trained_values(m["old_logprobs"], m["loss_mask"]),
        replay.trained_values(m["current_logprobs"], m["loss_mask"]),
    ):
        matches = [lp for ex, lp in stored if np.array_equal(ex.input_ids, ids[: ex.length])]
        assert any(np.array_equal(old, lp) for lp in matches), "a replayed row lost its stored log-probs"
        assert np.abs(old - current).max() > 1e-4  # the policy moved since: no recomputation
    # Fresh samples' old log-probs are this rollout's policy's.
    m = recorded[2]
    np.testing.assert_allclose(m["old_logprobs"], m["current_logprobs"], atol=1e-5)


def test_rollout_dumps_for_the_viewer(ssr_run):
    """Every 2nd loop step the first group of the rollout batch is dumped in the eval schema."""
    cfg, run_a, _, _, _ = ssr_run
    dumps = sorted(p.name for p in (run_a / grpo.ROLLOUTS_DIR).iterdir())
    assert dumps == ["step_000000", "step_000002"]
    lines = (run_a / grpo.ROLLOUTS_DIR / dumps[1] / "samples.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == cfg.grpo.group_size and [r["sample"] for r in rows] == [0, 1, 2, 3]
    assert len({r["qid"] for r in rows}) == 1  # one group: one prompt
    for row in rows:
        em.SampleResult.from_json(row)  # the viewer's schema
        assert row["turns"][0]["role"] == "assistant" and row["inputs"]
        assert (run_a / grpo.ROLLOUTS_DIR / dumps[1] / row["inputs"][0]).is_file()
    # Group rewards [1, 0, 0, 0] (one sample says the answer): advantage = shaped reward - group mean.
    shaped = np.array([r["shaped_reward"] for r in rows])
    np.testing.assert_allclose([r["advantage"] for r in rows], shaped - shaped.mean(), atol=1e-6)


def test_skipped_steps_move_neither_the_optimizer_nor_the_schedule(ssr_run):
    cfg, run_a, _, _, _ = ssr_run
    rows = read_metrics(run_a / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["train/loop_step"] for r in rows] == [1, 2, 3, 4]
    assert [r["train/optimizer_step"] for r in rows] == [0, 1, 2, 3]
    assert [r["train/skipped_steps"] for r in rows] == [1, 1, 1, 1]
    assert "grpo/lr" not in rows[0]
    schedule = st.make_schedule(optim_config(cfg, 4))
    want = [float(schedule(k)) for k in range(3)]  # the updates at optimizer steps 0, 1, 2
    assert want[0] > want[1] > want[2]
    np.testing.assert_allclose([r["grpo/lr"] for r in rows[1:]], want, rtol=1e-6)
    # Checkpoints are numbered by optimizer steps; the skipped rollout saved nothing.
    saved = sorted(int(p.name) for p in (run_a / CHECKPOINT_DIR).iterdir() if p.name.isdigit())
    assert saved == [1, 2, 3]
    assert [_extra(run_a, k)["loop_step"] for k in saved] == [2, 3, 4]


def test_kl_to_the_frozen_reference(ssr_run):
    _, run_a, recorded, _, _ = ssr_run
    rows = read_metrics(run_a / "metrics.jsonl")[1:]
    kl = np.array([r["grpo/kl"] for r in rows])
    assert kl[0] < 1e-6 and np.all(kl[1:] > 1e-5)  # the policy is the reference until its first update
    # The loss is the policy-gradient loss plus kl_coef * KL (token-mean): it differs from kl_coef = 0.
    gap = np.array([r["grpo/loss"] - r["grpo/pg_loss"] for r in rows])
    np.testing.assert_allclose(gap, KL_COEF * kl, rtol=1e-3, atol=1e-7)
    assert gap[-1] > 1e-5
    # The reference log-probs are the starting policy's, one pass per batch: equal to the current ones
    # before the first update, apart after it.
    np.testing.assert_allclose(recorded[0]["ref_logprobs"], recorded[0]["current_logprobs"], atol=1e-5)
    assert np.abs(recorded[2]["ref_logprobs"] - recorded[2]["current_logprobs"]).max() > 1e-4


def test_resume_after_a_checkpoint_is_exact(ssr_run):
    _, run_a, _, run_b, resumed = ssr_run
    assert len(resumed) == 1  # only rollout 3 was redone

    def replayable(rows):
        return [{k: v for k, v in r.items() if not k.startswith(_TIMED)} for r in rows]

    assert replayable(read_metrics(run_b / "metrics.jsonl")) == replayable(
        read_metrics(run_a / "metrics.jsonl")
    )
    assert _extra(run_b, 3) == _extra(run_a, 3)  # the same replay buffer, RNGs, iterator and step counts
    got, want = _arrays(run_b, 3), _arrays(run_a, 3)
    assert got.keys() == want.keys()
    for k in want:  # item_fps holds NaN for images (no fps): NaN == NaN here
        assert np.array_equal(got[k], want[k], equal_nan=want[k].dtype.kind == "f"), k
    media = replay_samples.MEDIA_DIR
    assert sorted(p.name for p in (run_b / media).iterdir()) == sorted(
        p.name for p in (run_a / media).iterdir()
    )
    got, want = _tensors(run_b / EXPORT_DIR), _tensors(run_a / EXPORT_DIR)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_call_probe_reads_the_policy_each_step_starts_from(ssr_run, tiny_ckpt, tok, proc):
    """probe/p_call at loop step 1 is the starting checkpoint's p(<tool_call>) after the rollout prompt,
    computed here from full logits; it moves with the params."""
    from pixel_reasoner_jax.models.hf_io import load_model

    cfg, run_a, _, _, _ = ssr_run
    rows = read_metrics(run_a / "metrics.jsonl")
    got = [r["probe/p_call"] for r in rows]
    assert all(0.0 < p < 1.0 for p in got) and len(set(got)) > 1, got
    assert all(r["time/probe_s"] > 0 for r in rows)

    r = cfg.rollout
    view = dataclasses.replace(proc, min_pixels=r.model_min_pixels, max_pixels=r.model_max_pixels)
    mcfg = ModelConfig.from_pretrained(tiny_ckpt)
    records = grpo.load_rl(cfg)[: cfg.log.call_probe]
    exs = probe.call_probe_examples(records, tok, grpo_rollout.episode_config(cfg), view, mcfg)
    model = load_model(tiny_ckpt)
    want = []
    for ex in exs:
        assert ex.input_ids[-1] == tok.tool_call and ex.loss_mask.tolist() == [0] * (ex.length - 1) + [1]
        (b,) = steps.micro_batches(
            [ex], 1, pad_id=tok.endoftext, vision_cfg=mcfg.vision,
            seq_buckets=cfg.data.seq_buckets, patch_buckets=cfg.data.patch_buckets,
        )  # fmt: skip
        h, _ = model.hidden_states(
            b.input_ids, b.positions, b.attention_mask, b.pixel_values, b.vision_inputs
        )
        probs = jax.nn.softmax(model.logits(h)[0, ex.length - 2].astype(np.float32))
        want.append(float(probs[tok.tool_call]))
    assert got[0] == pytest.approx(np.mean(want), rel=1e-4)
