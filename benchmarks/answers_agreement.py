"""Agreement of our "original" scoring (answers.py) with the seed's own rule_reward, run from its source.

  python benchmarks/answers_agreement.py --original PATH/TO/Pixel-Reasoner/curiosity_driven_rl/openrlhf/\
trainer/ppo_utils/experience_maker.py [--limit N]

Reads the seed's file, executes only its pure scoring functions (normalize_answer, do_verify, handle_boxed,
rule_reward, batch_rule_reward) with math_verify, and calls batch_rule_reward as its trainer does
(`self.executor` = None lands in `requires_box`). Scores a grid of responses x ground truths over the four
benchmarks' answer kinds with both and ends with the agreement line. Nothing of the seed is stored here.
"""

import argparse
import ast
import contextlib
import io
import itertools
import re
import sys
import time

from pixel_reasoner_jax import answers

_SEED_FUNCTIONS = {"normalize_answer", "do_verify", "handle_boxed", "rule_reward", "batch_rule_reward"}
_SEED_CONSTANTS = {"ans_indicator", "endstr"}

OBS = (
    '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.2, 0.5, 0.6], "target_image": 1}}\n'
    "</tool_call><|im_end|>\n<|im_start|>user\nHere is the cropped image (Image Size: 448x336):"
    "<|vision_start|><|vision_end|><|im_end|>\n"
)
PREDICTIONS = [
    "B", "(B)", "b", "B: blue", "blue", "A", "A. the red one", "(C) sitting",
    "3", "three", "3.0", "4", "12 cm", "2 minutes",
    "45%", "45", "45 percent", "0.45", "2,500", "2500", "1,000",
    "the red one", "one red the", "apple, pear", "pear and apple", "\\frac{1}{2}", "0.5", "\\text{yes}",
    "no", "left", "",
]  # fmt: skip
TEMPLATES = [
    "\\boxed{X}",
    "Looking closer, the answer is \\boxed{X}.<|im_end|>",
    "<answer>X</answer>",
    "Answer: X",
    "X",
    "There are X of them.",
    OBS + "So the answer is \\boxed{X}<|im_end|>",
    OBS + "X",
    "\\boxed{7} wait, no: \\boxed{X}",
    "<answer>X</answer> so \\boxed{9}",
    "\\boxed{X",
]
GTS = [
    "B", "A", "3", "three", "45%", ["45%", "forty-five percent"], "2,500", "the red one", "apple, pear",
    "0.5", "12", "yes", "left", ["red", "blue"], "1,000", "Paris",
]  # fmt: skip


def load_seed(path: str) -> dict:
    """The seed's scoring functions, executed from its source file into a fresh namespace."""
    from math_verify import parse, verify

    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    ns = {"parse": parse, "verify": verify, "re": re}
    found = set()
    for node in tree.body:
        names = set()
        if isinstance(node, ast.FunctionDef):
            names = {node.name} & _SEED_FUNCTIONS
        elif isinstance(node, ast.Assign):
            names = {getattr(t, "id", None) for t in node.targets} & _SEED_CONSTANTS
        if names:
            exec(compile(ast.Module([node], []), path, "exec"), ns)
            found |= names
    missing = (_SEED_FUNCTIONS | _SEED_CONSTANTS) - found
    if missing:
        raise ValueError(f"{path}: lacks {sorted(missing)}; expected the seed's experience_maker.py")
    return ns


def seed_score(ns: dict, solution: str, gt) -> float:
    # As convenient_get_batch_rewards_from_queries calls it: (sols, gts, eos, format, self.executor, requires_box).
    with contextlib.redirect_stdout(io.StringIO()):  # its debug prints
        return ns["batch_rule_reward"]([solution], [gt], "<|im_end|>", None, None, True)[0][-1]


def cases(limit: int | None):
    grid = itertools.product(TEMPLATES, PREDICTIONS, GTS)
    out = [(t.replace("X", p), g) for t, p, g in grid]
    return out[:limit] if limit else out


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--original", required=True, help="the seed's experience_maker.py")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N cases")
    args = parser.parse_args(argv)
    ns = load_seed(args.original)
    rows = cases(args.limit)
    agree, verdict_agree, t0 = 0, 0, time.perf_counter()
    for solution, gt in rows:
        theirs = seed_score(ns, solution, gt)
        ours = answers.score_original(solution, gt)
        agree += ours.score == theirs
        verdict_agree += ours.correct == (theirs > 0)
        if ours.score != theirs:
            print(f"DIFFER: {solution!r} gt={gt!r}: seed {theirs}, ours {ours}", file=sys.stderr)
    n = len(rows)
    dt = time.perf_counter() - t0
    print(
        f"{n} cases in {dt:.0f} s; raw score (-1/0/1) equal: {agree}/{n}; correct verdict equal: {verdict_agree}/{n}"
    )
    print(f"agreement {100 * agree / n:.2f}%")
    return agree / n


if __name__ == "__main__":
    main()
