"""Synthetic scenes for PixelReasoner-style queries: a cluttered canvas with one small target (text, shape,
colour, or dots to count), or a video whose target shows in a few frames; each with its question and box.
"""

import dataclasses
import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Targets use saturated colours that the clutter palette never uses, so a target's pixels can be found by
# exact colour (shapes and text are drawn without anti-aliasing).
TARGET_COLORS = {
    "red": (220, 30, 30),
    "green": (20, 150, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 190, 0),
    "purple": (140, 40, 180),
    "orange": (240, 120, 10),
}
CLUTTER_COLORS = (
    (150, 150, 150),
    (120, 112, 100),
    (168, 178, 160),
    (100, 118, 130),
    (188, 170, 150),
    (90, 90, 90),
)
SHAPES = ("circle", "square", "triangle")
IMAGE_TASKS = ("text", "color", "shape", "count")
VIDEO_TASKS = ("text", "color", "shape")
_GLYPHS = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"  # no I/1/O/0/Q: unambiguous at small sizes


@dataclasses.dataclass
class Task:
    """One generated query and where its answer is (box in pixels, [x1, y1, x2, y2), of the image/frame)."""

    task: str
    question: str
    answer: str
    explain: str  # the clause the final turn states, e.g. 'the red text reads "K7PX"'
    desc: str  # how the turns name the target, e.g. "small red text"
    box: tuple[int, int, int, int]
    color: str  # name of the target's colour in TARGET_COLORS (its pixels have exactly that value)
    image: Image.Image | None = None
    frames: list[Image.Image] | None = None
    window: tuple[int, int] | None = None  # video: target visible in frames [start, stop), 0-based


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _word(rng) -> str:
    return "".join(rng.choice(list(_GLYPHS), size=int(rng.integers(4, 6))))


def _canvas(rng, w: int, h: int, clutter: int, font_size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    # A smooth two-colour gradient: varied backgrounds that still compress well as PNG.
    a, b = rng.integers(212, 246, size=(2, 3))
    across = rng.random() < 0.5
    ramp = np.round(a + (b - a) * np.linspace(0.0, 1.0, w if across else h)[:, None]).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(ramp[None] if across else ramp[:, None], (h, w, 3)).copy(), "RGB")
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"  # no anti-aliasing: every target pixel has the exact target colour
    for _ in range(clutter):
        colour = CLUTTER_COLORS[int(rng.integers(len(CLUTTER_COLORS)))]
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        dx, dy = (int(v) for v in rng.integers(8, max(16, w // 6), size=2))
        kind = int(rng.integers(4))
        if kind == 0:
            draw.line((x, y, x + dx, y + dy), fill=colour, width=int(rng.integers(1, 4)))
        elif kind == 1:
            draw.rectangle((x, y, x + dx, y + dy), outline=colour, width=2)
        elif kind == 2:
            draw.ellipse((x, y, x + dx, y + dy), outline=colour, width=2)
        else:
            draw.text((x, y), _word(rng), fill=colour, font=_font(font_size))
    return img, draw


def _draw_shape(draw, shape: str, box, colour) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=colour)
    elif shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
    else:
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=colour)


def _choices(rng, correct: str, pool: list[str], question: str) -> tuple[str, str, str]:
    """V*-style multiple choice: (question with `choices:` lines, answer letter, explanation suffix)."""
    others = [p for p in pool if p != correct]
    options = [correct] + [str(o) for o in rng.choice(others, size=min(3, len(others)), replace=False)]
    options = [options[i] for i in rng.permutation(len(options))]
    letter = "ABCD"[options.index(correct)]
    lines = "\n".join(f"{'ABCD'[i]}: {o}" for i, o in enumerate(options))
    return f"{question}\nchoices:\n{lines}", letter, f", which is option {letter}"


def _place(rng, w: int, h: int, bw: int, bh: int) -> tuple[int, int]:
    # A 4% margin keeps normalised box corners below 1, which the crop tool would read as pixels.
    mx, my = max(2, w // 25), max(2, h // 25)
    return int(rng.integers(mx, w - mx - bw)), int(rng.integers(my, h - my - bh))


def _target(rng, draw, task: str, w: int, h: int, scale: float, choice_fraction: float) -> Task:
    """Draws one target on `draw` and returns its question (image is filled in by the caller)."""
    colour = list(TARGET_COLORS)[int(rng.integers(len(TARGET_COLORS)))]
    fill = TARGET_COLORS[colour]
    unit = max(w, h) / 448 * scale
    if task == "text":
        word, font = _word(rng), _font(max(10, round(12 * unit)))
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        x, y = _place(rng, w, h, right - left, bottom - top)
        draw.text((x - left, y - top), word, fill=fill, font=font)
        box = draw.textbbox((x - left, y - top), word, font=font)
        q, answer, explain = (
            f"What does the small {colour} text in the image say?",
            word,
            f'the {colour} text reads "{word}"',
        )
        pool, desc = [_word(rng) for _ in range(3)] + [word], f"small {colour} text"
    elif task in ("color", "shape"):
        shape, side = (
            SHAPES[int(rng.integers(len(SHAPES)))],
            max(10, round(float(rng.uniform(12, 18)) * unit)),
        )
        x, y = _place(rng, w, h, side, side)
        box = (x, y, x + side, y + side)
        _draw_shape(draw, shape, box, fill)
        if task == "color":
            q, answer, pool = (
                f"What is the colour of the small filled {shape} in the image?",
                colour,
                list(TARGET_COLORS),
            )
            desc = f"small filled {shape}"
        else:
            q, answer, pool = f"What shape is the small {colour} object in the image?", shape, list(SHAPES)
            desc = f"small {colour} object"
        explain = f"the {desc.removeprefix('small ')} is {'a ' + shape if task == 'shape' else colour}"
    elif task == "count":
        k, r = int(rng.integers(1, 7)), max(3, round(4 * unit))
        cell = 2 * r + max(3, r)
        x0, y0 = _place(rng, w, h, 3 * cell, 2 * cell)
        cells = rng.choice(6, size=k, replace=False)
        boxes = []
        for c in sorted(int(c) for c in cells):
            ox, oy = rng.integers(0, cell - 2 * r, size=2)
            bx, by = x0 + (c % 3) * cell + int(ox), y0 + (c // 3) * cell + int(oy)
            boxes.append((bx, by, bx + 2 * r, by + 2 * r))
            _draw_shape(draw, "circle", boxes[-1], fill)
        box = (
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[2] for b in boxes),
            max(b[3] for b in boxes),
        )
        explain = f"there is 1 {colour} dot" if k == 1 else f"there are {k} {colour} dots"
        q, answer = f"How many {colour} dots are there in the image?", str(k)
        desc, pool = f"group of {colour} dots", []
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {IMAGE_TASKS}")
    if pool and rng.random() < choice_fraction:
        q, answer, suffix = _choices(rng, answer, sorted(set(pool)), q)
        explain += suffix
    return Task(task, q, answer, explain, desc, tuple(int(v) for v in box), colour)


def image_task(
    rng: np.random.Generator,
    image_size: int,
    choice_fraction: float,
    scale: float = 1.0,
    tasks: tuple[str, ...] = IMAGE_TASKS,
    square: bool = False,
) -> Task:
    """A canvas `image_size` wide (height 75-100 %, or square) with clutter and one target (`scale` x small)
    of a task drawn from `tasks`."""
    bad = [t for t in tasks if t not in IMAGE_TASKS]
    if not tasks or bad:
        raise ValueError(f"tasks must be a non-empty subset of {IMAGE_TASKS}, got {tasks!r}")
    w = image_size
    h = w if square else int(round(w * float(rng.uniform(0.75, 1.0))))
    img, draw = _canvas(rng, w, h, clutter=w * h // 3000, font_size=max(10, round(12 * w / 448)))
    task = _target(rng, draw, tasks[int(rng.integers(len(tasks)))], w, h, scale, choice_fraction)
    task.image = img
    return task


def video_task(rng: np.random.Generator, size: int, num_frames: int, choice_fraction: float) -> Task:
    """`num_frames` square frames with drifting clutter; the target shows only in a window of 2-4 frames."""
    s, n = size, num_frames
    length = int(rng.integers(2, 5))
    start = int(rng.integers(0, n - length + 1))
    # Draw the target once on a blank layer to get its pixels, then stamp it into the window's frames.
    layer = Image.new("RGB", (s, s), (0, 0, 0))
    ldraw = ImageDraw.Draw(layer)
    ldraw.fontmode = "1"
    task = _target(rng, ldraw, VIDEO_TASKS[int(rng.integers(len(VIDEO_TASKS)))], s, s, 2.0, choice_fraction)
    mask = Image.fromarray((np.asarray(layer).max(axis=-1) > 0).astype(np.uint8) * 255, "L")
    q = task.question.replace(" in the image", " that briefly appears in the video")
    task.question = q.replace("the small", "the").replace("small ", "")
    scene = np.asarray(_canvas(rng, s, s, clutter=s * s // 2500, font_size=10)[0])
    drift = rng.integers(-3, 4, size=2)
    frames = []
    for f in range(n):
        # The same scene drifting over time, so frames differ but only the window shows the target.
        img = Image.fromarray(np.roll(scene, shift=(int(drift[1]) * f, int(drift[0]) * f), axis=(0, 1)))
        if start <= f < start + length:
            img.paste(layer, (0, 0), mask)
        frames.append(img)
    task.frames, task.window = frames, (start, start + length)
    return task
