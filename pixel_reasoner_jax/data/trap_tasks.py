"""The learning-trap task family: four coloured squares, one per quarter of the image, and a question that
names one quarter; its SFT trajectories either answer from the full view or crop the named square first.

In the model's full view (the image resized to 56 px, one visual token per quarter) a square is a few pixels
of its token; a crop of the named square shows it large and alone. The asked colour follows an answer prior,
so a policy warm-started on a mix of both trajectories answers directly about as well as the prior, while its
own crops are still poor (call syntax and boxes half-learned, a failed call scores 0): the setting in which
GRPO without a curiosity bonus stops cropping (the paper's learning trap, reference/pixel_reasoner.md §9.2,
§11 "Training dynamics").
"""

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from pixel_reasoner_jax.data.synthetic_tasks import TARGET_COLORS, Task

COLORS = ("red", "green", "blue", "yellow")
# (column, row) of each quarter, named as the question names it.
QUARTERS = {"top-left": (0, 0), "top-right": (1, 0), "bottom-left": (0, 1), "bottom-right": (1, 1)}
TRAJECTORY_KINDS = ("direct", "crop", "stray")


@dataclasses.dataclass(frozen=True)
class TrapConfig:
    """Knobs of the trap family.

    Attributes:
      image_size: side of the square canvas in pixels.
      square: side of each coloured square as a fraction of the canvas.
      crop_fraction: share of SFT trajectories that crop before answering (the rest answer directly); 0.5
        puts the warm-started policy's first-token choice near a coin flip.
      prior: probability that the asked square is red (the other colours share the rest): an answer prior,
        as benchmarks have, which a policy can exploit without looking; 1/4 = no prior.
      background: [lo, hi) of the canvas's grey-ramp end points (0-255). Light by default. Near the
        processor's normalisation mean (~115) the canvas normalises to ~0, so a randomly initialised vision
        tower's features carry the squares rather than the background: the colour spread of the narrow
        tiny model's crop features at init is ~2.5x larger at (105, 125) than at (215, 245), and after 250
        crop-only SFT steps it read the crop's colour (15 of 24 right) where the light canvas left it at
        chance (5 of 24; measured 2026-12-02).
      centred: every square sits at the centre of its quarter, so the crop of the asked square is one of
        four boxes named by the question (a tiny policy learns the call exactly; its crops are valid from
        the start). False: a random place in the quarter and a box of its own.
      stray: share of the crop trajectories that crop a random OTHER quarter's square and answer the colour
        that crop shows (a noisy demonstrator: its calls, crops and readings are well-formed, its box is
        bound to the asked quarter only part of the time). The warm-started policy then binds its boxes
        about as often as the demonstrator did, whatever the seed, and only the reward can teach it more.
    """

    image_size: int = 448
    square: float = 0.07
    crop_fraction: float = 0.5
    prior: float = 0.5
    centred: bool = False
    background: tuple[int, int] = (215, 245)
    stray: float = 0.0

    def __post_init__(self):
        if self.image_size < 112:
            raise ValueError(f"TrapConfig.image_size must be >= 112, got {self.image_size}")
        if not 0.02 <= self.square <= 0.2:
            raise ValueError(f"TrapConfig.square must lie in [0.02, 0.2] of the canvas, got {self.square}")
        if not 0.0 <= self.crop_fraction <= 1.0:
            raise ValueError(f"TrapConfig.crop_fraction must lie in [0, 1], got {self.crop_fraction}")
        lo, hi = self.background
        if not 0 <= lo < hi <= 256:
            raise ValueError(
                f"TrapConfig.background must be [lo, hi) with 0 <= lo < hi <= 256, got {self.background}"
            )
        if not 0.0 <= self.stray <= 1.0:
            raise ValueError(f"TrapConfig.stray must lie in [0, 1], got {self.stray}")
        if not 1 / len(COLORS) <= self.prior <= 1.0:
            raise ValueError(f"TrapConfig.prior must lie in [1/{len(COLORS)}, 1], got {self.prior}")


@dataclasses.dataclass
class TrapTask(Task):
    """A trap scene's task; `decoy` is (box, colour) of a random other quarter's square (a stray crop's)."""

    decoy: tuple[tuple[int, int, int, int], str] | None = None


def trap_task(rng: np.random.Generator, cfg: TrapConfig) -> TrapTask:
    """One canvas with a square of each colour of COLORS (shuffled over the quarters) and its question."""
    s = cfg.image_size
    side = max(4, round(cfg.square * s))
    half = s // 2
    # The crop tool pads a box by 10% of the canvas per side; squares keep half that from the quarter edges,
    # so a tight crop of one square never shows another.
    margin = s // 20 + 2
    lo, hi = margin, half - side - margin
    a, b = rng.integers(cfg.background[0], cfg.background[1], size=(2, 3))
    ramp = np.round(a + (b - a) * np.linspace(0.0, 1.0, s)[:, None]).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(ramp[None], (s, s, 3)).copy(), "RGB")
    draw = ImageDraw.Draw(img)
    quarter = int(rng.integers(len(QUARTERS)))
    rest = 1.0 - cfg.prior
    asked = COLORS[int(rng.choice(len(COLORS), p=[cfg.prior] + [rest / (len(COLORS) - 1)] * 3))]
    colours = [c for c in COLORS if c != asked]
    colours = [colours[i] for i in rng.permutation(len(colours))]
    colours.insert(quarter, asked)
    boxes = {}
    for (name, (col, row)), colour in zip(QUARTERS.items(), colours):
        if cfg.centred:
            x, y = col * half + (half - side) // 2, row * half + (half - side) // 2
        else:
            x = col * half + int(rng.integers(lo, hi + 1))
            y = row * half + int(rng.integers(lo, hi + 1))
        boxes[name] = ((x, y, x + side, y + side), colour)
        draw.rectangle((x, y, x + side - 1, y + side - 1), fill=TARGET_COLORS[colour])
    quarter = list(QUARTERS)[quarter]
    box, colour = boxes[quarter]
    # Drawn last, so the scenes and questions of every seed are those of configs without strays.
    others = [q for q in QUARTERS if q != quarter]
    decoy = boxes[others[int(rng.integers(len(others)))]]
    return TrapTask(
        task="trap",
        question=f"What colour is the square in the {quarter} quarter of the image?",
        answer=colour,
        explain=f"the square in the {quarter} quarter is {colour}",
        desc=f"square in the {quarter} quarter",
        box=box,
        color=colour,
        image=img,
        decoy=decoy,
    )


def trajectory_kinds(n: int, seed: int, cfg: TrapConfig) -> list[str]:
    """Exactly round(n * crop_fraction) cropping kinds among n, the rest "direct", shuffled by the seed; of
    the cropping ones, round(n_crop * stray) are "stray", the others "crop"."""
    n_crop = int(round(n * cfg.crop_fraction))
    kinds = ["crop"] * n_crop + ["direct"] * (n - n_crop)
    kinds = [kinds[i] for i in np.random.default_rng([seed, 0]).permutation(n)]
    cropping = [i for i, k in enumerate(kinds) if k == "crop"]
    n_stray = int(round(n_crop * cfg.stray))
    for i in np.random.default_rng([seed, 1]).permutation(cropping)[:n_stray]:
        kinds[i] = "stray"
    return kinds


def sft_messages(
    task: TrapTask, kind: str, head: list[dict], call: Callable[[list[float]], list[dict]]
) -> list[dict]:
    r"""The assistant side of one SFT trajectory, appended to `head` (system + user messages).

    "direct": one turn `\boxed{colour}`. "crop": a `crop_image` call on the square's box (as fractions of
    the canvas), the tool's observation, then `\boxed{colour}`. Both turns are bare, so the first sampled
    token is the decision (`<tool_call>` or `\boxed`) and GRPO moves it directly. "stray": a crop of the
    task's decoy (another quarter's square) answered with the decoy's colour, as a demonstrator that looked
    in the wrong place would.

    Args:
      task: from `trap_task`.
      kind: one of TRAJECTORY_KINDS.
      head: the system and user messages.
      call: box -> [assistant call message, tool observation message] (runs the real tool).
    """
    if kind not in TRAJECTORY_KINDS:
        raise ValueError(f"trap trajectory kind must be one of {TRAJECTORY_KINDS}, got {kind!r}")
    target, colour = task.decoy if kind == "stray" else (task.box, task.answer)
    answer = {"role": "assistant", "content": [{"type": "text", "text": f"\\boxed{{{colour}}}"}]}
    if kind == "direct":
        return [*head, answer]
    s = task.image.size[0]
    box = [round(v / s, 2) for v in target]
    return [*head, *call(box), answer]
