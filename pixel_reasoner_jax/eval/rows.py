"""Per-sample rows of finished episodes in the eval dump schema (eval/metrics.SampleResult), with their images
written beside them: what eval/run.py appends and what GRPO's rollout dumps hold (eval/viewer.py renders both).
"""

import json
import pathlib
import re
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pixel_reasoner_jax.eval import metrics as em
from pixel_reasoner_jax.eval import report as er
from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.rollout import faithfulness
from pixel_reasoner_jax.rollout.episode import Trajectory
from pixel_reasoner_jax.rollout.policy import Video

MEDIA_DIR = "media"
SAMPLES = "samples.jsonl"


def safe_name(qid: str) -> str:
    """A file name for a qid (data, not model output): [A-Za-z0-9._-] only, plus a checksum of the raw qid so
    that two qids that clean to the same text stay apart."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", qid)[:80].lstrip(".") or "q"
    return f"{clean}-{zlib.crc32(qid.encode()):08x}"


def _save_png(img: Image.Image, out: pathlib.Path, rel: str) -> str:
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", compress_level=1)
    return rel


def conversation_rows(traj: Trajectory, tok: QwenTokenizer, out: pathlib.Path, j: int) -> tuple[list, list]:
    """(turns, inputs) of the viewer's row: the images are written under out/media/<safe qid>/."""
    base = f"{MEDIA_DIR}/{safe_name(traj.record.qid)}"
    appended = sum(len(t.tool_origins) for t in traj.turns if t.tool_ok)
    prompt_media = traj.media[: len(traj.media) - appended]
    inputs = []
    for k, item in enumerate(prompt_media):
        frame = item.frames[0] if isinstance(item, Video) else item
        inputs.append(_save_png(frame, out, f"{base}/input{k}.png"))
    turns, next_media = [], len(prompt_media)
    for k, t in enumerate(traj.turns):
        text = tok.decode(traj.input_ids[t.start : t.end].tolist(), skip_special_tokens=False)
        turns.append({"role": "assistant", "text": text, "images": []})
        if t.observation is None:
            continue
        n = len(t.tool_origins) if t.tool_ok else 0
        images = [_save_png(traj.media[next_media + i], out, f"{base}/s{j}_t{k}_{i}.png") for i in range(n)]
        next_media += n
        turns.append({"role": "tool", "text": t.observation, "images": images})
    return turns, inputs


def score_trajectory(
    traj: Trajectory, j: int, tok: QwenTokenizer, out: pathlib.Path, scoring: str, require_boxed: bool
) -> em.SampleResult:
    """The per-sample row of one finished episode. Eval never zeroes a correct answer after a failed call:
    `zero_after_failed_call` shaped the original's training reward only (its eval dumps score the answer)."""
    rec = traj.record
    boxed, correct, anls = em.score_response(
        traj.scored_text(scoring), rec.answer, scoring=scoring, require_boxed=require_boxed
    )
    turns, inputs = conversation_rows(traj, tok, out, j)
    crops = faithfulness.executed_crops(traj)
    return em.SampleResult(
        qid=rec.qid, benchmark=em.canonical_benchmark(rec.benchmark), question=rec.question, gt=rec.answer,
        response=traj.response_text, boxed=boxed, correct=correct, anls=anls, n_calls=traj.num_calls,
        n_failed=traj.num_failed_calls, n_valid=traj.num_valid_calls, status=traj.status, sample=j,
        n_tokens=traj.expanded_length, n_extra_keys=traj.num_ignored_keys,
        category=getattr(rec, "category", None), target_box=getattr(rec, "target_box", None),
        crop_boxes=[list(b) for i, b in crops if i == 0 and not rec.is_video],
        crop_origins=[{"image": i, "box": list(b)} for i, b in crops],
        faithful=faithfulness.sample_faithfulness(traj), turns=turns, inputs=inputs,
        solution=traj.solution_text,
    )  # fmt: skip


def media_error_row(rec, j: int, error: Exception) -> em.SampleResult:
    """The row of a sample whose record's media could not be read: counted in the report, not scored."""
    return em.SampleResult(
        qid=rec.qid, benchmark=em.canonical_benchmark(rec.benchmark), question=rec.question, gt=rec.answer,
        response="", boxed=None, correct=False, anls=0.0, n_calls=0, n_failed=0, n_valid=0,
        status=er.MEDIA_ERROR, sample=j, category=getattr(rec, "category", None),
        target_box=getattr(rec, "target_box", None), turns=[{"role": "tool", "text": str(error), "images": []}],
    )  # fmt: skip


def dump_rollouts(
    trajs: Sequence[Trajectory],
    out: pathlib.Path,
    tok: QwenTokenizer,
    *,
    group_size: int,
    groups: int,
    scoring: str,
    require_boxed: bool,
    **per_sample: np.ndarray,
) -> pathlib.Path:
    """The first `groups` groups of a rollout batch as `out/samples.jsonl` + `out/media/` (viewer input).

    Each row also carries `per_sample` values (e.g. shaped reward, advantage) under their names. Returns
    the samples file.
    """
    out.mkdir(parents=True, exist_ok=True)
    n = min(len(trajs), groups * group_size)
    with open(out / SAMPLES, "w") as f:
        for i in range(n):
            row = score_trajectory(trajs[i], i % group_size, tok, out, scoring, require_boxed).to_json()
            row.update({k: float(v[i]) for k, v in per_sample.items()})
            f.write(json.dumps(row) + "\n")
    return out / SAMPLES
