"""Attention forward + backward on CPU: the blocked kernel (models/blocked_attention.py) vs the dense masked
softmax, at a decoder-like causal shape and a vision-like block-diagonal shape; prints ms and the ratio.

    python benchmarks/attention.py [--steps 3] [--threads N] [--tokens 2048] [--block 256]

TPU splash attention has no CPU speed to measure (Pallas interpret mode is an emulator): its TPU memory
plan against blocked and dense, compiled ahead of time from a CPU host, is benchmarks/attention_tpu_plan.py.
"""

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
from common import add_host_malloc_arg, median, pin_threads, time_calls  # noqa: E402


def cases(tokens: int):
    """(name, shapes, causal, segments): decoder B=1 N=8 K=2 H=64 causal with a padded tail; vision
    full attention over 4 images of different sizes (block-diagonal segments), N=K=16, H=80."""
    import numpy as np

    text_seg = (np.arange(tokens) < tokens - tokens // 16).astype(np.int32)[None]
    sizes = np.array([0.4, 0.3, 0.2, 0.1]) * tokens
    vis_seg = np.repeat(np.arange(1, 5), sizes.astype(int)).astype(np.int32)
    vis_seg = np.pad(vis_seg, (0, tokens - vis_seg.size))[None]
    return [
        ("decoder causal", (1, tokens, 8, 2, 64), True, text_seg),
        ("vision block-diagonal", (1, tokens, 16, 16, 80), False, vis_seg),
    ]


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed calls per kernel (after one warmup)")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    parser.add_argument("--tokens", type=int, default=2048, help="sequence length T = S")
    parser.add_argument("--block", type=int, default=None, help="query and key tile (default: the kernel's)")
    add_host_malloc_arg(parser)
    args = parser.parse_args(argv)
    threads = pin_threads(args.threads, args.host_malloc)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from pixel_reasoner_jax.models.layers import attention

    tiles = {} if args.block is None else {"block_q": args.block, "block_k": args.block}

    def fwd_bwd_ms(impl, q, k, v, seg, causal):
        blocks = tiles if impl == "blocked" else {}

        def loss(q, k, v):
            out = attention(q, k, v, q_segments=seg, kv_segments=seg, causal=causal, impl=impl, **blocks)
            return jnp.sum(out * out)

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        return 1e3 * median(time_calls(lambda: jax.block_until_ready(compiled(q, k, v)), repeats=args.steps))

    lines = []
    for name, (b, t, n, k, h), causal, seg in cases(args.tokens):
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
        kv = [jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32) for _ in range(2)]
        ms = {impl: fwd_bwd_ms(impl, q, *kv, jnp.asarray(seg), causal) for impl in ("dense", "blocked")}
        line = (
            f"{name} B={b} T={t} N={n} K={k} H={h} fwd+bwd ({threads} threads): dense {ms['dense']:.1f} ms | "
            f"blocked {ms['blocked']:.1f} ms | speedup {ms['dense'] / ms['blocked']:.2f}x"
        )
        print(line, flush=True)
        lines.append(line)
    return lines


if __name__ == "__main__":
    main()
