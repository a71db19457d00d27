"""Host memory: make glibc's malloc keep freed memory for reuse in runs that compute on the CPU.

XLA's CPU runtime allocates each program's buffers (its temporaries, its outputs) with malloc at every
call, and glibc serves a block above 32 MB with a fresh `mmap` and returns it to the kernel on free. The
kernel then zero-fills every page again at its first touch in the next call. Measured on 2 cores
(benchmarks/model_step.py's step, 2.4 GB of temporaries and 1.3 GB of gradients): 1.68 million page faults
and 3.6 s of system time in a 10.3 s step, 8-10 s of a 15 s step once torch had run in the same process.
With `keep_freed_memory()` called before the first computation: no page faults after the first step, and
the step takes 8.0 s (torch's, in the same process, 4.8 -> 4.2 s). The price: the process keeps its peak
heap for its whole life, which a training process reaches at every step anyway.

Accelerator runs do not need this (their big buffers live in device memory), so `auto` leaves them alone.
"""

import ctypes
import glob
import importlib.util
import os
import pkgutil
import sys

HOST_MALLOC = ("auto", "reuse", "system")

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _glibc():
    """glibc's handle, or None (macOS, musl, Windows: their allocators are left alone)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to serve every block from its heap (no per-block mmap), never to give freed heap
    back to the kernel, and to use one arena for all threads (a thread's own arena would still mmap blocks
    larger than its 64 MB heaps). Returns False where the C library is not glibc.

    Call it before the first jax computation: XLA's worker threads take their arenas when they first
    allocate, and later settings do not move them (measured: no effect when called after a compile).
    """
    libc = _glibc()
    if libc is None:
        return False
    # mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 reads as "never trim" (a
    # positive int caps it at 2 GiB, below the temporaries of the benchmark's step).
    ok = [libc.mallopt(p, v) for p, v in ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))]
    return all(r == 1 for r in ok)


# Device nodes an accelerator shows on a Linux host: NVIDIA GPUs, AMD GPUs (ROCm), TPU chips (v4 and later
# as accel*, older ones through vfio).
ACCELERATOR_NODES = ("nvidia[0-9]*", "kfd", "accel[0-9]*", "vfio/[0-9]*")


def accelerator_expected(dev_root: str = "/dev") -> bool:
    """Whether jax will pick an accelerator, judged without starting a backend: `JAX_PLATFORMS` (or
    jax.config.jax_platforms) when set, else whether a TPU or GPU plugin is installed and the host has an
    accelerator's device node (a CUDA plugin on a machine without a GPU leaves jax on the CPU)."""
    platforms = _configured_platforms()
    if platforms:
        return platforms.split(",")[0].strip() not in ("cpu", "")
    if not _plugin_installed():
        return False
    return any(glob.glob(os.path.join(dev_root, pattern)) for pattern in ACCELERATOR_NODES)


def _configured_platforms() -> str:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if not platforms and "jax" in sys.modules:
        platforms = sys.modules["jax"].config.jax_platforms or ""
    return platforms


def _plugin_installed() -> bool:
    if importlib.util.find_spec("libtpu") is not None:
        return True
    try:
        import jax_plugins
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def configure(mode: str) -> bool:
    """Applies the `host_malloc` setting: "reuse" always, "auto" when the run computes on the CPU,
    "system" never. Returns whether malloc now keeps freed memory."""
    if mode not in HOST_MALLOC:
        raise ValueError(f"host_malloc must be one of {HOST_MALLOC}, got {mode!r}")
    if mode == "system" or (mode == "auto" and accelerator_expected()):
        return False
    return keep_freed_memory()
