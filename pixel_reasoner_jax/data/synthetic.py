"""Synthetic PixelReasoner data folders: the scenes of synthetic_tasks.py, template SFT trajectories that call
the real tools, and rl/sft/eval JSONL in the published schemas; `generate()` and the CLI.

Everything is a function of the seed: record i of a split draws from its own generator (seed, split, i).
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path

import av
import numpy as np
from PIL import Image

from pixel_reasoner_jax.data import trajectories as T
from pixel_reasoner_jax.data import trap_tasks
from pixel_reasoner_jax.data.synthetic_tasks import IMAGE_TASKS, Task, image_task, video_task
from pixel_reasoner_jax.tools import ops
from pixel_reasoner_jax.tools.prompts import PROMPT_STYLES

_SPLITS = {"sft": 1, "rl": 2, "eval": 3}


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator. Mixes are (kind, weight) pairs; kinds of SFT trajectories:

    image: single (one crop on target), recrop1 / recrop2 (one / two off-target crops marked `loss: false`,
    then the right one), zoom2 (a coarse crop, then a crop of the crop); video: select, reselect (a wrong
    selection first); textual: no tool call, on an image whose target is large.

    image_tasks picks the image scenes, target_scale enlarges every target, square makes every canvas
    square (one image shape); terse assistant turns hold only the tool call, or one answer sentence, with
    2-decimal boxes (short trajectories for CPU runs). prompt_style names the system and user-turn strings
    (tools/prompts.PROMPT_STYLES); a run sets it from `rollout.prompt_style`, so SFT data and rollouts agree.
    """

    image_size: int = 448
    video_size: int = 224
    num_frames: int = 16
    textual_fraction: float = 0.25
    video_fraction: float = 0.2
    image_mix: tuple[tuple[str, float], ...] = (
        ("single", 0.3),
        ("recrop1", 0.2),
        ("recrop2", 0.2),
        ("zoom2", 0.3),
    )
    video_mix: tuple[tuple[str, float], ...] = (("select", 0.9), ("reselect", 0.1))
    choice_fraction: float = 0.3
    ops_config: ops.OpsConfig = dataclasses.field(default_factory=ops.OpsConfig)
    image_tasks: tuple[str, ...] = IMAGE_TASKS
    target_scale: float = 1.0
    square: bool = False
    terse: bool = False
    trap: trap_tasks.TrapConfig | None = None  # set: the learning-trap family (data/trap_tasks.py) instead
    prompt_style: str = "released"

    def __post_init__(self):
        if not self.image_tasks or any(t not in IMAGE_TASKS for t in self.image_tasks):
            raise ValueError(
                f"image_tasks must be a non-empty subset of {IMAGE_TASKS}, got {self.image_tasks}"
            )
        if not self.target_scale > 0:
            raise ValueError(f"target_scale must be > 0, got {self.target_scale}")
        if self.image_size < 224 or self.video_size < 112:
            raise ValueError(
                f"image_size must be >= 224 and video_size >= 112, got {self.image_size}, {self.video_size}"
            )
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {tuple(PROMPT_STYLES)}, got {self.prompt_style!r}")
        if self.video_size % 2:
            raise ValueError(f"video_size must be even (yuv420p), got {self.video_size}")
        if self.num_frames < 8:
            raise ValueError(f"num_frames must be >= 8, got {self.num_frames}")
        if not (
            0 <= self.textual_fraction
            and 0 <= self.video_fraction
            and self.textual_fraction + self.video_fraction <= 1
        ):
            raise ValueError(
                "textual_fraction + video_fraction must lie in [0, 1], got "
                f"{self.textual_fraction}, {self.video_fraction}"
            )

    @property
    def templates(self):
        """The prompt strings of `prompt_style`."""
        return PROMPT_STYLES[self.prompt_style]

    def kind_weights(self) -> dict[str, float]:
        """Share of each SFT trajectory kind among all SFT records."""
        image_share = 1.0 - self.textual_fraction - self.video_fraction
        out = {"textual": self.textual_fraction}
        for mix, share in ((self.image_mix, image_share), (self.video_mix, self.video_fraction)):
            total = sum(w for _, w in mix)
            out.update({k: share * w / total for k, w in mix})
        return out


# Named generator settings (`data.synthetic_family`). "mixed": every scene, video and trajectory kind.
# "color": the CPU demo of configs/grpo.py:tiny. One closed answer set (6 colours) that a tiny model can
# learn to read, square canvases (one image shape, fewer compiled programs), targets twice the usual size
# so a crop shows them clearly, and terse turns whose trained tokens (call + answer) fit 64 positions.
# Off-target crops (recrop1) keep the loss-masked self-correction turns in the data.
FAMILIES: dict[str, SynthConfig] = {
    "mixed": SynthConfig(),
    "color": SynthConfig(
        textual_fraction=0.15,
        video_fraction=0.0,
        image_mix=(("single", 0.75), ("recrop1", 0.25)),
        choice_fraction=0.0,
        image_tasks=("color",),
        target_scale=2.0,
        square=True,
        terse=True,
    ),
    # "trap": configs/trap.py. The quarters scene with an answer prior (the asked square is red half the
    # time), and half the SFT trajectories answer from the full view: a warm-started policy that cannot yet
    # read a crop answers as well without one, and its crops sometimes fail.
    "trap": SynthConfig(
        trap=trap_tasks.TrapConfig(
            square=0.2, prior=0.5, centred=True, background=(105, 125), crop_fraction=0.5
        )
    ),
    # "quarters": the README's CPU job (configs/grpo.py:tiny). The trap scene without its answer prior,
    # squares centred in their quarters (one exact box per question), a fifth of the canvas wide on a
    # mid-grey canvas (TrapConfig.background); every SFT trajectory crops the asked square, then answers. The
    # full view shows a square a few pixels wide, a crop shows it across the central visual tokens.
    "quarters": SynthConfig(
        trap=trap_tasks.TrapConfig(
            square=0.2, prior=0.25, centred=True, background=(105, 125), crop_fraction=1.0
        )
    ),
}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split], index])


# --------------------------------------------------------------------------------------- trajectories


class _Writer:
    """Writes media under the data root and returns paths relative to it (as the published data does)."""

    def __init__(self, root: Path):
        self.root = root

    def image(self, img: Image.Image, rel: str) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, compress_level=1)
        return rel

    def video(self, frames: list[Image.Image], qid: str) -> tuple[list[str], str]:
        rels = [self.image(f, f"videos/{qid}/frame_{i + 1:02d}.png") for i, f in enumerate(frames)]
        mp4 = f"videos/{qid}.mp4"
        with av.open(str(self.root / mp4), "w") as container:
            stream = container.add_stream("libx264", rate=2)
            stream.width, stream.height = frames[0].size
            stream.pix_fmt = "yuv420p"
            # No lookahead/mb-tree: with them x264 output varied run to run on widths like 224 (seen with
            # PyAV 18), which would break byte-identical data for a seed.
            stream.options = {"crf": "10", "x264-params": "rc-lookahead=0:mbtree=0"}
            stream.codec_context.thread_count = 1  # one thread: byte-identical files for a seed
            for i, f in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.asarray(f), format="rgb24")
                frame.pts = i  # explicit timestamps: unset ones leave the encoder to guess
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        return rels, mp4


def _say(cfg: SynthConfig, text: str) -> str:
    """`text` of a turn's reasoning, or nothing for terse trajectories."""
    return "" if cfg.terse else text


def _image_trajectory(rng, task: Task, kind: str, qid: str, img_rel: str, writer: _Writer, cfg: SynthConfig):
    head = T.first_messages({"type": "image", "image": img_rel}, task.question, cfg.templates)
    if kind == T.TEXTUAL:
        text = _say(cfg, f"Looking at it, {task.explain}. ") + f"The answer is \\boxed{{{task.answer}}}."
        return [*head, {"role": "assistant", "content": [{"type": "text", "text": text}]}]
    decimals = 2 if cfg.terse else 3
    plan = T.plan_image_ops(rng, kind, task.box, task.image.size, cfg.ops_config.padding, decimals)
    ask = f"The {task.desc} is too small to make out in the full image, so I will zoom in on it."
    target = plan[-1].arguments["bbox_2d"]
    cx, cy = (target[0] + target[2]) / 2, (target[1] + target[3]) / 2
    miss = f"The cropped region does not show the {task.desc}"
    if kind == "single":
        segments = [ask]
    elif kind == "recrop1":
        segments = [ask, f"{miss}. Looking again, it is near ({cx:.2f}, {cy:.2f}) of the original image, "
                    "so I will crop there."]  # fmt: skip
    elif kind == "recrop2":
        segments = [ask, f"{miss}. Let me try another area.", "This crop misses it as well. Looking again, it "
                    f"is near ({cx:.2f}, {cy:.2f}) of the original image, so I will crop there."]  # fmt: skip
    else:  # zoom2
        segments = [f"I first zoom in on the area around the {task.desc}.",
                    f"The {task.desc} is in view but still small. I zoom in further on this crop."]  # fmt: skip
    segments = [_say(cfg, t) for t in segments]
    segments.append(
        _say(cfg, f"Now it is clear: {task.explain}. ") + f"The answer is \\boxed{{{task.answer}}}."
    )
    results = _run(task.image, None, plan, cfg, qid)
    return T.assemble(
        head, segments, plan, results, lambda k, i, img: writer.image(img, f"crops/{qid}_{k + 1}.png")
    )


def _video_trajectory(
    rng, task: Task, kind: str, qid: str, frame_rels: list[str], writer: _Writer, cfg: SynthConfig
):
    n = len(task.frames)
    start, stop = task.window
    right = list(range(max(1, start), min(n, stop + 1) + 1))  # 1-based window, one frame of margin each side
    plan = T.plan_video_ops(rng, kind, right, n)
    span = f"frames {right[0]} to {right[-1]}"
    ask = f"The {task.desc.removeprefix('small ')} appears only briefly. Let me look closely at {span}."
    segments = [ask]
    if kind == "reselect":
        segments = [
            "The target may appear only in a few frames. Let me look closely at some of them.",
            f"These frames do not show it. It should be around {span}; let me select those.",
        ]
    segments = [_say(cfg, t) for t in segments]
    segments.append(
        _say(cfg, f"In the selected frames {task.explain}. ") + f"The answer is \\boxed{{{task.answer}}}."
    )
    results = _run(None, task.frames, plan, cfg, qid)
    place = T.frame_placer(
        plan, task.frames, frame_rels, lambda img, n: writer.image(img, f"selected/{qid}_{n}.png")
    )
    head = T.first_messages({"type": "video", "video": frame_rels}, task.question, cfg.templates)
    return T.assemble(head, segments, plan, results, place)


def _trap_rows(split: str, n: int, seed: int, cfg: SynthConfig, writer: _Writer) -> list[dict]:
    """Rows of the trap family (data/trap_tasks.py): queries for rl/eval, direct or crop trajectories for sft."""
    kinds = trap_tasks.trajectory_kinds(n, seed, cfg.trap) if split == "sft" else [None] * n
    rows = []
    for i, kind in enumerate(kinds):
        task = trap_tasks.trap_task(_rng(seed, split, i), cfg.trap)
        qid = f"trap-{split}-{i:06d}"
        row, rels = _task_row(task, qid, writer)
        if kind is None:
            rows.append(row)
            continue

        def call(box, task=task, qid=qid) -> list[dict]:
            op = T.Op("crop_image", {"bbox_2d": box, "target_image": 1})
            (result,) = _run(task.image, None, [op], cfg, qid)
            crop = writer.image(result.new_images[0], f"crops/{qid}_1.png")
            return [
                {"role": "assistant", "content": [{"type": "text", "text": T.tool_call_text(op)}]},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": result.text}, {"type": "image", "image": crop}],
                },
            ]

        head = T.first_messages({"type": "image", "image": rels[0]}, task.question, cfg.templates)
        messages = trap_tasks.sft_messages(task, kind, head, call)
        meta = {k: row[k] for k in ("category", "answer", "target_box", "target_box_px", "target_color")}
        rows.append({"qid": qid, "kind": kind, **meta, "message_list": messages})
    return rows


def _run(image, frames, plan, cfg: SynthConfig, qid: str):
    state = ops.VisualState.for_video(frames) if frames else ops.VisualState.for_images([image])
    try:
        return T.run_ops(state, plan, cfg.ops_config)
    except T.PlanError as e:  # a template bug, not bad data: the generator controls every argument
        raise RuntimeError(f"template tool call of {qid} failed: {e}") from e


# ------------------------------------------------------------------------------------------ generate


def allocate_kinds(n: int, seed: int, cfg: SynthConfig) -> list[str]:
    """Exactly the configured mix (largest remainder quotas), shuffled by the seed."""
    return T.allocate_kinds(n, cfg.kind_weights(), seed)


def _task_row(task: Task, qid: str, writer: _Writer) -> tuple[dict, list[str]]:
    w, h = (task.image if task.frames is None else task.frames[0]).size
    x1, y1, x2, y2 = task.box
    row = {
        "qid": qid,
        "question": task.question,
        "answer": task.answer,
        "category": task.task,
        # RLRecord.target_box: fractions of the image (of each frame for a video), exact for the [x1, x2)
        # pixel box; the pixel box itself stays beside it.
        "target_box": [x1 / w, y1 / h, x2 / w, y2 / h],
        "target_box_px": list(task.box),
        "target_color": task.color,
    }
    if task.frames is not None:
        rels, mp4 = writer.video(task.frames, qid)
        row.update(
            image=rels,
            is_video=True,
            video_file=mp4,
            target_frames=list(range(task.window[0] + 1, task.window[1] + 1)),
        )
    else:
        rels = [writer.image(task.image, f"images/{qid}.png")]
        row.update(image=rels, is_video=False)
    return row, rels


def _query_rows(split: str, n: int, seed: int, cfg: SynthConfig, writer: _Writer) -> list[dict]:
    if cfg.trap is not None:
        return _trap_rows(split, n, seed, cfg, writer)
    kinds = np.random.default_rng([seed, 10 + _SPLITS[split]]).random(n) < cfg.video_fraction
    rows = []
    for i in range(n):
        rng = _rng(seed, split, i)
        task = (
            video_task(rng, cfg.video_size, cfg.num_frames, cfg.choice_fraction)
            if kinds[i]
            else image_task(
                rng, cfg.image_size, cfg.choice_fraction, cfg.target_scale, cfg.image_tasks, cfg.square
            )
        )
        rows.append(_task_row(task, f"synth{'video' if kinds[i] else 'image'}-{split}-{i:06d}", writer)[0])
    return rows


def _sft_rows(n: int, seed: int, cfg: SynthConfig, writer: _Writer) -> list[dict]:
    if cfg.trap is not None:
        return _trap_rows("sft", n, seed, cfg, writer)
    rows = []
    for i, kind in enumerate(allocate_kinds(n, seed, cfg)):
        rng = _rng(seed, "sft", i)
        video = kind in dict(cfg.video_mix)
        task = (
            video_task(rng, cfg.video_size, cfg.num_frames, cfg.choice_fraction)
            if video
            else image_task(
                rng,
                cfg.image_size,
                cfg.choice_fraction,
                cfg.target_scale * (3.0 if kind == "textual" else 1.0),
                cfg.image_tasks,
                cfg.square,
            )
        )
        qid = f"synth{'video' if video else 'image'}-sft-{i:06d}"
        row, rels = _task_row(task, qid, writer)
        build = _video_trajectory if video else _image_trajectory
        messages = build(rng, task, kind, qid, rels if video else rels[0], writer, cfg)
        meta = {
            k: row[k]
            for k in ("category", "answer", "target_box", "target_box_px", "target_color", "target_frames")
            if k in row
        }
        rows.append({"qid": qid, "kind": kind, **meta, "message_list": messages})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(
    out_dir: str | os.PathLike,
    *,
    num_sft: int = 32,
    num_rl: int = 32,
    num_eval: int = 16,
    image_size: int = 448,
    seed: int = 0,
    config: SynthConfig | None = None,
) -> dict[str, Path]:
    """Writes a synthetic data folder and returns {"root", "sft", "rl", "eval"} paths.

    Layout: images/<qid>.png, videos/<qid>/frame_NN.png + videos/<qid>.mp4, crops/<qid>_<k>.png (tool
    outputs of the SFT trajectories), selected/ (only for resized selected frames), and the three JSONL
    files whose media paths are relative to `out_dir`.

    Args:
      out_dir: created if missing; files of a previous run with the same names are overwritten.
      num_sft, num_rl, num_eval: record counts.
      image_size: canvas width in pixels (overrides config.image_size).
      seed: everything is a function of it.
      config: other knobs; None = defaults.
    """
    if min(num_sft, num_rl, num_eval) < 0:
        raise ValueError(f"record counts must be >= 0, got sft={num_sft} rl={num_rl} eval={num_eval}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy seed sequences), got {seed}")
    cfg = config or SynthConfig()
    trap = dataclasses.replace(cfg.trap, image_size=image_size) if cfg.trap is not None else None
    cfg = dataclasses.replace(cfg, image_size=image_size, trap=trap)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    writer = _Writer(root)
    paths = {"root": root, "sft": root / "sft.jsonl", "rl": root / "rl.jsonl", "eval": root / "eval.jsonl"}
    _write_jsonl(paths["sft"], _sft_rows(num_sft, seed, cfg, writer))
    _write_jsonl(paths["rl"], _query_rows("rl", num_rl, seed, cfg, writer))
    _write_jsonl(paths["eval"], _query_rows("eval", num_eval, seed, cfg, writer))
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-sft", type=int, default=32)
    parser.add_argument("--num-rl", type=int, default=32)
    parser.add_argument("--num-eval", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--video-size", type=int, default=224)
    args = parser.parse_args(argv)
    paths = generate(
        args.out,
        num_sft=args.num_sft,
        num_rl=args.num_rl,
        num_eval=args.num_eval,
        image_size=args.image_size,
        seed=args.seed,
        config=SynthConfig(video_size=args.video_size),
    )
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


if __name__ == "__main__":
    main()
