"""The score CLI against transformers: ids from HF apply_chat_template, log-probs from an HF forward.

Conversations with text only, two images of different sizes and a 4-frame video, scored two per batch,
with bad lines between them (reported, written as errors, never a crash).
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pixel_reasoner_jax import score
from pixel_reasoner_jax.processing import vision as pv

TEXT = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is two plus three?"},
    {"role": "assistant", "content": "Two plus three is \\boxed{5}."},
]
TWO_IMAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image", "image": "a.png"},
            {"type": "text", "text": "Compare this picture"},
            {"type": "image", "image": "sub/b.png"},
            {"type": "text", "text": "with this one."},
        ],
    },
    {"role": "assistant", "content": "The second one is taller."},
]
VIDEO = [
    {
        "role": "user",
        "content": [
            {"type": "video", "video": [f"frames/{i}.png" for i in range(4)], "fps": 2.0},
            {"type": "text", "text": "What moves?"},
        ],
    },
    {"role": "assistant", "content": "A square moves to the right."},
]
SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _line(messages) -> str:
    return json.dumps({"messages": messages})


# line number -> (messages or raw text, expected error fragment or None)
LINES = {
    1: (TEXT, None),
    2: (TWO_IMAGES, None),
    3: ("{not json", "not valid JSON"),
    4: (VIDEO, None),
    5: ([{"role": "user", "content": [{"type": "image", "image": "broken.png"}]}], "cannot decode image"),
    6: ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}], "no image path"),
    7: ([{"role": "user", "content": [{"type": "image", "image": "missing.png"}]}], "no image file"),
    8: ([{"role": "robot", "content": "beep"}], "role must be one of"),
    9: (SHORT, None),
}


@pytest.fixture(scope="module")
def scored(tiny_ckpt, tmp_path_factory):
    """Writes media and conversations, runs the CLI once (batch size 2); returns (dir, rows, stderr)."""
    d = tmp_path_factory.mktemp("score")
    (d / "sub").mkdir()
    (d / "frames").mkdir()
    _noise(100, 60, 1).save(d / "a.png")  # resized to 112x56
    _noise(64, 150, 2).save(d / "sub" / "b.png")  # resized to 56x140
    for i in range(4):
        _noise(112, 112, 10 + i).save(d / "frames" / f"{i}.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    text = "\n".join(v if isinstance(v, str) else _line(v) for v, _ in LINES.values()) + "\n"
    (d / "in.jsonl").write_text(text)
    import io

    log = io.StringIO()
    scorer = score.Scorer(str(tiny_ckpt), batch_size=2, chunk=16)
    report = score.score_file(scorer, str(d / "in.jsonl"), str(d / "out.jsonl"), log=log, progress=False)
    rows = [json.loads(x) for x in (d / "out.jsonl").read_text().splitlines()]
    return d, rows, log.getvalue(), report


@pytest.fixture(scope="module")
def hf(tiny_ckpt):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_ckpt), dtype=torch.float32).eval()
    return (
        model,
        AutoTokenizer.from_pretrained(str(tiny_ckpt)),
        AutoImageProcessor.from_pretrained(str(tiny_ckpt)),
    )


def _hf_reference(hf, d, ckpt, messages):
    """(ids, log-probs) from transformers: template ids with pads expanded by the HF image processor's grids.

    The video's pixels come from our preprocessing of the (already final-size) frames: transformers'
    video processor applies its own default pixel limits, not preprocessor_config.json's.
    """
    model, tok, img_proc = hf
    out = tok.apply_chat_template(messages, tokenize=True)
    ids = list(out["input_ids"] if not isinstance(out, list) else out)
    kw = {}
    images = [
        Image.open(d / it["image"])
        for m in messages
        if isinstance(m["content"], list)
        for it in m["content"]
        if it["type"] == "image"
    ]
    videos = [
        it for m in messages if isinstance(m["content"], list) for it in m["content"] if it["type"] == "video"
    ]
    counts = {}
    if images:
        enc = img_proc(images=images, return_tensors="pt")
        kw.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
        counts[model.config.image_token_id] = [int(g.prod()) // 4 for g in enc["image_grid_thw"]]
    if videos:
        (item,) = videos
        frames = [Image.open(d / p) for p in item["video"]]
        pix, grid, sec = pv.preprocess_video(
            frames, pv.ImageProcessorConfig.from_pretrained(ckpt), item["fps"]
        )
        kw.update(
            pixel_values_videos=torch.tensor(pix),
            video_grid_thw=torch.tensor(grid[None]),
            second_per_grid_ts=torch.tensor([sec]),
        )
        counts[model.config.video_token_id] = [int(np.prod(grid)) // 4]
    expanded = []
    for t in ids:
        expanded += [t] * (counts[t].pop(0) if t in counts else 1)
    ids_t = torch.tensor([expanded])
    tt = torch.where(
        ids_t == model.config.image_token_id, 1, torch.where(ids_t == model.config.video_token_id, 2, 0)
    )
    with torch.no_grad():
        logits = model(
            input_ids=ids_t, attention_mask=torch.ones_like(ids_t), mm_token_type_ids=tt, **kw
        ).logits[0]
    lp = torch.log_softmax(logits.double(), -1)
    return expanded, lp[:-1].gather(-1, ids_t[0, 1:, None])[:, 0].numpy()


def test_one_output_line_per_input_line(scored):
    _, rows, _, report = scored
    assert len(rows) == len(LINES)
    assert report.scored == sum(err is None for _, err in LINES.values())
    assert [n for n, _ in report.bad] == [n for n, (_, err) in LINES.items() if err is not None]


@pytest.mark.parametrize("n", [n for n, (_, err) in LINES.items() if err is None])
def test_ids_and_logprobs_match_transformers(scored, hf, tiny_ckpt, n):
    d, rows, _, _ = scored
    row = rows[n - 1]
    ids, want = _hf_reference(hf, d, tiny_ckpt, LINES[n][0])
    assert row["input_ids"] == ids
    assert row["logprobs"][0] is None and len(row["logprobs"]) == len(ids)
    got = np.array(row["logprobs"][1:], np.float64)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n", [n for n, (_, err) in LINES.items() if err is not None])
def test_bad_lines_reported_and_written_as_errors(scored, n):
    _, rows, log, _ = scored
    fragment = LINES[n][1]
    assert set(rows[n - 1]) == {"error"}
    assert rows[n - 1]["error"].startswith(f"line {n}:") and fragment in rows[n - 1]["error"]
    assert any(line.startswith(f"line {n}:") and fragment in line for line in log.splitlines())


def test_summary_line(scored):
    _, _, log, report = scored
    assert f"scored {report.scored} conversations; {len(report.bad)} bad lines" in log


def test_cli_main_writes_output(tiny_ckpt, tmp_path, capsys):
    """The argparse entry point end to end on a text-only file with one bad line."""
    (tmp_path / "in.jsonl").write_text(_line(SHORT) + "\n\n")
    report = score.main(
        [
            "--checkpoint",
            str(tiny_ckpt),
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output",
            str(tmp_path / "out.jsonl"),
            "--batch-size",
            "1",
            "--no-progress",
        ]
    )
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "logprobs" in rows[0] and "empty line" in rows[1]["error"]
    assert report.scored == 1 and "line 2: empty line" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(tiny_ckpt, tmp_path):
    with pytest.raises(SystemExit):
        score.main(["--checkpoint", str(tiny_ckpt), "--input", str(tmp_path / "nope.jsonl"), "--output", "x"])
    with pytest.raises(ValueError, match="batch_size and chunk must be >= 1"):
        score.Scorer(str(tiny_ckpt), batch_size=0)
