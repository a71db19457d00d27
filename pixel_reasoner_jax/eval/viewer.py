"""Trajectory viewer: renders an eval folder's `samples.jsonl` into one self-contained `report.html` (turns with
their images and crops inline, verdict, answer, ground truth, summary counts, filters).

The page needs nothing but the file: images are data: URIs (downscaled on the host to MAX_SIDE px), styles
and the filter script are inline. Model output is untrusted, so every text is HTML-escaped.
Re-render a finished dump without a model: `python -m pixel_reasoner_jax.eval.viewer EVAL_DIR`.
"""

import argparse
import base64
import html
import io
import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging
from PIL import Image

from pixel_reasoner_jax.eval import metrics as em
from pixel_reasoner_jax.eval import report as er
from pixel_reasoner_jax.processing.vision import to_rgb
from pixel_reasoner_jax.rollout.media import image_to_png_bytes

REPORT = "report.html"
SAMPLES = "samples.jsonl"
# Longest image side in the page: enough to read a crop; a photo is then ~100 KB as JPEG.
MAX_SIDE = 768
# Images past this many MiB of data URIs are left out (and counted): a browser tab chokes on a 1 GB page, and
# a full InfoVQA + MVBench eval would make one.
MAX_MEDIA_MB = 200
JPEG_QUALITY = 85
FILTERS = ("benchmark", "correct", "tool", "status")  # the sample blocks' data-* keys the URL hash can select


def read_samples(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """The dump rows of a samples.jsonl, extra keys (turns, inputs, boxes) kept.

    Returns:
        (rows, problems): a line that is not JSON or lacks a SampleResult field is skipped and named in problems.
    """
    rows, problems = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(f"{path}:{lineno} skipped: not JSON: {e}")
                    continue
                rows += _checked(row, f"{path}:{lineno}", problems)
    return rows, problems


def _checked(row: Any, where: str, problems: list[str]) -> list[Mapping[str, Any]]:
    """[row] when it has every SampleResult field, typed (a SampleResult becomes its dump row); else [] and why."""
    row = row.to_json() if isinstance(row, em.SampleResult) else row
    try:
        if not isinstance(row, Mapping):
            raise TypeError(f"expected a JSON object, got {type(row).__name__}")
        em.SampleResult.from_json(row)
    except (TypeError, ValueError) as e:
        problems.append(f"{where} skipped: {e}")
        return []
    return [row]


def encode_image(path: pathlib.Path, max_side: int = MAX_SIDE) -> str:
    """Data URI of the image at most max_side px on its long side.

    Lossless PNG for flat graphics (at most 256 colours: synthetic images, rendered text), JPEG otherwise: a
    photo's PNG is ~8x larger and ~30x slower to encode.
    """
    with Image.open(path) as img:
        img = to_rgb(img)
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        img.load()  # a small image is still lazy: read it before the file closes
    if img.getcolors(256) is not None:
        mime, data = "image/png", image_to_png_bytes(img, compress_level=6)
    else:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
        mime, data = "image/jpeg", buf.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class _Media:
    """Each image file encoded once; blocks refer to it by index (a query's input is shared by its samples)."""

    def __init__(self, root: pathlib.Path, problems: list[str], max_mb: float):
        self.root, self.problems = root, problems
        self.index: dict[str, int] = {}
        self.uris: list[str] = []
        self.budget, self.spent, self.left_out = max_mb * 2**20, 0, set()

    def img(self, rel: Any, boxes: str = "") -> str:
        if not isinstance(rel, str) or not rel:
            self.problems.append(f"image path {rel!r} is not a non-empty string")
            return '<span class="missing">[bad image path]</span>'
        if rel not in self.index:
            if self.spent >= self.budget:
                self.left_out.add(rel)
                return f'<span class="missing">[{_esc(rel)} left out: image budget spent]</span>'
            try:
                uri = encode_image(self.root / rel)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                self.problems.append(f"image {rel}: {type(e).__name__}: {e}")
                self.index[rel] = -1
            else:
                self.index[rel] = len(self.uris)
                self.uris.append(uri)
                self.spent += len(uri)
        k = self.index[rel]
        if k < 0:
            return f'<span class="missing">[unreadable image {_esc(rel)}]</span>'
        pic = f'<span class="pic"><img data-k="{k}" alt="{_esc(rel)}">{boxes}</span>'
        return f"<figure>{pic}<figcaption>{_esc(rel)}</figcaption></figure>"


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _box(b: Any) -> tuple[float, ...] | None:
    """A normalized [x1, y1, x2, y2] box, or None when it is not one."""
    ok = isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
    if not ok or not (0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1):
        return None
    return tuple(float(v) for v in b)


def _overlay(row: Mapping[str, Any], problems: list[str]) -> str:
    """An SVG over the first input image: the target box (green) and the executed crops (orange, numbered)."""
    boxes = [("target", "target", row.get("target_box"))] if row.get("target_box") is not None else []
    boxes += [("crop", f"crop {i + 1}", b) for i, b in enumerate(row.get("crop_boxes") or [])]
    shapes = []
    for cls, label, raw in boxes:
        b = _box(raw)
        if b is None:
            problems.append(f"{row['qid']}: {label} box {raw!r} is not a normalized [x1, y1, x2, y2]")
            continue
        x1, y1, x2, y2 = b
        shapes.append(
            f'<rect class="{cls}" x="{x1}" y="{y1}" width="{x2 - x1}" height="{y2 - y1}"><title>{label}</title></rect>'
        )
    if not shapes:
        return ""
    return f'<svg viewBox="0 0 1 1" preserveAspectRatio="none">{"".join(shapes)}</svg>'


def _turns(row: Mapping[str, Any], media: _Media) -> str:
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:  # an old dump: the response is the one assistant turn
        turns = [{"role": "assistant", "text": row["response"]}]
    out = []
    for t in turns:
        if not isinstance(t, Mapping):
            media.problems.append(f"{row['qid']}: turn {t!r} is not an object")
            continue
        role = str(t.get("role", "?"))
        images = t.get("images") or []
        imgs = "".join(media.img(p) for p in images) if isinstance(images, list) else ""
        out.append(
            f'<div class="turn {_esc(role)}"><div class="role">{_esc(role)}</div>'
            f"<pre>{_esc(t.get('text', ''))}</pre>{imgs}</div>"
        )
    return "".join(out)


def _sample(row: Mapping[str, Any], media: _Media) -> str:
    gt = row["gt"] if isinstance(row["gt"], str) else " | ".join(row["gt"])
    tool = row["n_calls"] > 0
    attrs = dict(
        benchmark=row["benchmark"], correct=int(row["correct"]), tool=int(tool), status=row["status"]
    )
    data = " ".join(f'data-{k}="{_esc(v)}"' for k, v in attrs.items())
    verdict = '<b class="ok">correct</b>' if row["correct"] else '<b class="bad">wrong</b>'
    inputs = row.get("inputs") or []
    figs = ""
    if isinstance(inputs, list):
        figs = "".join(
            media.img(p, _overlay(row, media.problems) if i == 0 else "") for i, p in enumerate(inputs)
        )
    category = f" · {_esc(row['category'])}" if row.get("category") else ""
    boxed = "—" if row["boxed"] is None else _esc(row["boxed"])
    return (
        f'<section class="sample" {data}><h2>{verdict} {_esc(row["qid"])} #{_esc(row.get("sample", 0))} '
        f"<small>{_esc(row['benchmark'])}{category} · {_esc(row['status'])} · calls {row['n_calls']} "
        f"(valid {row['n_valid']}, failed {row['n_failed']}) · ANLS {row['anls']:.2f}</small></h2>"
        f'<p class="q">{_esc(row["question"])}</p><div class="inputs">{figs}</div>'
        f"<p>answer: <code>{boxed}</code> · ground truth: <code>{_esc(gt)}</code></p>{_turns(row, media)}</section>"
    )


def _summary(rows: list[Mapping[str, Any]]) -> str:
    if not rows:
        return "<p>No samples.</p>"
    report = er.aggregate(rows)
    head = "<tr><th>benchmark</th><th>n</th><th>correct</th><th>score</th><th>ANLS</th><th>RaPR</th><th>status</th></tr>"
    body = []
    for name, b in [*report["benchmarks"].items(), ("overall", report["overall"])]:
        status = ", ".join(f"{k} {v}" for k, v in b["status"].items())
        body.append(
            f"<tr><td>{_esc(name)}</td><td>{b['n']}</td><td>{round(b['accuracy'] * b['n'])}</td>"
            f"<td>{100 * b['score']:.1f} ({b['primary']})</td><td>{100 * b['anls']:.1f}</td>"
            f"<td>{100 * b['rapr']:.1f}</td><td>{_esc(status)}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def _select(name: str, options: Iterable[tuple[str, str]]) -> str:
    opts = "".join(f'<option value="{_esc(v)}">{_esc(label)}</option>' for v, label in options)
    return f'<label>{name} <select id="f-{name}"><option value="">all</option>{opts}</select></label>'


_CSS = """body{font:14px system-ui,sans-serif;margin:1em 2em;background:#fafafa;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
.sample{background:#fff;border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.5em 1em}
.sample[hidden]{display:none}h2{font-size:15px;margin:.3em 0}small{color:#666;font-weight:normal}
.ok{color:#1a7f37}.bad{color:#cf222e}.q{font-weight:600}.missing{color:#cf222e}
pre{white-space:pre-wrap;word-break:break-word;margin:.2em 0;font-size:13px}
.turn{border-left:4px solid #8ab4f8;padding-left:.6em;margin:.5em 0}.turn.tool{border-color:#f0b429}
.role{font-size:11px;color:#666;text-transform:uppercase}
figure{display:inline-block;margin:.3em .6em .3em 0;vertical-align:top}
figcaption{font-size:11px;color:#666}.pic{display:block;position:relative}
.pic img{display:block;max-width:384px;max-height:384px}.pic svg{position:absolute;inset:0;width:100%;height:100%}
rect{fill:none;stroke-width:2;vector-effect:non-scaling-stroke}rect.target{stroke:#1a7f37}rect.crop{stroke:#f08c00}
.filters label{margin-right:1em}"""

# Fills the images from the media table, then shows the blocks that match the URL hash (#benchmark=x&correct=1):
# the filters are shareable links, and a headless browser can pre-select one.
_JS = """const M=JSON.parse(document.getElementById('media').textContent);
for(const i of document.querySelectorAll('img[data-k]'))i.src=M[+i.dataset.k];
const F=%s;
function apply(){const p=new URLSearchParams(location.hash.slice(1));let n=0;
for(const s of document.querySelectorAll('.sample')){const ok=F.every(f=>!p.get(f)||s.dataset[f]===p.get(f));
s.hidden=!ok;n+=ok}for(const f of F)document.getElementById('f-'+f).value=p.get(f)||'';
document.getElementById('shown').textContent=n}
function pick(){const p=new URLSearchParams();for(const f of F){const v=document.getElementById('f-'+f).value;
if(v)p.set(f,v)}location.hash=p.toString()}
for(const f of F)document.getElementById('f-'+f).onchange=pick;window.onhashchange=apply;apply();"""


def render(
    rows: list[Mapping[str, Any]], eval_dir: pathlib.Path, problems: list[str], max_media_mb: float
) -> str:
    """The report page of dump rows whose image paths are relative to eval_dir; appends what it skips to problems."""
    media = _Media(eval_dir, problems, max_media_mb)
    blocks = "".join(_sample(r, media) for r in rows)
    if media.left_out:
        problems.append(
            f"{len(media.left_out)} images left out: the page's {max_media_mb} MiB image budget is spent"
        )
    selects = (
        _select("benchmark", ((b, b) for b in sorted({r["benchmark"] for r in rows})))
        + _select("correct", (("1", "correct"), ("0", "wrong")))
        + _select("tool", (("1", "used a tool"), ("0", "no tool")))
        + _select("status", ((s, s) for s in sorted({r["status"] for r in rows})))
    )
    notes = ""
    if problems:
        items = "".join(f"<li>{_esc(p)}</li>" for p in problems)
        notes = (
            f'<details><summary class="missing">{len(problems)} problems</summary><ul>{items}</ul></details>'
        )
    media_json = json.dumps(media.uris).replace("</", "<\\/")
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{_esc(eval_dir.name)} trajectories</title>'
        f"<style>{_CSS}</style></head><body><h1>Trajectories: {_esc(eval_dir)}</h1>{_summary(rows)}{notes}"
        f'<p class="filters">{selects} showing <b id="shown">{len(rows)}</b> of {len(rows)} · images at most '
        f"{MAX_SIDE} px</p>{blocks}"
        f'<script type="application/json" id="media">{media_json}</script>'
        f"<script>{_JS % json.dumps(list(FILTERS))}</script></body></html>\n"
    )


def write_viewer(
    eval_dir: str | os.PathLike,
    rows: Iterable[Mapping[str, Any] | em.SampleResult] | None = None,
    max_media_mb: float = MAX_MEDIA_MB,
) -> pathlib.Path:
    """Writes eval_dir/report.html from rows (default: eval_dir/samples.jsonl) and returns its path.

    Rows that lack a SampleResult field, unreadable images, malformed boxes and the images past max_media_mb
    MiB are skipped, logged and listed in the page; nothing raises for bad content.
    """
    eval_dir = pathlib.Path(eval_dir)
    problems: list[str] = []
    if rows is None:
        rows, problems = read_samples(eval_dir / SAMPLES)
    else:
        rows = [row for i, r in enumerate(rows) for row in _checked(r, f"row {i}", problems)]
    page = render(rows, eval_dir, problems, max_media_mb)
    for p in problems:
        logging.warning("viewer: %s", p)
    path = eval_dir / REPORT
    tmp = path.with_name(REPORT + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)  # a browser never opens a half-written page
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", help="an eval folder holding samples.jsonl (and the images it names)")
    parser.add_argument("--max_media_mb", type=float, default=MAX_MEDIA_MB, help="image budget of the page")
    args = parser.parse_args(argv)
    print(write_viewer(args.eval_dir, max_media_mb=args.max_media_mb))


if __name__ == "__main__":
    main()
