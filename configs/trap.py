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


def get_config(arg: str = "curiosity"):
    """Returns the locked ConfigDict of the trap run `arg` ("curiosity" or "no_curiosity")."""
    variant = (arg or "curiosity").strip().lower()
    if variant not in VARIANTS:
        raise ValueError(f"configs/trap.py variant {arg!r} is unknown; expected one of {VARIANTS}")
    c = base.base_config()
    c.mode = "grpo"
    base.apply_variant(c, "tiny")
    c.workdir = f"runs/trap_{variant}"
    base.apply_cpu_quarters(c, family="trap")  # sizes shared with configs/grpo.py:tiny
    c.data.num_sft = 1024
    # 100 warm-start steps: calls well-formed, the crop's colour not yet read (the README job's reader
    # appears by ~200), so a crop earns no more than the answer prior does without one.
    c.sft.steps = 100
    c.grpo.warm_start_lr = 1e-2
    c.optim.lr = 1e-3
    c.grpo.steps = 30

    rw = c.reward
    # Paper form with alpha 2 and H 0.5. A cropping rollout earns alpha * (H - RaPR) more than its accuracy;
    # while cropping answers worse than answering directly by a gap d (~0.1-0.25 here at first), the bonus
    # holds RaPR where the two balance, near H - d / alpha. Measured (seeds 0 and 1, 30 GRPO steps): alpha 1
    # held RaPR at 0.27 and 0.44 over the last five steps, alpha 2 at 0.46 and 0.66. The paper's alpha 0.5,
    # H 0.3 pays at most 0.15, less than the gap, and lets RaPR fall like no bonus at all.
    rw.form = "paper"
    rw.alpha = 2.0
    rw.H = 0.5
    rw.curiosity = variant == "curiosity"

    # probe/p_call: the share of responses that open with a crop, read without sampling noise (train/probe.py).
    c.log.call_probe = 16
    c.log.checkpoint_every = 0
    c.log.plots_every = 0
    c.log.progress = False
    c.lock()
    return c
