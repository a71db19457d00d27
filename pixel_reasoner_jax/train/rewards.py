"""Rewards for GRPO: answer extraction and matching, accuracy, RaPR, curiosity bonus and operation penalty.

Host-side NumPy/Python only; the shaped rewards feed `train/advantages.py` (reference/pixel_reasoner.md §9).
"""

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------

_BOXED = "\\boxed{"


def _balanced_content(text: str, open_idx: int) -> str | None:
    """Returns the text between the brace at `open_idx` and its matching close brace, or None if unclosed."""
    depth = 0
    for i in range(open_idx, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
    return None


def extract_boxed(text: str) -> str | None:
    r"""Content of the LAST `\boxed{...}` in `text`, with nested braces balanced.

    An unclosed last `\boxed{` (a truncated answer) gives None rather than an earlier box: the model's final
    word is what is graded, and a truncated final word is no answer.

    Args:
        text: model output.

    Returns:
        The content (may be empty) or None when there is no `\boxed{` or the last one is unclosed.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_boxed: text must be str, got {type(text).__name__}")
    idx = text.rfind(_BOXED)
    if idx < 0:
        return None
    return _balanced_content(text, idx + len(_BOXED) - 1)


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_PREFIX = re.compile(r"answer\s*:", re.IGNORECASE)


def _fallback_answer(text: str) -> str | None:
    """First `<answer>...</answer>`, else the rest of the line after the last `Answer:` (original order)."""
    m = _ANSWER_TAG.search(text)
    if m:
        return m.group(1)
    matches = list(_ANSWER_PREFIX.finditer(text))
    if not matches:
        return None
    return text[matches[-1].end() :].strip().split("\n", 1)[0]


# ---------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------

# Wrappers whose content is kept: `\text{5 cm}` -> `5 cm`.
_UNWRAP = ("\\text{", "\\textbf{", "\\textit{", "\\mathrm{", "\\mathbf{", "\\mbox{")
# Plain substitutions, applied in order after lower-casing.
_SUBST = (
    ("\\dfrac", "\\frac"),
    ("\\tfrac", "\\frac"),
    ("\\varnothing", "\\emptyset"),
    ("\\%", "%"),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("°", ""),
    ("\\,", " "),
    ("\\;", " "),
    ("\\!", ""),
    ("\\ ", " "),
    ("$", ""),
)
# Units stripped after a number (the original's normalize_answer drops "cm" and "minutes"); deliberately
# narrow, since stripping arbitrary words would merge answers that differ in meaning.
_UNIT = re.compile(r"^(.*[\d}])\s*(?:cm|minutes|minute|mins|min)$")
_WS = re.compile(r"\s+")
_SIZING = re.compile(r"\\(?:left|right)(?![a-z])")


def _unwrap(s: str) -> str:
    for cmd in _UNWRAP:
        while True:
            idx = s.find(cmd)
            if idx < 0:
                break
            inner = _balanced_content(s, idx + len(cmd) - 1)
            if inner is None:  # unclosed: drop the command name only
                s = s[:idx] + s[idx + len(cmd) :]
            else:
                s = s[:idx] + inner + s[idx + len(cmd) + len(inner) + 1 :]
    return s


def normalize_answer(s: str) -> str:
    r"""Canonical text of an answer: the rules shared by predictions and ground truths.

    Rules, in order: lower-case; `\text{}`-like wrappers unwrapped; `\dfrac`/`\tfrac` -> `\frac`,
    `\varnothing` -> `\emptyset`, `\%` -> `%`, degree marks, `\left`/`\right`, LaTeX spaces and `$` removed;
    whitespace collapsed; trailing periods stripped; a trailing unit ("cm", "minutes", "min") after a number
    removed.
    """
    s = s.lower().strip()
    s = _unwrap(s)
    for old, new in _SUBST:
        s = s.replace(old, new)
    s = _SIZING.sub("", s)
    s = _WS.sub(" ", s).strip()
    s = s.rstrip(". ").strip()
    m = _UNIT.match(s)
    if m:
        s = m.group(1).strip()
    return s


_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUM = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
_PLAIN_NUM = re.compile(rf"^{_NUM}$")
_FRAC_TEX = re.compile(rf"^([-+]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}$")
_FRAC_SLASH = re.compile(rf"^({_NUM})\s*/\s*({_NUM})$")


def _plain_number(s: str) -> float | None:
    if not s or not _PLAIN_NUM.match(s) or not any(c.isdigit() for c in s):
        return None
    return float(s.replace(",", ""))


def _to_number(s: str) -> float | None:
    """Numeric value of a normalised answer: "3", "3.0", "1,000", "three", `\\frac{1}{2}`, "1/2"; else None."""
    if s in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[s])
    value = _plain_number(s)
    if value is not None:
        return value
    m = _FRAC_TEX.match(s) or _FRAC_SLASH.match(s)
    if m is None:
        return None
    sign = -1.0 if m.re is _FRAC_TEX and m.group(1) == "-" else 1.0
    num, den = (_plain_number(g) for g in m.groups()[-2:])
    if num is None or den is None or den == 0.0:
        return None
    return sign * num / den


# A multiple-choice letter: "b", "(b)", "(b) text", "b. text", "b: text", "b) text". A bare letter followed
# by a space ("a cat") is NOT a choice, so ordinary words are never read as letters.
_LETTER = re.compile(r"^(?:\(([a-z])\)|([a-z])(?:[.:)]|$))")


def _choice_letter(s: str) -> str | None:
    m = _LETTER.match(s)
    if m is None:
        return None
    return m.group(1) or m.group(2)


def _contains_span(text: str, part: str) -> bool:
    # Alphanumeric boundaries so "2" is not found inside "12" (the original used a bare substring test).
    return re.search(rf"(?<![a-z0-9]){re.escape(part)}(?![a-z0-9])", text) is not None


def _match_normalised(pred: str, gt: str) -> bool:
    """Applies the matching rules to two normalised answers (see `answer_matches`)."""
    if pred == gt or pred.replace(" ", "") == gt.replace(" ", ""):
        return True
    # Percentages: "45%" and "45" are the same answer (the original adds a "%"-free variant of the gt).
    p_pct, g_pct = pred.removesuffix("%").strip(), gt.removesuffix("%").strip()
    if p_pct == g_pct:
        return True
    p_num, g_num = _to_number(p_pct), _to_number(g_pct)
    if p_num is not None and g_num is not None:
        return math.isclose(p_num, g_num, rel_tol=1e-6, abs_tol=1e-9)
    g_letter = _choice_letter(gt)
    if g_letter is not None and _choice_letter(pred) == g_letter:
        return True
    # Multi-span: a gt with commas (not a number like "1,000") is matched when every part appears in pred.
    if "," in gt and g_num is None:
        parts = [p.strip() for p in gt.split(",") if p.strip()]
        if len(parts) >= 2 and all(_contains_span(pred, p) for p in parts):
            return True
    return False


def answer_matches(pred: str, gt: str | Sequence[str]) -> bool:
    r"""Whether a predicted answer matches the ground truth (our own normaliser; no math_verify).

    Both sides go through `normalize_answer` (case, whitespace, `\text{}`, trailing period, dfrac->frac,
    units "cm"/"minutes"). Then, in order, a match is any of:
      1. equal text, or equal once spaces are removed (`x + 1` == `x+1`);
      2. equal after dropping a trailing "%" on either side (gt "45%" accepts "45");
      3. equal numbers (relative tolerance 1e-6): "3" == "3.0" == "three" (words zero..twenty),
         "1,000" == "1000", `\frac{1}{2}` == "1/2" == "0.5";
      4. the same multiple-choice letter: "B", "(B)", "B.", "B: text", "(B) text" all read as "b";
      5. multi-span: a gt containing commas matches when every comma-separated part occurs in pred as a
         whole word/number (order-free).
    A list (or tuple) of ground truths matches when any of them does.

    Args:
        pred: the predicted answer text (e.g. the content of `\boxed{}`).
        gt: one accepted answer or a non-empty list of accepted answers.
    """
    if not isinstance(pred, str):
        raise TypeError(f"answer_matches: pred must be str, got {type(pred).__name__}")
    if isinstance(gt, str):
        gts = [gt]
    elif isinstance(gt, (list, tuple)):
        gts = list(gt)
        if not gts:
            raise ValueError("answer_matches: gt list is empty; expected at least one accepted answer")
        bad = [g for g in gts if not isinstance(g, str)]
        if bad:
            raise TypeError(f"answer_matches: every gt must be str, got {bad!r}")
    else:
        raise TypeError(f"answer_matches: gt must be str or list[str], got {type(gt).__name__}")
    p = normalize_answer(pred)
    if not p:
        return False
    return any(_match_normalised(p, normalize_answer(g)) for g in gts if normalize_answer(g))


def accuracy_reward(
    response_text: str,
    gt: str | Sequence[str],
    *,
    require_boxed: bool = True,
    ended_after_failed_call: bool = False,
) -> float:
    r"""Accuracy reward in {0.0, 1.0}, as the original MEANT it (reference/pixel_reasoner.md §9.1).

    Two original bugs are not copied: `requires_box` is honoured (the original shifted it to None), and the
    "ended right after a failed tool call" flag is this sample's own (the original read a group-local index).

    Args:
        response_text: the assistant text of the trajectory (tool observations excluded by the caller).
        gt: accepted answer(s).
        require_boxed: when True only the last `\boxed{}` counts; when False and there is no box, fall back
            to the first `<answer>...</answer>`, then the line after the last "Answer:".
        ended_after_failed_call: the trajectory ended right after a failed tool call; scores 0.

    Returns:
        1.0 when the extracted answer matches `gt`, else 0.0.
    """
    if not isinstance(response_text, str):
        raise TypeError(f"accuracy_reward: response_text must be str, got {type(response_text).__name__}")
    if ended_after_failed_call:
        return 0.0
    pred = extract_boxed(response_text)
    if pred is None and not require_boxed:
        pred = _fallback_answer(response_text)
    if pred is None:
        return 0.0
    return 1.0 if answer_matches(pred, gt) else 0.0


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
