"""Trajectory viewer: the page of a fixture eval folder escapes model output, stays self-contained, and renders
in headless Chromium (sample blocks in the DOM, a non-blank screenshot, a filter pre-selected by the URL hash)."""

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageStat

from pixel_reasoner_jax.eval import metrics as em
from pixel_reasoner_jax.eval import viewer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EVIL = "<script>alert(1)</script>"


def _row(qid, benchmark, correct, **kw):
    row = dict(qid=qid, benchmark=benchmark, question=f"question of {qid}?", gt="2", response="\\boxed{2}",
               boxed="2", correct=correct, anls=float(correct), n_calls=0, n_failed=0, n_valid=0,
               status="answered", sample=0)  # fmt: skip
    row.update(kw)
    return row


@pytest.fixture()
def eval_dir(tmp_path):
    """Four samples over two benchmarks (correct and wrong, one with a crop turn, one hostile), one bad line."""
    rng = np.random.default_rng(0)
    (tmp_path / "inputs").mkdir()
    (tmp_path / "crops").mkdir()
    photo = rng.integers(0, 255, (600, 1000, 3), dtype=np.uint8)  # wider than MAX_SIDE: gets downscaled
    Image.fromarray(photo).save(tmp_path / "inputs" / "q1.jpg")
    Image.fromarray(photo[100:300, 200:500]).save(tmp_path / "crops" / "q1_0.png")
    Image.new("RGB", (64, 48), (30, 120, 200)).save(tmp_path / "inputs" / "q3.png")
    turns = [
        {"role": "assistant", "text": '<tool_call>{"name": "crop_image"}</tool_call>', "images": []},
        {"role": "tool", "text": "Here is the cropped image:", "images": ["crops/q1_0.png"]},
        {"role": "assistant", "text": "It is \\boxed{2}", "images": []},
    ]
    rows = [
        _row("vstar-1", "vstar", True, n_calls=1, n_valid=1, turns=turns, inputs=["inputs/q1.jpg"],
             target_box=[0.2, 0.1, 0.5, 0.5], crop_boxes=[[0.2, 1 / 6, 0.5, 0.5]], category="direct_attributes"),
        _row("vstar-2", "vstar", False, gt=["3", "three"], response="no box", boxed=None),  # an old dump row
        _row("tallyqa-3", "tallyqa", True, inputs=["inputs/q3.png", "inputs/gone.png"]),
        _row("tallyqa-4", "tallyqa", False, response=f"{EVIL} \\boxed{{{EVIL}}}", boxed=EVIL, status="max_turns",
             n_calls=2, n_failed=2, inputs=["inputs/q3.png"], crop_boxes=[[0.5, 0.5, 0.4, 0.9]]),
    ]  # fmt: skip
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, '{"qid": "cut short')
    (tmp_path / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def _chromium(tmp_path, *args):
    assert shutil.which(CHROMIUM), (
        f"{CHROMIUM} not found: install the Debian package `chromium` (.ci/run does)"
    )
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=3000"]  # fmt: skip
    out = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _blocks(dom):
    """(sample blocks, the hidden ones) of a dumped DOM."""
    tags = re.findall(r'<section class="sample"[^>]*>', dom)
    return tags, [t for t in tags if " hidden" in t]


def test_page_escapes_skips_and_embeds(eval_dir):
    path = viewer.write_viewer(eval_dir)
    page = path.read_text()
    assert path == eval_dir / "report.html"
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert len(re.findall(r'<section class="sample"', page)) == 4
    assert "3 problems" in page  # the cut line, the missing image, the inverted crop box
    problems = re.findall(r"<li>(.*?)</li>", page)
    assert any("samples.jsonl:3 skipped" in p for p in problems)
    assert any("gone.png" in p for p in problems)
    assert any("crop 1 box" in p and "tallyqa-4" in p for p in problems)
    # Self-contained: no URL, stylesheet or external script; every image is a data URI of at most MAX_SIDE px.
    assert not re.search(r"https?://|<link|src=\"|url\(", page)
    media = json.loads(re.search(r'<script type="application/json" id="media">(.*?)</script>', page).group(1))
    assert len(media) == 3  # q1.jpg, the crop, q3.png (once for two samples)
    assert [uri.split(";")[0] for uri in media] == ["data:image/jpeg", "data:image/jpeg", "data:image/png"]
    sizes = [Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size for uri in media]
    assert (viewer.MAX_SIDE, round(600 * viewer.MAX_SIDE / 1000)) in sizes and (64, 48) in sizes
    # Boxes drawn over the first input: the target and the one executed crop.
    assert page.count('<rect class="target"') == 1 and page.count('<rect class="crop"') == 1


def test_rows_argument_and_cli(eval_dir):
    rows = [em.SampleResult.from_json(_row("infographicsvqa-9", "infovqa", True)), {"qid": "no fields"}]
    page = viewer.write_viewer(eval_dir, rows).read_text()
    assert len(re.findall(r'<section class="sample"', page)) == 1 and "row 1 skipped" in page
    viewer.main([str(eval_dir)])  # re-renders from samples.jsonl
    assert len(re.findall(r'<section class="sample"', (eval_dir / "report.html").read_text())) == 4


def test_image_budget(eval_dir):
    page = viewer.write_viewer(eval_dir, max_media_mb=1e-6).read_text()  # the first image spends it
    media = json.loads(re.search(r'<script type="application/json" id="media">(.*?)</script>', page).group(1))
    assert len(media) == 1 and page.count("left out: image budget spent") == 4
    assert "3 images left out" in page  # the crop, gone.png and q3.png (twice), not tried


def test_renders_in_chromium(eval_dir, tmp_path):
    url = viewer.write_viewer(eval_dir).as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url)
    blocks, hidden = _blocks(dom)
    assert len(blocks) == 4 and not hidden
    assert (
        len(re.findall(r'<img data-k="\d+" alt="[^"]*" src="data:image/', dom)) == 4
    )  # filled by the script
    assert dom.count("<script") == 2 and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom  # text, not a script

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", url)
    stat = ImageStat.Stat(Image.open(shot).convert("L"))
    assert stat.var[0] > 100, f"screenshot looks blank (variance {stat.var[0]:.1f})"


@pytest.mark.parametrize(
    "query, shown",
    [("benchmark=vstar", {"vstar-1", "vstar-2"}), ("correct=0&tool=1&status=max_turns", {"tallyqa-4"})],
)
def test_filter_from_url_hash(eval_dir, tmp_path, query, shown):
    url = viewer.write_viewer(eval_dir).as_uri() + "#" + query
    dom = _chromium(tmp_path, "--dump-dom", url)
    blocks, hidden = _blocks(dom)
    visible = {re.search(r"</b> (\S+) #", dom[dom.index(t) :]).group(1) for t in blocks if t not in hidden}
    assert visible == shown
    assert f'<b id="shown">{len(shown)}</b>' in dom
