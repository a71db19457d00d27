"""The one answer checker: is a response's answer the ground truth? Two scorings by name (`SCORINGS`):
"original" (the seed's `rule_reward`, verdict for verdict, quirks included) and "strict" (a boxed answer).

The GRPO reward, the episode's answer detection and eval all read this module. It sits below rollout/,
train/ and eval/ and imports none of them.
"""

import dataclasses
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from functools import lru_cache

# ---------------------------------------------------------------------------------------------------------
# Verdicts and the registry
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a scoring says about one response.

    Attributes:
      correct: the answer counts as right (eval accuracy; the original's eval counts `score > 0`).
      score: the accuracy reward. "strict": 0.0 or 1.0. "original": its raw `res`, 1.0, 0.0 or -1.0 (a
        math_verify parse failure, exception or timeout); its TRAINING reward added this value as is
        (`this_r = float(mres)` in `_generate_vllm`), so a response with nothing parseable scores -1 there.
      rule: which rule decided (see the scoring's docstring), for reports and tests.
    """

    correct: bool
    score: float
    rule: str


Gt = str | Sequence[str]
Scoring = Callable[..., Verdict]


def _gt_list(gt: Gt, who: str) -> list[str]:
    if isinstance(gt, str):
        return [gt]
    if isinstance(gt, (list, tuple)):
        if not gt:
            raise ValueError(f"{who}: gt list is empty; expected at least one accepted answer")
        bad = [g for g in gt if not isinstance(g, str)]
        if bad:
            raise TypeError(f"{who}: every gt must be str, got {bad!r}")
        return list(gt)
    raise TypeError(f"{who}: gt must be str or list[str], got {type(gt).__name__}")


def _check_text(text, who: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{who}: the response must be str, got {type(text).__name__}")


# ---------------------------------------------------------------------------------------------------------
# Boxed answers (the episode's "answered" status, the strict scoring, ANLS's prediction)
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

    Returns:
        The content (may be empty) or None when there is no `\boxed{` or the last one is unclosed.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_boxed: text must be str, got {type(text).__name__}")
    idx = text.rfind(_BOXED)
    if idx < 0:
        return None
    return _balanced_content(text, idx + len(_BOXED) - 1)


# ---------------------------------------------------------------------------------------------------------
# The original's solution string
# ---------------------------------------------------------------------------------------------------------

ASSISTANT_START = "<|im_start|>assistant\n"
_VISION_PADS = ("<|image_pad|>", "<|video_pad|>")


def original_solution(text_after_prompt: str) -> str:
    """The string the original's `rule_reward` scored, from the decoded tokens after the prompt.

    The original decodes the whole multi-turn conversation with special tokens, drops the image/video pads,
    and keeps `"".join(text.split(ASSISTANT_START)[1:])` (`extract_qwen_query_and_response`): every token
    after the FIRST assistant header, i.e. all assistant turns AND the tool-result user turns, with the
    LATER assistant headers cut out. Our prompts end with that first header, so the caller decodes
    `input_ids[prompt_length:]` with special tokens kept and passes it here.

    Example: `"look<tool_call>..</tool_call><|im_end|>\\n<|im_start|>user\\nHere is the cropped image
    <|vision_start|><|image_pad|><|vision_end|><|im_end|>\\n<|im_start|>assistant\\n\\\\boxed{b}<|im_end|>"`
    -> the same without the pad and without the second `<|im_start|>assistant\\n`.
    """
    _check_text(text_after_prompt, "original_solution")
    for pad in _VISION_PADS:
        text_after_prompt = text_after_prompt.replace(pad, "")
    return "".join(text_after_prompt.split(ASSISTANT_START))


# ---------------------------------------------------------------------------------------------------------
# "original": the seed's rule_reward (experience_maker.py: rule_reward, handle_boxed, do_verify)
# ---------------------------------------------------------------------------------------------------------

# math_verify's own defaults, which the original ran with (it called parse/verify without arguments).
MATH_VERIFY_TIMEOUT_S = 5
_INDICATORS = ("\\boxed", "<answer>", "Answer:")
# The original's normalize_answer, in order (it guards each with `if x in answer`, a no-op difference).
_ORIGINAL_REPLACEMENTS = (
    ("dfrac", "frac"),
    ("\\text", ""),
    ("\\varnothing", "\\emptyset"),
    ("minutes", ""),
    ("cm", ""),
)


def _original_normalize(s: str) -> str:
    for old, new in _ORIGINAL_REPLACEMENTS:
        s = s.replace(old, new)
    return s


def _keep_outer_alarm(fn: Callable, *args):
    """Runs a math_verify call and re-arms an outer SIGALRM timer (a test timeout, a caller's own) that its
    `signal.alarm(0)` cancels on the way out."""
    remaining, interval = signal.getitimer(signal.ITIMER_REAL)
    t0 = time.monotonic()
    try:
        return fn(*args)
    finally:
        if remaining > 0:
            left = max(remaining - (time.monotonic() - t0), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, interval)


def _math_verify():
    """(parse, verify, TimeoutException), imported on first use: math_verify pulls in sympy (~1 s)."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    return parse, verify, TimeoutException


def _parse(text: str) -> list:
    """math_verify.parse with its defaults, as the original called it; a timeout returns [] inside it."""
    parse, _, _ = _math_verify()
    return _keep_outer_alarm(lambda t: parse(t, parsing_timeout=MATH_VERIFY_TIMEOUT_S), text)


def _verify(pred: list, gold: list) -> bool:
    """math_verify.verify(pred, gold): the original passes the PREDICTION as the library's `gold`."""
    _, verify, _ = _math_verify()
    return _keep_outer_alarm(lambda a, b: verify(a, b, timeout_seconds=MATH_VERIFY_TIMEOUT_S), pred, gold)


@lru_cache(maxsize=4096)
def _parse_gt(gt: str) -> tuple:
    """The parsed ground truth (cached: every rollout of a group parses the same gt)."""
    return tuple(_parse(gt if "\\boxed" in gt else f"\\boxed{{{gt}}}"))


def _do_verify(pred: str, gold: tuple) -> float:
    """The original's do_verify: 1.0 / 0.0, or -1.0 when the prediction parses to nothing or anything raises.

    Its letter shortcut (`gold[1] in 'ABCDEFGHIJK'` -> compare the first letter after `\\boxed{`) needs an
    UPPER-case parsed gt, which never exists after rule_reward lower-cases it: gt "B" -> gold[1] == "b".
    """
    _, _, timeout_exc = _math_verify()
    try:
        parsed = _parse(pred)
        if len(gold) > 1 and gold[1] in "ABCDEFGHIJK":  # a non-str gold[1] raises here -> -1, as there
            return float(pred[len(_BOXED) :].startswith(gold[1]))
        if not parsed:
            return -1.0
        return float(_verify(parsed, list(gold)))
    except (Exception, timeout_exc):  # the original's bare `except:`; a timeout counts as an exception
        return -1.0


def _original_one(sol: str, ans: str) -> tuple[float, str]:
    """The original's handle_boxed with requires_box falsy, for one lower-cased gt: (res, rule)."""
    _, _, timeout_exc = _math_verify()
    try:
        gold = _parse_gt(_original_normalize(ans))
    except (Exception, timeout_exc):  # the original's try around the gt parse: -1
        return -1.0, "gt_unparsed"
    if not gold:
        return -1.0, "gt_unparsed"
    for indicator in _INDICATORS:
        if indicator not in sol:
            continue
        if indicator == "<answer>":
            found = re.search("<answer>(.*?)</answer>", sol)  # no DOTALL: the tag must close on its line
            if not found:
                continue
            pred, rule = f"\\boxed{{{found.group(1)}}}", "answer_tag"
        elif indicator == "Answer:":  # dead: the solution is lower-cased, "Answer:" never occurs in it
            pred, rule = f"\\boxed{{{sol.split(indicator)[-1].strip()}}}", "answer_prefix"
        else:
            pred, rule = sol[sol.rindex(indicator) :].strip(), "boxed"
        res = _do_verify(_original_normalize(pred), gold)
        if res > 0.99:
            return res, rule
    return _do_verify(_original_normalize(sol), gold), "whole_text"


def _require_main_thread(who: str) -> None:
    # math_verify bounds each parse/verify with SIGALRM, which only the main thread can set; in another
    # thread every call would raise (and score -1 in the original's bare except). Fail loudly instead.
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            f"{who}: the 'original' scoring must run in the main thread (math_verify times out by SIGALRM); "
            f"called from thread {threading.current_thread().name!r}"
        )


def score_original(solution: str, gt: Gt, **_options) -> Verdict:
    r"""The original's `rule_reward` verdict (its call path: `requires_box` receives the executor, None).

    `solution` is the original's solution string (`original_solution`); `gt` one answer or a list. Rules,
    in order, each with an example of the quirk it carries:
      1. Lower-case the solution and every gt. A list gt holding a "%" answer gets that answer without "%"
         inserted FIRST (gt ["45%"] -> ["45", "45%"]); a str gt is one answer.
      2. For each gt in order (normalize_answer: "dfrac"->"frac", "\text" dropped, "minutes" and "cm"
         dropped ANYWHERE, so gt "acme" reads "ae"), parse `\boxed{gt}` with math_verify; nothing parsed
         -> -1 for this gt.
      3. Else try, in order, the text from the LAST `\boxed` to the end ("boxed"), the first
         `<answer>..</answer>` on one line ("answer_tag"), the text after the last "Answer:" (dead after
         lower-casing: "Answer: 3" is decided by the whole text), each normalised, parsed and verified;
         the first score > 0.99 wins. Else the whole solution ("whole_text"): "There are 3 dogs." matches
         gt 3, and the tool-result turns are part of it: a response with no answer after an observation
         "(Image Size: 448x336)" matches gt 448.
         math_verify compares math: `\boxed{45 percent}` == 45% (its unit handling), `\boxed{three}` != 3,
         `\boxed{(A) sitting}` != a (a product of symbols), `\boxed{the red one}` == "the red one" but
         `\boxed{one red the}` != it. A prediction that parses to nothing, any exception and a parse
         timeout score -1 (a verify timeout scores 0, as math_verify returns False).
      4. The letter shortcut of do_verify never fires after lower-casing (see `_do_verify`).
      5. If this gt scored <= 0.5 and contains a comma ("multispan"): its parts are
         `gt[7:-1].split(",")` -- the original strips a `\boxed{` and `}` that the gt does not have -- and
         all of them must be substrings of the text from the last "boxed". So "apple, pear" checks only
         "pea", and a comma gt of <= 8 characters ("1,000") has the empty part only: ANY boxed response is
         correct.
      6. The last gt's score is the result: ["a", "b"] with "a" -> -1 and "b" -> 0 gives 0.
    The original's "Now everything looks fine. Solution finished." check never fires (capitals against a
    lower-cased text), and its eos/"wait" validity flag never reaches the reward. Runs math_verify with
    its default 5 s timeouts, so one response costs at most a few timeouts, never a stall.

    Returns:
        Verdict(correct = score > 0, score in {-1, 0, 1}, rule = the deciding rule of the LAST gt tried).
    """
    _check_text(solution, "score_original")
    _require_main_thread("score_original")
    gts = [g.lower() for g in _gt_list(gt, "score_original")]
    if not isinstance(gt, str):
        percent = next((g.replace("%", "") for g in gts if "%" in g), None)
        if percent is not None and percent not in gts:
            gts.insert(0, percent)
    sol = solution.lower()
    res, rule = 0.0, "none"
    for ans in gts:
        res, rule = _original_one(sol, ans)
        if res > 0.5:
            break
        if "," in ans:
            parts = [p.lower().strip() for p in ans[len(_BOXED) : -1].split(",")]
            at = sol.rfind("boxed")
            if at == -1:
                continue
            tail = "\\" + sol[at:]
            if all(p in tail for p in parts):
                res, rule = 1.0, "multispan"
                break
    return Verdict(correct=res > 0, score=res, rule=rule)


# ---------------------------------------------------------------------------------------------------------
# "strict": our own normaliser, a \boxed{} answer required (or the <answer>/"Answer:" fallback)
# ---------------------------------------------------------------------------------------------------------

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
    r"""Canonical text of an answer for the strict scoring: the rules shared by predictions and gts.

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


def answer_matches(pred: str, gt: Gt) -> bool:
    r"""Whether a predicted answer matches the ground truth under the strict scoring (no math_verify).

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
    gts = _gt_list(gt, "answer_matches")
    p = normalize_answer(pred)
    if not p:
        return False
    return any(_match_normalised(p, normalize_answer(g)) for g in gts if normalize_answer(g))


def score_strict(solution: str, gt: Gt, *, require_boxed: bool = True, **_options) -> Verdict:
    r"""The last `\boxed{}` of the response matched by `answer_matches`.

    With `require_boxed` False and no box, the first `<answer>...</answer>`, then the line after the last
    "Answer:" is matched instead (rule "fallback"). No answer found: rule "no_answer", score 0.
    """
    _check_text(solution, "score_strict")
    gts = _gt_list(gt, "score_strict")
    pred, rule = extract_boxed(solution), "boxed"
    if pred is None and not require_boxed:
        pred, rule = _fallback_answer(solution), "fallback"
    if pred is None:
        return Verdict(correct=False, score=0.0, rule="no_answer")
    ok = answer_matches(pred, gts)
    return Verdict(correct=ok, score=float(ok), rule=rule)


SCORINGS: dict[str, Scoring] = {"original": score_original, "strict": score_strict}


def score(scoring: str, solution: str, gt: Gt, *, require_boxed: bool = True) -> Verdict:
    """Scores one response with the scoring named `scoring` (a key of SCORINGS).

    Args:
      scoring: "original" or "strict".
      solution: the response; for "original" the string `original_solution` builds (what the original saw).
      gt: one accepted answer or a list of them.
      require_boxed: "strict" only (the original never required a box).
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {sorted(SCORINGS)}, got {scoring!r}")
    return SCORINGS[scoring](solution, gt, require_boxed=require_boxed)
