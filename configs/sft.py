"""SFT ("warm start") on multi-turn trajectories: the recipe of reference §8.1 and a CPU-sized `tiny`.

Run:
  python -m pixel_reasoner_jax.main --config=configs/sft.py:7b --workdir=/runs/sft7b \
      --config.model.checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct \
      --config.data.sft_path=/data/PixelReasoner-SFT-Data/release.json
  python -m pixel_reasoner_jax.main --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny   # CPU, minutes
Variants: tiny | 3b | 7b (default). Override any key with --config.<section>.<key>=<value>.
"""

try:
    from configs import base
except ImportError:  # loaded by path from outside the repository root
    import importlib.util
    import pathlib

    _spec = importlib.util.spec_from_file_location(
        "configs_base", pathlib.Path(__file__).with_name("base.py")
    )
    base = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(base)


def get_config(arg: str = "7b"):
    """Returns the locked SFT ConfigDict of variant `arg` ("tiny", "3b" or "7b")."""
    variant = base.parse_variant(arg)
    c = base.base_config()
    c.mode = "sft"
    c.model.hf_id = base.HF_IDS_7B["sft"]
    c.model.freeze_vision = True  # `--freeze_vision_modules true` (§8.1)
    # HF Trainer defaults where §8.1 sets nothing: AdamW (0.9, 0.999), eps 1e-8, no weight decay, clip 1.0,
    # cosine to zero.
    c.optim.lr = 1e-6
    c.optim.warmup_ratio = 0.1
    c.optim.min_lr_ratio = 0.0
    c.optim.b2 = 0.999
    c.sft.steps = -1  # 5 epochs over the data
    base.apply_variant(c, variant)
    if variant == "tiny":
        c.optim.lr = 1e-3  # a random tiny model needs a large step for the loss to move in a few steps
        c.sft.steps = 6
        c.sft.batch_size = 8
        c.sft.micro_batches = 1
        c.sft.epochs = 1
        c.sft.checkpoint_every = 3
        c.sft.keep_checkpoints = 2
    c.lock()
    return c
