"""Group advantages for GRPO (registry by name) and detection of zero-spread groups.

Host-side NumPy over a flat batch laid out group-contiguously (reference/pixel_reasoner.md §8.2, §9.3).
"""

from collections.abc import Callable

import numpy as np


def _grpo(r_ng: np.ndarray, eps: float) -> np.ndarray:
    """(r - mean) / (std + eps), std with ddof=1 as in TRL, OpenRLHF group_norm and tunix."""
    mean = r_ng.mean(axis=1, keepdims=True)
    std = r_ng.std(axis=1, ddof=1, keepdims=True)
    return (r_ng - mean) / (std + eps)


def _mean(r_ng: np.ndarray, eps: float) -> np.ndarray:
    """r - mean: the original's `--advantage_estimator group` (no std division, §8.2)."""
    del eps
    return r_ng - r_ng.mean(axis=1, keepdims=True)


def _rloo(r_ng: np.ndarray, eps: float) -> np.ndarray:
    """Leave-one-out baseline: r_i - mean_{j != i} r_j (= G/(G-1) * (r_i - mean))."""
    del eps
    g = r_ng.shape[1]
    others = (r_ng.sum(axis=1, keepdims=True) - r_ng) / (g - 1)
    return r_ng - others


AdvantageFn = Callable[[np.ndarray, float], np.ndarray]
ADVANTAGES: dict[str, AdvantageFn] = {"grpo": _grpo, "mean": _mean, "rloo": _rloo}
# Estimators that compare a sample against the others of its group need at least two of them.
_NEEDS_TWO = ("grpo", "rloo")


def _grouped(rewards, group_size) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError(f"rewards must be finite, got {r.tolist()}")
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if r.shape[0] == 0 or r.shape[0] % group_size:
        raise ValueError(
            f"rewards length {r.shape[0]} must be a positive multiple of group_size {group_size}"
        )
    return r.reshape(-1, group_size)


def group_advantages(rewards, group_size: int, name: str, *, eps: float = 1e-6) -> np.ndarray:
    """Per-sample advantages of a flat batch whose groups are contiguous blocks of `group_size`.

    Args:
        rewards: shaped rewards (B,).
        group_size: G; B must be a multiple of it.
        name: a key of `ADVANTAGES`: "grpo" (mean-centred, divided by std+eps), "mean" (mean-centred only,
            the original), "rloo" (leave-one-out).
        eps: added to the std by "grpo" so a zero-spread group gives zeros, not NaN.

    Returns:
        float64 (B,).
    """
    if name not in ADVANTAGES:
        raise ValueError(f"advantage name must be one of {sorted(ADVANTAGES)}, got {name!r}")
    r_ng = _grouped(rewards, group_size)
    if name in _NEEDS_TWO and group_size < 2:
        raise ValueError(f"advantage {name!r} needs group_size >= 2, got {group_size}")
    return ADVANTAGES[name](r_ng, eps).reshape(-1)


def uniform_groups(rewards, group_size: int, tol: float = 0.01) -> np.ndarray:
    """Which groups carry no signal: mean |r_i - mean(r)| < tol over the SHAPED rewards (§9.3).

    Args:
        rewards: shaped rewards (B,), groups contiguous.
        group_size: G.
        tol: spread threshold.

    Returns:
        bool (B/G,), True for a uniform group.
    """
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    r_ng = _grouped(rewards, group_size)
    spread = np.abs(r_ng - r_ng.mean(axis=1, keepdims=True)).mean(axis=1)
    return spread < tol
