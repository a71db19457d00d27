"""Tests for answers.py: the "original" scoring (the seed's rule_reward, verdict for verdict), the "strict"
matcher, the solution string, the registry and the math_verify guards.

Each "original" expectation is derived by reading the seed's experience_maker.py (rule_reward ->
handle_boxed -> do_verify, requires_box=None); the comment names the rule that decides it (the numbers
refer to `score_original`'s docstring). Strict expectations are worked out by hand.
"""

import signal
import threading
import time

import pytest

from pixel_reasoner_jax import answers as A

# A tool call and its observation as the original's solution string carries them (pads already dropped).
OBS = (
    '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.2, 0.5, 0.6], "target_image": 1}}\n'
    "</tool_call><|im_end|>\n<|im_start|>user\nHere is the cropped image (Image Size: 448x336):"
    "<|vision_start|><|vision_end|><|im_end|>\n"
)

# (solution, gt, score, rule). V* and MVBench: letters (V* rows end with "choices:\nA: ...\nB: ..."), TallyQA:
# counts, InfoVQA: strings, percentages, multi-span, lists.
ORIGINAL_TABLE = [
    # --- the seven cases where the old matcher disagreed with the original
    ("<answer>3</answer>", "3", 1.0, "answer_tag"),  # rule 3: the first <answer>..</answer> = \boxed{3}
    ("Answer: 3", "3", 1.0, "whole_text"),  # rule 3: "Answer:" is dead after lower-casing; the whole
    # text "answer: 3" parses to 3
    ("There are 3 dogs.", "3", 1.0, "whole_text"),  # rule 3: the whole text parses to its number 3
    ("\\boxed{45 percent}", "45%", 1.0, "boxed"),  # rule 3: math_verify reads "percent" as %
    ("\\boxed{three}", "3", 0.0, "whole_text"),  # rule 3: "three" is a product of symbols, not 3
    ("\\boxed{A. the red one}", "A", 0.0, "whole_text"),  # rules 3-4: a symbol product != a; no letter rule
    ("\\boxed{(A) sitting}", "A", 0.0, "whole_text"),  # rules 3-4: likewise
    # --- V* (gt = the option letter)
    ("\\boxed{B}<|im_end|>", "B", 1.0, "boxed"),  # rule 3: b == b (lower-cased both sides, rule 1)
    ("\\boxed{(B)}", "B", 1.0, "boxed"),  # rule 3: math_verify drops the parentheses
    ("\\boxed{b}", "B", 1.0, "boxed"),  # rule 1: case-free
    ("\\boxed{B: blue}", "B", 0.0, "whole_text"),  # rule 3: "b: blue" is no letter to math_verify
    ("\\boxed{blue}", "B", 0.0, "whole_text"),  # rule 3: the option text is not the letter
    ("The answer is B.", "B", -1.0, "whole_text"),  # rule 3: no box, nothing math_verify extracts -> -1
    ("<answer>B</answer>", "B", 1.0, "answer_tag"),  # rule 3
    # the response restating the row's choices: only the box counts
    ("The choices are A: red and B: blue. The bag is blue, so \\boxed{B}.<|im_end|>", "B", 1.0, "boxed"),
    ("Among the choices, (A) red and (B) blue, it is B.", "B", -1.0, "whole_text"),  # rule 3: no number
    ("\\boxed{B}", "A", 0.0, "whole_text"),  # rule 3: b != a
    ("\\boxed{\\text{B}}", "B", 1.0, "boxed"),  # rule 2: \text dropped, leaving \boxed{{b}}
    ("on the right side. \\boxed{(B) right}", "B", 0.0, "whole_text"),  # rule 3: letter + words != b
    # --- MVBench (letters as well)
    ("\\boxed{A}", "A", 1.0, "boxed"),
    ("\\boxed{C}", "A", 0.0, "whole_text"),  # rule 3: c != a, the whole text holds the same box
    # --- TallyQA (counts)
    ("\\boxed{3}", "3", 1.0, "boxed"),
    ("\\boxed{3.0}", "3", 1.0, "boxed"),  # rule 3: numeric equality
    ("\\boxed{3}", "three", 0.0, "whole_text"),  # rule 3: "three" parses to symbols, never to 3
    ("I count 4. \\boxed{3}", "4", 0.0, "whole_text"),  # rule 3: the whole text's box wins over the 4
    ("\\boxed{12 cm}", "12", 1.0, "boxed"),  # rule 2: "cm" dropped
    ("\\boxed{2 minutes}", "2", 1.0, "boxed"),  # rule 2: "minutes" dropped
    ("\\boxed{3", "3", -1.0, "whole_text"),  # rule 3: an unclosed box parses to nothing -> -1
    (OBS + "there are several dogs", "2", 0.0, "whole_text"),  # rule 3: the whole text parses to 448
    (OBS + "there are several dogs", "448", 1.0, "whole_text"),  # rule 3: the tool result's image size
    # --- InfoVQA (strings, percentages, multi-span, lists)
    ("\\boxed{the siege of krishnapur}", "The Siege of Krishnapur", 1.0, "boxed"),  # same symbol product
    ("\\boxed{one red the}", "the red one", 0.0, "whole_text"),  # rule 3: the words' order counts
    ("\\boxed{45}", ["45%"], 1.0, "boxed"),  # rule 1: the list gets "45" inserted first
    ("\\boxed{45}", "45%", 1.0, "boxed"),  # a str gt has no percent rule; math_verify's % handling matches
    ("\\boxed{45\\%}", "45%", 1.0, "boxed"),
    ("\\boxed{apple, pear}", "pear, apple", 1.0, "multispan"),  # rule 5: parts of "pear, apple"[7:-1]
    ("\\boxed{pear and apple}", "apple, pear", 1.0, "multispan"),  # rule 5: only "pea" is checked
    ("\\boxed{anything}", "1,000", 1.0, "multispan"),  # rule 5: a <= 8-char comma gt checks "" only
    ("no box", "1,000", -1.0, "whole_text"),  # rule 5 needs a "boxed"; rule 3 found nothing -> -1
    ("\\boxed{1000}", "1,000", 1.0, "boxed"),  # rule 3: math_verify reads the thousands separator
    ("\\boxed{acme}", "acme", 1.0, "boxed"),  # rule 2: "cm" dropped from both ("ae")
    ("\\boxed{red}", ["blue", "red"], 1.0, "boxed"),  # rule 6: the second gt matches
    ("\\boxed{green}", ["blue", "red"], 0.0, "whole_text"),  # rule 6: the last gt's 0
    ("I do not know", ["blue", "3"], -1.0, "whole_text"),  # rule 6: nothing parses -> -1 for the last gt
    ("\\boxed{5}", "", -1.0, "gt_unparsed"),  # rule 2: \boxed{} parses to nothing
    # --- order of the rules and math forms
    ("<answer>7</answer> then \\boxed{9}", "7", 1.0, "answer_tag"),  # rule 3: a failed box falls through
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0, "boxed"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0, "boxed"),  # rule 2: dfrac -> frac
    ("\\boxed{\\text{yes}}", "yes", 1.0, "boxed"),  # rule 2: \text dropped
    ("\\boxed{yes}", "no", 0.0, "whole_text"),
]


@pytest.mark.parametrize("solution, gt, score, rule", ORIGINAL_TABLE)
def test_original_table(solution, gt, score, rule):
    v = A.score_original(solution, gt)
    assert (v.score, v.rule, v.correct) == (score, rule, score > 0)


def test_original_is_case_free_and_registered():
    assert A.score("original", "THE ANSWER: \\BOXED{B}", "b") == A.Verdict(True, 1.0, "boxed")
    # require_boxed belongs to "strict": the original never required a box.
    assert A.score("original", "There are 3 dogs.", "3", require_boxed=True).correct


def test_original_solution_keeps_tool_turns_and_drops_later_headers_and_pads():
    after_prompt = (
        "let me look<tool_call>{}</tool_call><|im_end|>\n<|im_start|>user\nHere is the crop "
        "<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n\\boxed{b}<|im_end|>"
    )
    assert A.original_solution(after_prompt) == (
        "let me look<tool_call>{}</tool_call><|im_end|>\n<|im_start|>user\nHere is the crop "
        "<|vision_start|><|vision_end|><|im_end|>\n\\boxed{b}<|im_end|>"
    )
    assert A.original_solution("\\boxed{3}<|im_end|>") == "\\boxed{3}<|im_end|>"


def test_original_parse_timeout_scores_minus_one(monkeypatch):
    import math_verify.parser

    real = math_verify.parser.extract_target_from_pred

    def slow(pred, *args, **kwargs):
        if "slow" in pred:
            time.sleep(3)  # interrupted by the 1 s alarm
        return real(pred, *args, **kwargs)

    monkeypatch.setattr(math_verify.parser, "extract_target_from_pred", slow)
    monkeypatch.setattr(A, "MATH_VERIFY_TIMEOUT_S", 1)
    # Both parses of the prediction (its box, then the whole text) time out: -1, as a parse failure.
    # Without the timeout the slow parse would return 3 and the verdict would be 1.
    v = A.score_original("\\boxed{3} slow", "3")
    assert (v.score, v.correct) == (-1.0, False)


def test_original_keeps_an_outer_alarm():
    old = signal.signal(signal.SIGALRM, lambda *_: None)
    prev = signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        A.score_original("\\boxed{3}", "3")  # math_verify's signal.alarm(0) would cancel it
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90.0 < remaining <= 100.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, *prev)
        signal.signal(signal.SIGALRM, old)


def test_original_refuses_other_threads():
    errors = []

    def run():
        try:
            A.score_original("\\boxed{3}", "3")
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=run, name="worker")
    t.start()
    t.join()
    assert errors and "main thread" in errors[0] and "worker" in errors[0]


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: A.score("nope", "x", "1"), ValueError, "scoring must be one of"),
        (lambda: A.score("original", None, "1"), TypeError, "response must be str"),
        (lambda: A.score("original", "x", []), ValueError, "gt list is empty"),
        (lambda: A.score("original", "x", ["1", 2]), TypeError, "every gt must be str"),
        (lambda: A.score("strict", "x", None), TypeError, "gt must be str"),
    ],
)
def test_score_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------
# extract_boxed
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{5}.", "5"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the LAST box
        ("\\boxed{a{b{c}}d} tail", "a{b{c}}d"),  # nested braces balanced
        ("\\boxed{\\text{(B)}}", "\\text{(B)}"),
        ("\\boxed{}", ""),
        ("no box here", None),
        ("\\boxed{1} and a truncated \\boxed{2", None),  # last box unclosed -> no answer
    ],
)
def test_extract_boxed(text, expected):
    assert A.extract_boxed(text) == expected


def test_extract_boxed_rejects_non_str():
    with pytest.raises(TypeError, match="text must be str"):
        A.extract_boxed(None)


# ---------------------------------------------------------------------------------------------------------
# answer_matches: a table of 40 cases
# ---------------------------------------------------------------------------------------------------------

ANSWER_TABLE = [
    ("5", "5", True),
    ("5.0", "5", True),  # numbers
    ("three", "3", True),  # number words
    ("3", "Three", True),
    ("2", "two", True),
    ("  Paris ", "paris", True),  # case + whitespace
    ("\\text{Paris}", "Paris", True),  # \text{} unwrapped
    ("\\textbf{\\text{Yes}}", "yes", True),  # nested wrappers
    ("Paris.", "paris", True),  # trailing period
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),  # dfrac -> frac
    ("\\frac{1}{2}", "0.5", True),  # 1/2 = 0.5
    ("1/2", "\\frac{1}{2}", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("5 cm", "5", True),  # units
    ("12 minutes", "12", True),
    ("\\text{7 cm}", "7", True),
    ("45", "45%", True),  # percentages
    ("45\\%", "45%", True),
    ("45%", "45", True),
    ("B", "B", True),  # letters
    ("(B)", "B", True),
    ("B.", "B", True),
    ("B: the red car", "B", True),
    ("b) red", "(B)", True),
    ("\\text{(C)}", "C", True),
    ("C", "B", False),
    ("a cat", "A", False),  # a word starting with a letter is not a choice
    ("bat", "B", False),
    ("4", ["3", "4"], True),  # list of accepted answers
    ("5", ["3", "4"], False),
    ("red, blue", "blue, red", True),  # multi-span, order-free
    ("the red one and a blue one", "red, blue", True),
    ("red only", "red, blue", False),
    ("12, 3", "1, 2", False),  # "1" is not inside "12" (whole-token spans)
    ("1000", "1,000", True),  # thousands separator
    ("x + 1", "x+1", True),  # spaces inside expressions
    ("3.14", "3.14159", False),
    ("$10$", "10", True),
    ("\\varnothing", "\\emptyset", True),
    ("30^\\circ", "30", True),
    ("", "5", False),
    ("No", "yes", False),
]


@pytest.mark.parametrize("pred, gt, expected", ANSWER_TABLE)
def test_answer_matches_table(pred, gt, expected):
    assert A.answer_matches(pred, gt) is expected


def test_answer_table_is_large_enough():
    assert len(ANSWER_TABLE) >= 30


@pytest.mark.parametrize(
    "pred, gt, err",
    [(5, "5", TypeError), ("5", 5, TypeError), ("5", [], ValueError), ("5", ["5", 5], TypeError)],
)
def test_answer_matches_bad_input(pred, gt, err):
    with pytest.raises(err, match="pred|gt"):
        A.answer_matches(pred, gt)


# ---------------------------------------------------------------------------------------------------------
# score_strict: the boxed answer (or the fallback) through answer_matches
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solution, gt, require_boxed, correct, rule",
    [
        ("thinking... \\boxed{\\frac{\\text{1}}{2}}", "0.5", True, True, "boxed"),  # unwrap -> 1/2 = 0.5
        ("\\boxed{3} no wait \\boxed{4}", "3", True, False, "boxed"),  # the last box
        ("\\boxed{three}", "3", True, True, "boxed"),  # number words (the original says no)
        ("\\boxed{A. the red one}", "A", True, True, "boxed"),  # letter "a." (the original says no)
        ("There are 3 dogs.", "3", True, False, "no_answer"),  # a box is required
        ("I looked.\nAnswer: B. the red car", "B", False, True, "fallback"),  # line after "Answer:"
        ("<answer>7</answer> ... Answer: 8", "7", False, True, "fallback"),  # <answer> first
        ("<answer>7</answer> \\boxed{9}", "9", False, True, "boxed"),  # a box beats both
        ("I do not know", "5", False, False, "no_answer"),
    ],
)
def test_strict(solution, gt, require_boxed, correct, rule):
    v = A.score("strict", solution, gt, require_boxed=require_boxed)
    assert v == A.Verdict(correct, float(correct), rule)
