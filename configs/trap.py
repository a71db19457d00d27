"""The learning trap on a CPU: SFT warm start, then GRPO with and without the curiosity bonus.

    python -m pixel_reasoner_jax.main --config=configs/trap.py:curiosity
    python -m pixel_reasoner_jax.main --config=configs/trap.py:no_curiosity
    python -m pixel_reasoner_jax.trap_plot runs/trap_curiosity runs/trap_no_curiosity --out trap.png

The two variants differ ONLY in `reward.curiosity`. Task family: data/trap_tasks.py (four coloured squares, a
question naming a quarter; the full view shows each square a few pixels wide, a crop shows it large).
"""

import importlib.util
import pathlib

try:
    from configs import base
except ImportError:  # loaded by path (absl config_flags), without the repo root on sys.path
    _spec = importlib.util.spec_from_file_location(
        "configs_base", pathlib.Path(__file__).with_name("base.py")
    )
    base = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(base)

VARIANTS = ("curiosity", "no_curiosity")
PIX = base.PIX


def get_config(arg: str = "curiosity"):
    """Returns the locked ConfigDict of the trap run `arg` ("curiosity" or "no_curiosity")."""
    variant = (arg or "curiosity").strip().lower()
    if variant not in VARIANTS:
        raise ValueError(f"configs/trap.py variant {arg!r} is unknown; expected one of {VARIANTS}")
    c = base.base_config()
    c.mode = "grpo"
    base.apply_variant(c, "tiny")
    c.workdir = f"runs/trap_{variant}"
    c.model.tiny_size = "narrow"  # half the vocabulary-projection cost of "tiny", which dominates each step

    d = c.data
    d.synthetic_family = "trap"
    d.num_sft = 128
    d.num_rl = 128
    d.num_eval = 8
    d.image_size = 448
    # The original is kept at 448 px so crops cut real detail; the model sees every image at 56 px: the full
    # view is 4 visual tokens (one per quarter, a square ~4 px of its token), a crop of a square shows it
    # ~14 px wide. Small views keep the vision tower and the sequences cheap.
    d.image_max_pixels = d.eval_image_max_pixels = 256 * PIX
    d.sft_image_max_pixels = 4 * PIX
    # One sequence bucket and one patch bucket (per batch of 16 samples or requests, each with at most 3
    # images of 16 patches), so each program compiles for few shapes; a crop trajectory is ~540 tokens.
    d.max_seq_len = 640
    d.seq_buckets = (640,)
    d.patch_buckets = (1024,)

    c.optim.lr = 1e-2  # high: the narrow model must learn the call format in 80 SFT steps
    c.optim.warmup_ratio = 0.0
    c.optim.schedule = "constant"

    c.sft.steps = 80
    c.sft.batch_size = 8
    c.sft.micro_batches = 1
    c.sft.epochs = 1

    r = c.rollout
    r.max_new_tokens = 64  # a call is 49 tokens, an answer 6
    r.decode_bucket = 16
    r.max_total_tokens = 640
    r.prompt_max_len = 576
    r.max_tool_calls = 1  # at most two crops: bounds the sequence (the paper's free operations N is 1)
    r.batch_size = 16  # episodes in flight: at most 16 requests per sampler call
    r.model_max_pixels = r.crop_max_pixels = 4 * PIX

    g = c.grpo
    g.steps = 30
    g.group_size = 8
    g.prompts_per_rollout = 4
    g.train_batch_size = 32  # one optimizer step per rollout: on-policy
    g.micro_batches = 2
    g.filter = "refill"  # the original's `--filter True`

    rw = c.reward
    # Paper form with alpha 1 and H 0.5: the bonus alpha * (H - RaPR) for each cropping rollout must beat
    # the early accuracy gap between answering directly and cropping (~0.1-0.2 here) while RaPR is still
    # well above zero; the paper's alpha 0.5, H 0.3 gives at most 0.15 and lets RaPR fall.
    rw.form = "paper"
    rw.alpha = 1.0
    rw.H = 0.5
    rw.curiosity = variant == "curiosity"

    c.log.checkpoint_every = 0
    c.log.plots_every = 0
    c.log.progress = False
    c.lock()
    return c
