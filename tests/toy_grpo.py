"""The toy GRPO run of the loop tests: 8 one-color image prompts and settings that make every rollout and
step of the tiny checkpoint take well under a second. Free of side effects, so worker processes import it."""

import json
import pathlib

from PIL import Image

# A 44-token "notool" prompt, 2 sampled tokens, one 48-token bucket.
SETTINGS = {
    "data.synthetic": False, "sft.steps": 0,
    "grpo.prompts_per_rollout": 2, "grpo.group_size": 4, "grpo.train_batch_size": 8,
    "grpo.micro_batches": 1, "grpo.filter": "refill",
    "optim.warmup_ratio": 0.0, "optim.schedule": "constant", "optim.lr": 1e-2,
    # The toy prompt fits 46 tokens with the released strings (the tiny job's terse system line is longer).
    "rollout.prompt_style": "released",
    "rollout.template": "notool", "rollout.top_k": 4, "rollout.top_p": 1.0,
    "rollout.max_new_tokens": 2, "rollout.decode_bucket": 2, "rollout.prompt_max_len": 46,
    "rollout.max_total_tokens": 48, "rollout.batch_size": 8, "model.logprob_chunk": 16,
    "data.max_seq_len": 48, "data.seq_buckets": (48,), "data.patch_buckets": (256,),
    "log.checkpoint_every": 0, "log.plots_every": 0, "log.tensorboard": False, "log.progress": False,
    "log.rollouts_every": 0,
}  # fmt: skip


def write_data(root: pathlib.Path) -> pathlib.Path:
    """Writes the 8 prompts (56 px images) to `root`; returns the RL JSONL path."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(8):
        Image.new("RGB", (56, 56), (30 * i, 200 - 20 * i, 90)).save(root / f"img{i}.png")
        rows.append(
            {"qid": f"toy-{i}", "question": "Name the color.", "image": [f"img{i}.png"], "answer": "x"}
        )
    path = root / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
