"""Shared helpers of the benchmarks: thread pinning, wall-clock timing, the side-by-side ratio line.

Every benchmark runs our JAX code and its peer (transformers / PyTorch) on the same machine in the same run
and ends with one line whose last token is the speedup written as `N.NNx`.
"""

import os
import statistics
import time
from collections.abc import Callable


def add_host_malloc_arg(parser) -> None:
    """`--host-malloc`, the run config's `host_malloc` (pixel_reasoner_jax/hostmem.py) for a benchmark."""
    parser.add_argument(
        "--host-malloc",
        default="auto",
        choices=("auto", "reuse", "system"),
        help="glibc malloc for the whole process, both frameworks: auto/reuse keep freed memory for reuse "
        "(as `main` does on CPU), system = glibc's defaults",
    )


def add_model_args(parser) -> None:
    """`--layer-loop`, `--weight-grad`, `--logprob-chunk` and `--logprob-bucket-steps`, the run config's
    `model.layer_loop`, `model.weight_grad` (models/layers.LAYER_LOOPS, WEIGHT_GRADS), `model.logprob_chunk`
    and `model.logprob_bucket_steps` for a benchmark; the last two default to the configs'
    (configs/base.py), so a benchmark runs the program a run would."""
    from configs.base import base_config

    parser.add_argument(
        "--logprob-bucket-steps",
        type=int,
        default=base_config().model.logprob_bucket_steps,
        help="trained-position buckets per octave (model.logprob_bucket_steps, train/steps.loss_bucket; "
        "1 = powers of two; default: configs/base.py's)",
    )
    parser.add_argument(
        "--logprob-chunk",
        "--chunk",
        type=int,
        default=base_config().model.logprob_chunk,
        help="tokens per chunk of our log-prob pass (model.logprob_chunk; default: configs/base.py's)",
    )
    parser.add_argument(
        "--layer-loop",
        default="scan",
        choices=("scan", "unroll"),
        help="our decoder / vision layer stacks: scan (model.layer_loop's default) or unroll",
    )
    parser.add_argument(
        "--weight-grad",
        default="auto",
        choices=("auto", "xla", "transposed"),
        help="how our weight gradients are formed (model.weight_grad; auto: transposed on CPU)",
    )


def pin_threads(threads: int | None = None, host_malloc: str = "auto") -> int:
    """Gives JAX (XLA) and torch the same number of threads before either is imported; returns it.

    Also applies `host_malloc` (see add_host_malloc_arg) and prints which malloc the process runs with.
    Call first thing in a benchmark's main, before importing jax or torch: XLA reads its flags once, and
    malloc settings reach only the threads started after them.
    """
    from pixel_reasoner_jax import hostmem

    # The benchmarks compare CPU against CPU: set before `configure`, whose "auto" asks which backend jax
    # will pick (with a CUDA plugin installed it would otherwise guess a GPU and keep glibc's defaults).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    kept = hostmem.configure(host_malloc)
    print(
        f"malloc ({host_malloc}): {'freed memory kept for reuse' if kept else 'glibc defaults'}", flush=True
    )
    n = int(threads or os.environ.get("BENCH_THREADS") or os.cpu_count() or 1)
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags and os.environ["JAX_PLATFORMS"] == "cpu":
        flags += f" --xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'}"
        flags += f" intra_op_parallelism_threads={n}"
    os.environ["XLA_FLAGS"] = flags.strip()
    import torch

    torch.set_num_threads(n)
    return n


def time_calls(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Wall seconds of `repeats` calls of `fn` after `warmup` untimed ones; `fn` must block until done."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def add_timing_args(parser) -> None:
    """`--steps` (timed calls per framework) and `--warmup` (untimed pairs first), for `time_interleaved`."""
    parser.add_argument("--steps", type=int, default=2, help="timed steps per framework, alternating")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps per framework first, alternating as the timed ones (the steady state is timed)",
    )


def time_interleaved(
    ours: Callable[[], object],
    peer: Callable[[], object],
    *,
    repeats: int = 5,
    settle_s: float = 2.0,
    warmup: int = 0,
) -> tuple[list[float], list[float]]:
    """Wall seconds of `repeats` calls of each, alternating ours, peer, ours, peer, after `warmup` untimed
    pairs in the same order (both must block).

    On a shared machine the load drifts over minutes: timing all of one framework and then all of the
    other lets that drift decide the ratio, alternating puts each pair under about the same load. Each
    call starts `settle_s` after the previous one ended (untimed): the thread pools of the side that just
    ran keep spinning for a while (measured on 2 cores, 2026-12-03: our step took 13.4-15.0 s right after
    a torch step and 9.8 s alone; 10.8 s after a 2 s pause), and would otherwise be billed to the other.

    The warmup pairs are for the process heap: both frameworks allocate from one malloc heap, which keeps
    freed memory (`pixel_reasoner_jax/hostmem.py`) but grows while the two allocation patterns interleave,
    and every page it grows by is zero-filled at its first touch. Measured 2026-12-05 (train_step.py, one
    warmup before): our first two timed steps took 824k and 456k page faults, 6.1 s and 3.6 s of system
    time (10.3 and 8.6 s against 6.7-7.0 s afterwards, the heap 15 -> 17 GB); torch's steps none. A run
    pays that once, in its first steps; a step time is the steady state.
    """
    for _ in range(warmup):
        for fn in (ours, peer):
            time.sleep(settle_s)
            fn()
    a, b = [], []
    for _ in range(repeats):
        time.sleep(settle_s)
        a += time_calls(ours, warmup=0, repeats=1)
        time.sleep(settle_s)
        b += time_calls(peer, warmup=0, repeats=1)
    return a, b


def spread(xs: list[float], scale: float = 1.0) -> str:
    """`min-max` of the samples times `scale`, for the printed lines (one decimal)."""
    return f"{scale * min(xs):.1f}-{scale * max(xs):.1f}"


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def ratio_line(what: str, ours: float, peer: float, unit: str, *, higher_is_better: bool) -> str:
    """`<what>: jax <ours> <unit> | torch <peer> <unit> | speedup N.NNx` (speedup > 1 means JAX is faster)."""
    speedup = ours / peer if higher_is_better else peer / ours
    return f"{what}: jax {ours:.2f} {unit} | torch {peer:.2f} {unit} | speedup {speedup:.2f}x"
