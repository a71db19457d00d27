"""Rewards for GRPO: accuracy (from the answer checker in answers.py), RaPR, curiosity bonus and operation
penalty. Host-side NumPy/Python only; the shaped rewards feed `train/advantages.py` (reference §9).
"""

import math
from collections.abc import Callable, Sequence

import numpy as np

from pixel_reasoner_jax import answers

# ---------------------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------------------


def accuracy_reward(
    solution: str,
    gt: str | Sequence[str],
    *,
    scoring: str,
    require_boxed: bool = True,
    ended_after_failed_call: bool = False,
) -> float:
    r"""Accuracy reward of one trajectory: the answer checker's score (pixel_reasoner_jax/answers.py), zeroed
    when a correct answer came right after a failed tool call (reference/pixel_reasoner.md §9.1).

    The original zeroes only `r > 0.5` (`this_r > 0.5 and final_is_error_vo`), so its -1 of an unparsable
    response stays -1; it read that flag with a group-local index (bug, not copied: the flag is this
    sample's own).

    Args:
        solution: the trajectory's text; for "original" the string `answers.original_solution` builds.
        gt: accepted answer(s).
        scoring: a key of answers.SCORINGS ("original" scores in {-1, 0, 1}, "strict" in {0, 1}).
        require_boxed: "strict" only: when False and there is no box, fall back to `<answer>`/"Answer:".
        ended_after_failed_call: the trajectory ended right after a failed tool call.
    """
    verdict = answers.score(scoring, solution, gt, require_boxed=require_boxed)
    if ended_after_failed_call and verdict.score > 0.5:
        return 0.0
    return verdict.score


# ---------------------------------------------------------------------------------------------------------
# RaPR, curiosity bonus, operation penalty
# ---------------------------------------------------------------------------------------------------------


def rapr(used_ops: np.ndarray) -> float:
    """Rate of pixel-space reasoning: share of a group's rollouts that used >= 1 visual operation.

    Args:
        used_ops: bool array (G,), True where the rollout used a visual operation.
    """
    used = np.asarray(used_ops)
    if used.dtype != np.bool_:
        raise TypeError(f"rapr: used_ops must be a bool array, got dtype {used.dtype}")
    if used.ndim != 1 or used.size == 0:
        raise ValueError(f"rapr: used_ops must be a non-empty 1-D array, got shape {used.shape}")
    return float(used.mean())


def _counts(name: str, x, g: int | None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if g is not None and arr.shape[0] != g:
        raise ValueError(f"{name} must have length {g} like acc, got {arr.shape[0]}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must hold integer counts, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.round(arr)):
        raise ValueError(f"{name} must hold non-negative integer counts, got {arr.tolist()}")
    return arr.astype(np.int64)


def _check_group(acc, n_calls, n_valid_ops, alpha, H, beta, N):
    acc_arr = np.asarray(acc, dtype=np.float64)
    if acc_arr.ndim != 1 or acc_arr.size == 0:
        raise ValueError(f"acc must be a non-empty 1-D array, got shape {acc_arr.shape}")
    if not np.all(np.isfinite(acc_arr)):
        raise ValueError(f"acc must be finite, got {acc_arr.tolist()}")
    g = acc_arr.shape[0]
    calls = _counts("n_calls", n_calls, g)
    valid = _counts("n_valid_ops", n_valid_ops, g)
    for name, v in (("alpha", alpha), ("beta", beta), ("N", N)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not (isinstance(H, (int, float)) and 0.0 <= H <= 1.0):
        raise ValueError(f"H must be a number in [0, 1] (a target RaPR), got {H!r}")
    return acc_arr, calls, valid


def _result(acc, bonus, pen, rate) -> dict:
    return {"shaped": acc + bonus + pen, "bonus": bonus, "penalty": pen, "rapr": float(rate)}


def shape_group_paper(
    acc, n_calls, n_valid_ops, *, is_video: bool, alpha, H, beta, N, curiosity=True, penalty=True
) -> dict:
    """Paper form: r' = r + alpha*max(H - RaPR, 0)*1[n_vo > 0] + beta*min(N - n_vo, 0).

    Counts VALID visual operations (n_valid_ops) for both RaPR and the terms; `n_calls` is validated but
    unused, and `is_video` is unused (the paper form does not scale by modality). Paper values: alpha 0.5,
    H 0.3, beta 0.05, N 1.

    Returns:
        dict with `shaped`, `bonus`, `penalty` (float64 arrays (G,)) and `rapr` (float).
    """
    acc_arr, _, valid = _check_group(acc, n_calls, n_valid_ops, alpha, H, beta, N)
    used = valid > 0
    rate = rapr(used)
    zeros = np.zeros_like(acc_arr)
    bonus = alpha * max(H - rate, 0.0) * used.astype(np.float64) if curiosity else zeros
    pen = beta * np.minimum(N - valid, 0).astype(np.float64) if penalty else zeros
    return _result(acc_arr, bonus, pen, rate)


def shape_group_code(
    acc, n_calls, n_valid_ops, *, is_video: bool, alpha, H, beta, N, curiosity=True, penalty=True
) -> dict:
    """Released-code form (`experience_maker.py`): a 1/RaPR-scaled bonus and a per-extra-call penalty.

    bonus = alpha*max(H - RaPR, 0) / (s*RaPR) for rollouts with >= 1 call, s = 2 (image) or 1.5 (video);
    penalty = beta*min(N - n_calls, 0). The code's constants are `FORM_CONSTANTS["code"]`: alpha 0.25,
    H 0.3, beta 0.05, N 1, which give its -0.05*(n_calls - 1) for n_calls >= 1. Counts EVERY tool-call
    turn, errored ones included (n_calls), both for RaPR and for the terms; `n_valid_ops` is validated but
    unused. With RaPR = 0 no rollout qualifies for the bonus, so the 0/0 never arises.

    Returns:
        dict with `shaped`, `bonus`, `penalty` (float64 arrays (G,)) and `rapr` (float).
    """
    acc_arr, calls, _ = _check_group(acc, n_calls, n_valid_ops, alpha, H, beta, N)
    if not isinstance(is_video, (bool, np.bool_)):
        raise TypeError(f"is_video must be a bool, got {type(is_video).__name__}")
    used = calls > 0
    rate = rapr(used)
    zeros = np.zeros_like(acc_arr)
    if curiosity and rate > 0:
        scale = 1.5 if is_video else 2.0
        bonus = alpha * max(H - rate, 0.0) / (scale * rate) * used.astype(np.float64)
    else:
        bonus = zeros
    pen = beta * np.minimum(N - calls, 0).astype(np.float64) if penalty else zeros
    return _result(acc_arr, bonus, pen, rate)


RewardShaper = Callable[..., dict]
REWARD_SHAPERS: dict[str, RewardShaper] = {"paper": shape_group_paper, "code": shape_group_code}
# Each form's own (alpha, H, beta, N): the paper's symbols (§9.2, verl-tool's PixelReasonerRewardManager) and
# the released code's literals (experience_maker.py, end of `_generate_vllm`: `/ rapr * 0.25`, `0.3 - rapr`,
# `- 0.05*(ncall-1)`). Only alpha differs. A value left None takes its form's constant.
FORM_CONSTANTS: dict[str, dict[str, float]] = {
    "paper": {"alpha": 0.5, "H": 0.3, "beta": 0.05, "N": 1},
    "code": {"alpha": 0.25, "H": 0.3, "beta": 0.05, "N": 1},
}


def form_constants(
    form: str,
    *,
    alpha: float | None = None,
    H: float | None = None,
    beta: float | None = None,
    N: float | None = None,
) -> dict[str, float]:
    """(alpha, H, beta, N) of `form`, each replaced by the value given when it is not None.

    Raises:
        ValueError: `form` is not a key of `REWARD_SHAPERS`.
    """
    if form not in FORM_CONSTANTS:
        raise ValueError(f"form must be one of {sorted(FORM_CONSTANTS)}, got {form!r}")
    given = {"alpha": alpha, "H": H, "beta": beta, "N": N}
    return {k: v if given[k] is None else given[k] for k, v in FORM_CONSTANTS[form].items()}


def batch_rewards(
    acc,
    n_calls,
    n_valid_ops,
    *,
    group_size: int,
    is_video,
    form: str,
    alpha: float | None = None,
    H: float | None = None,
    beta: float | None = None,
    N: float | None = None,
    curiosity: bool = True,
    penalty: bool = True,
) -> dict:
    """Shapes a flat batch of B = num_groups * group_size samples, laid out group-contiguously.

    Args:
        acc, n_calls, n_valid_ops: arrays (B,); samples [k*G, (k+1)*G) are the rollouts of prompt k.
        group_size: G.
        is_video: one bool for the batch, or a bool array (B,) constant within each group.
        form: a key of `REWARD_SHAPERS` ("paper" or "code").
        alpha, H, beta, N: the shaping constants; None takes the form's own (`FORM_CONSTANTS`), so
          form="code" alone gives the released code's rewards.
        curiosity, penalty: switch the bonus / the penalty off.

    Returns:
        dict with `shaped`, `bonus`, `penalty` (float64 (B,)), `rapr_per_group` (float64 (B/G,)) and `rapr`
        (float, mean over groups).
    """
    constants = form_constants(form, alpha=alpha, H=H, beta=beta, N=N)
    acc_arr = np.asarray(acc, dtype=np.float64)
    if acc_arr.ndim != 1:
        raise ValueError(f"acc must be 1-D (B,), got shape {acc_arr.shape}")
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    b = acc_arr.shape[0]
    if b == 0 or b % group_size:
        raise ValueError(f"batch size {b} must be a positive multiple of group_size {group_size}")
    calls = _counts("n_calls", n_calls, b)
    valid = _counts("n_valid_ops", n_valid_ops, b)
    n_groups = b // group_size
    if isinstance(is_video, (bool, np.bool_)):
        video = np.full((n_groups,), bool(is_video))
    else:
        vid = np.asarray(is_video)
        if vid.dtype != np.bool_ or vid.shape != (b,):
            raise ValueError(f"is_video must be a bool or a bool array of shape ({b},), got {vid.shape}")
        vid = vid.reshape(n_groups, group_size)
        if np.any(vid != vid[:, :1]):
            raise ValueError("is_video must be constant within each group (one prompt, one modality)")
        video = vid[:, 0]
    shaper = REWARD_SHAPERS[form]
    out = {k: np.zeros((b,), np.float64) for k in ("shaped", "bonus", "penalty")}
    rates = np.zeros((n_groups,), np.float64)
    for k in range(n_groups):
        sl = slice(k * group_size, (k + 1) * group_size)
        res = shaper(
            acc_arr[sl],
            calls[sl],
            valid[sl],
            is_video=bool(video[k]),
            **constants,
            curiosity=curiosity,
            penalty=penalty,
        )
        for key in out:
            out[key][sl] = res[key]
        rates[k] = res["rapr"]
    return {**out, "rapr_per_group": rates, "rapr": float(rates.mean())}
