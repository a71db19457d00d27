"""GRPO with curiosity bonus and operation penalty: the recipe of reference §8.2/§9 and a CPU-sized `tiny`.

Run:
  python -m pixel_reasoner_jax.main --config=configs/grpo.py:7b --workdir=/runs/grpo7b \
      --config.model.checkpoint=/ckpt/PixelReasoner-WarmStart \
      --config.data.rl_path=/data/PixelReasoner-RL-Data/release.parquet \
      --config.data.eval_path=/data/VStar-EvalData-PixelReasoner/vstar.parquet
  python -m pixel_reasoner_jax.main --config=configs/grpo.py:tiny --workdir=/tmp/grpo_tiny  # CPU, minutes
External SGLang servers: --config.rollout.backend=sglang --config.rollout.sglang_urls=http://h1:30000,...
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


def _apply_tiny_grpo(c) -> None:
    """The README's CPU job: SFT warm start, then GRPO whose accuracy rises as the policy learns to crop.

    Task family "quarters" (data/trap_tasks.py): four coloured squares, one at the centre of each quarter of
    a 448 px image, and "What colour is the square in the <quarter> quarter of the image?". The model sees
    the image at 56 px (a square ~7 px of its visual token); `crop_image` on the named square shows it
    ~21 px wide. The warm start answers directly in half of its trajectories and crops first in the other
    half, so GRPO starts from a coin flip between a guess and a look. Every 7B code path runs: masked
    multi-turn SFT, real crops in rollouts, shaped rewards, the JaxSampler, checkpoints, HF export, plots.
    """
    base.apply_cpu_quarters(c, family="quarters")
    c.sft.steps = 60
    g = c.grpo
    g.steps = 16
    c.log.checkpoint_every = 8
    c.log.plots_every = 8


def get_config(arg: str = "7b"):
    """Returns the locked GRPO ConfigDict of variant `arg` ("tiny", "3b" or "7b")."""
    variant = base.parse_variant(arg)
    c = base.base_config()  # the base values are the 7B GRPO recipe
    c.mode = "grpo"
    c.model.hf_id = base.HF_IDS_7B["grpo"]
    base.apply_variant(c, variant)
    if variant == "tiny":
        _apply_tiny_grpo(c)
    c.lock()
    return c
