"""GRPO with the in-process JaxSampler learns a toy reward the tiny random model can reach.

Reward 1 when an episode's first sampled token is the first token ever sampled (a token inside the model's
top-k at the start, so groups have reward spread from step one); 30 steps must raise the mean reward.
"""

import dataclasses
import json

import jax
import numpy as np
from PIL import Image

from configs import grpo as grpo_config
from pixel_reasoner_jax import main as entry
from pixel_reasoner_jax.config import validate
from pixel_reasoner_jax.metrics import read_metrics
from pixel_reasoner_jax.train import grpo

STEPS = 30


def _write_prompts(root) -> str:
    """8 one-color 56x56 images with a short question: a 44-token prompt, so one 48-token bucket."""
    root.mkdir(parents=True)
    rows = []
    for i in range(8):
        Image.new("RGB", (56, 56), (30 * i, 200 - 20 * i, 90)).save(root / f"img{i}.png")
        rows.append(
            {"qid": f"toy-{i}", "question": "Name the color.", "image": [f"img{i}.png"], "answer": "x"}
        )
    path = root / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(workdir, tiny_ckpt):
    c = grpo_config.get_config("tiny")
    c.data.synthetic = False
    c.data.rl_path = _write_prompts(workdir / "data")
    c.sft.steps = 0
    c.grpo.steps = STEPS
    c.grpo.prompts_per_rollout = 2
    c.grpo.group_size = 4
    c.grpo.train_batch_size = 8
    c.grpo.micro_batches = 1
    c.grpo.filter = "refill"
    c.optim.lr = 3e-3  # Adam moves each weight ~lr per step: enough to reorder a top-4 within 30 steps
    c.optim.warmup_ratio = 0.0
    c.optim.schedule = "constant"
    c.rollout.template = "notool"
    c.rollout.top_k = 4
    c.rollout.top_p = 1.0
    c.rollout.max_new_tokens = 2
    c.rollout.decode_bucket = 2
    c.rollout.prompt_max_len = 46
    c.rollout.max_total_tokens = 48
    c.rollout.batch_size = 8
    c.model.logprob_chunk = 16
    c.data.max_seq_len = 48
    c.data.seq_buckets = (48,)
    c.data.patch_buckets = (256,)
    c.log.checkpoint_every = 0
    c.log.plots_every = 0
    c.log.tensorboard = False
    c.log.progress = False
    cfg = entry.build_config(c, str(workdir / "run"))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=str(tiny_ckpt)))
    validate(cfg, jax.device_count())
    return entry.prepare_assets(cfg)


def test_grpo_raises_a_reachable_toy_reward(tmp_path, tiny_ckpt):
    cfg = _config(tmp_path, tiny_ckpt)
    target: dict[str, int] = {}

    def first_token_reward(traj) -> float:
        first = int(traj.input_ids[traj.turns[0].start])
        target.setdefault("id", first)
        return float(first == target["id"])

    grpo.run(cfg, accuracy_fn=first_token_reward)
    acc = np.array([r["reward/accuracy"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")])
    assert acc.shape == (STEPS,)
    first, last = acc[:5].mean(), acc[-5:].mean()
    assert last > first + 0.3, f"reward did not rise: first 5 steps {first:.3f}, last 5 steps {last:.3f}"


def test_replay_samples_survive_a_json_checkpoint_bit_exactly():
    from pixel_reasoner_jax.processing.batch import Example
    from pixel_reasoner_jax.train.replay import SelectiveReplayBuffer

    rng = np.random.default_rng(0)
    ex = Example(
        input_ids=rng.integers(0, 151_000, 7).astype(np.int32),
        loss_mask=np.array([0, 0, 1, 1, 0, 1, 1], np.int8),
        logprobs=rng.normal(size=7).astype(np.float32),
        positions=rng.integers(0, 9, (3, 7)).astype(np.int32),
        pixel_values=rng.normal(size=(4, 1176)).astype(np.float32),
        grid_thw=np.array([[1, 2, 2]], np.int64),
        is_video=np.array([False]),
        second_per_grid_ts=np.zeros((0,), np.float32),
        vision_spans=np.array([[2, 3]], np.int64),
        qid="q0",
    )
    buf = SelectiveReplayBuffer(4, seed=1)
    buf.add([grpo.encode_example(ex)], [0.5])
    state = json.loads(json.dumps(buf.state_dict()))  # what the checkpoint's JSON extra holds
    restored = SelectiveReplayBuffer(4, seed=2)
    restored.load_state_dict(state)
    (back,) = restored.sample(1)
    got = grpo.decode_example(back)
    assert got.qid == "q0"
    for field in dataclasses.fields(Example):
        if field.name != "qid":
            a, b = getattr(ex, field.name), getattr(got, field.name)
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), field.name


def test_request_seeds_depend_on_run_step_and_rid_only():
    seeds = {grpo.request_seed(0, s, f"s{s}-p{k}-g{j}") for s in range(3) for k in range(4) for j in range(4)}
    assert len(seeds) == 48 and all(0 <= x < 2**63 for x in seeds)
    assert grpo.request_seed(0, 1, "a") == grpo.request_seed(0, 1, "a") != grpo.request_seed(1, 1, "a")
