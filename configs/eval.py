"""Benchmark evaluation with the RL loop and limits (reference §10) and a CPU-sized `tiny`.

Run:
  python -m pixel_reasoner_jax.main --config=configs/eval.py:7b --workdir=/runs/eval7b \
      --config.model.checkpoint=/ckpt/PixelReasoner-RL-v1 \
      --config.data.eval_path=/data/VStar-EvalData-PixelReasoner,/data/MVBench-EvalData-PixelReasoner
  python -m pixel_reasoner_jax.main --config=configs/eval.py:tiny --workdir=/tmp/eval_tiny  # CPU, minutes
The tiny model on given rows: add --config.data.eval_path=FILES --config.data.synthetic=False.
Textual baseline: --config.rollout.template=notool. Variants: tiny | 3b | 7b (default).
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
    """Returns the locked eval ConfigDict of variant `arg` ("tiny", "3b" or "7b")."""
    variant = base.parse_variant(arg)
    c = base.base_config()
    c.mode = "eval"
    c.model.hf_id = base.HF_IDS_7B["eval"]
    base.apply_variant(c, variant)
    if variant != "tiny":
        # The in-process sampler holds the whole eval context (eval.max_total_tokens 18192) in one bucket.
        c.data.max_seq_len = 18432
        c.data.seq_buckets = (2048, 4096, 8192, 12288, 18432)
    c.lock()
    return c
