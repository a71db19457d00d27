"""Tests of data/synthetic.py: determinism, schemas read back by the loaders, target boxes, trajectory mix
and structure, crops that (do not) show the target, and the mp4 round trip through the video reader."""

import hashlib
import json
import re
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pixel_reasoner_jax.data import records as R
from pixel_reasoner_jax.data import synthetic as S
from pixel_reasoner_jax.data import synthetic_tasks as T

CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.S)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    t0 = time.perf_counter()
    paths = S.generate(out, num_sft=32, num_rl=32, num_eval=8, image_size=448, seed=0)
    seconds = time.perf_counter() - t0
    assert seconds < 30, f"tiny generation took {seconds:.1f} s; the brief asks for < 10 s"
    return paths


def _hashes(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_same_seed_same_files(data, tmp_path):
    again = S.generate(tmp_path / "a", num_sft=32, num_rl=32, num_eval=8, image_size=448, seed=0)
    want = _hashes(data["root"])
    assert any(k.endswith(".mp4") for k in want) and any(k.startswith("crops/") for k in want)
    assert _hashes(again["root"]) == want
    other = S.generate(tmp_path / "b", num_sft=4, num_rl=4, num_eval=0, image_size=448, seed=1)
    assert _hashes(other["root"])["rl.jsonl"] != want["rl.jsonl"]


def test_loaders_read_every_record(data):
    for split, n in (("rl", 32), ("eval", 8)):
        recs, report = R.load_rl_records(data[split])
        assert report.kept == n and not report.skipped
        assert {r.benchmark for r in recs} <= {"synthimage", "synthvideo"}
        for r, row in zip(recs, _rows(data[split]), strict=True):
            assert len(r.images) == (16 if r.is_video else 1)
            # the task kind and the target's box (fractions of the image or frame) reach the record
            size = Image.open(r.images[0]).size
            assert r.category == row["category"] and r.category in T.IMAGE_TASKS + T.VIDEO_TASKS
            want = [v / size[i % 2] for i, v in enumerate(row["target_box_px"])]
            assert r.target_box == pytest.approx(want) and all(0 <= v <= 1 for v in r.target_box)
    sft, report = R.load_sft_records(data["sft"])
    assert report.kept == 32 and not report.skipped
    assert any(r.is_video for r in sft) and any(not r.is_video for r in sft)


def _target_mask(img, colour):
    return np.all(np.asarray(img.convert("RGB")) == np.array(T.TARGET_COLORS[colour]), axis=-1)


def _inside(mask, box):
    x1, y1, x2, y2 = box
    inner = np.zeros_like(mask)
    inner[y1:y2, x1:x2] = True
    return mask.any() and not (mask & ~inner).any()


def test_target_pixels_lie_in_the_recorded_box(data):
    rows = _rows(data["rl"]) + _rows(data["eval"])
    assert {r["category"] for r in rows if not r["is_video"]} == set(T.IMAGE_TASKS)
    for row in rows:
        box = row["target_box_px"]
        if not row["is_video"]:
            img = Image.open(data["root"] / row["image"][0])
            assert _inside(_target_mask(img, row["target_color"]), box), row["qid"]
            # the target is SMALL: its box covers under 2 % of the canvas
            assert (box[2] - box[0]) * (box[3] - box[1]) < 0.02 * img.width * img.height
            continue
        shown = set(row["target_frames"])
        assert 2 <= len(shown) <= 4
        for k, rel in enumerate(row["image"], 1):
            mask = _target_mask(Image.open(data["root"] / rel), row["target_color"])
            assert _inside(mask, box) if k in shown else not mask.any(), (row["qid"], k)


def test_answers_and_choices(data):
    for row in _rows(data["rl"]) + _rows(data["sft"]):
        question = row["question"] if "question" in row else row["message_list"][1]["content"][-1]["text"]
        if re.fullmatch("[A-D]", row["answer"]):
            option = re.search(rf"\nchoices:\n(?:[A-D]: .*\n)*{row['answer']}: (.*)", question)
            assert option, question
        elif row["category"] == "count":
            assert row["answer"].isdigit()
        if "message_list" in row:
            assert row["message_list"][-1]["content"][0]["text"].endswith(f"\\boxed{{{row['answer']}}}.")


STRUCTURE = {  # kind -> (tool, calls, erroneous leading calls)
    "textual": (None, 0, 0),
    "single": ("crop_image", 1, 0),
    "recrop1": ("crop_image", 2, 1),
    "recrop2": ("crop_image", 3, 2),
    "zoom2": ("crop_image", 2, 0),
    "select": ("select_frames", 1, 0),
    "reselect": ("select_frames", 2, 1),
}


def _check_structure(row):
    tool, n_calls, n_bad = STRUCTURE[row["kind"]]
    msgs = row["message_list"]
    turns = [m for m in msgs if m["role"] == "assistant"]
    calls = [json.loads(c) for m in turns for c in CALL.findall(m["content"][0]["text"])]
    assert len(turns) == n_calls + 1 and len(calls) == n_calls
    assert [m.get("loss", True) for m in turns] == [False] * n_bad + [True] * (n_calls + 1 - n_bad)
    assert R.assistant_turn_mask(msgs, "per_turn") == [
        m["role"] == "assistant" and m.get("loss", True) for m in msgs
    ]
    for c in calls:
        assert c["name"] == tool
        if tool == "crop_image":
            assert len(c["arguments"]["bbox_2d"]) == 4 and all(0 <= v < 1 for v in c["arguments"]["bbox_2d"])
        else:
            assert 1 <= len(c["arguments"]["target_frames"]) <= 8
    if row["kind"] == "zoom2":
        assert [c["arguments"]["target_image"] for c in calls] == [1, 2]
    return calls


def test_mix_and_structure_over_hundreds_of_trajectories(tmp_path):
    cfg = S.SynthConfig(video_size=112)
    n = 300
    paths = S.generate(tmp_path, num_sft=n, num_rl=0, num_eval=0, image_size=224, seed=5, config=cfg)
    rows = _rows(paths["sft"])
    counts = Counter(r["kind"] for r in rows)
    weights = cfg.kind_weights()
    assert weights == pytest.approx(
        {
            "textual": 0.25,
            "single": 0.165,
            "recrop1": 0.11,
            "recrop2": 0.11,
            "zoom2": 0.165,
            "select": 0.18,
            "reselect": 0.02,
        }
    )
    for kind, w in weights.items():
        assert abs(counts[kind] - n * w) <= 1, (kind, counts[kind], n * w)
    for row in rows:
        _check_structure(row)


def test_crops_show_the_target_only_when_meant_to(data):
    root = data["root"]
    seen = Counter()
    for row in _rows(data["sft"]):
        calls = _check_structure(row)
        msgs, want = row["message_list"], np.array(T.TARGET_COLORS[row["target_color"]], float)
        if not calls or row["kind"] in ("select", "reselect"):
            continue
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"][:-1]
        for i in turns:
            obs = msgs[i + 1]["content"]
            crop = Image.open(root / obs[1]["image"])
            assert obs[0]["text"] == f"\nHere is the cropped image (Image Size: {crop.width}x{crop.height}):"
            # the crop was resized (bicubic), so look for pixels near the target colour, not equal to it
            dist = np.linalg.norm(np.asarray(crop, float) - want, axis=-1)
            if msgs[i].get("loss", True):
                assert (dist < 40).any(), (row["qid"], i)
            else:
                assert dist.min() > 60, (row["qid"], i)
            seen[msgs[i].get("loss", True)] += 1
    assert seen[True] and seen[False]


def test_selected_frames_show_the_target_only_when_meant_to(data):
    for row in _rows(data["sft"]):
        if row["kind"] not in ("select", "reselect"):
            continue
        calls = _check_structure(row)
        video = row["message_list"][1]["content"][0]["video"]
        window = {
            k
            for k, rel in enumerate(video, 1)
            if _target_mask(Image.open(data["root"] / rel), row["target_color"]).any()
        }
        assert set(row["target_frames"]) == window
        picks = [set(c["arguments"]["target_frames"]) for c in calls]
        assert window <= picks[-1] and all(not (p & window) for p in picks[:-1])


def test_mp4_round_trip_through_the_reader(data):
    row = next(r for r in _rows(data["rl"]) if r["is_video"])
    root = data["root"]
    decoded = R.load_video_frames(root / row["video_file"], num_frames=16)
    pngs = R.load_video_frames([root / p for p in row["image"]], num_frames=16)
    assert len(decoded) == 16 and decoded[0].size == pngs[0].size
    a = np.stack([np.asarray(f, float) for f in decoded])
    b = np.stack([np.asarray(f, float) for f in pngs])
    # h264 at crf 10 with 4:2:0 chroma is lossy: a small mean error, and each decoded frame is nearest
    # to its own PNG (order kept)
    assert np.abs(a - b).mean() < 4.0
    nearest = [int(np.argmin([np.abs(x - y).mean() for y in b])) for x in a]
    assert nearest == list(range(16))
    x1, y1, x2, y2 = row["target_box_px"]
    want = np.array(T.TARGET_COLORS[row["target_color"]], float)
    for k in range(16):
        near = np.linalg.norm(a[k, y1:y2, x1:x2] - want, axis=-1).min() < 60
        assert near == (k + 1 in row["target_frames"]), k


def test_cli_and_bad_arguments(tmp_path):
    paths = S.main(
        ["--out", str(tmp_path), "--seed", "3", "--num-sft", "2", "--num-rl", "2", "--num-eval", "1"]
    )
    assert [len(_rows(paths[k])) for k in ("sft", "rl", "eval")] == [2, 2, 1]
    with pytest.raises(ValueError, match="image_size must be >= 224"):
        S.generate(tmp_path, image_size=100)
    with pytest.raises(ValueError, match="record counts"):
        S.generate(tmp_path, num_sft=-1)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        S.generate(tmp_path, seed=-2)


def test_color_family_is_terse_square_and_fits_64_trained_tokens(tmp_path, tok):
    from pixel_reasoner_jax import config as C

    assert tuple(S.FAMILIES) == C.SYNTHETIC_FAMILIES  # the config's allowed names are the registry's
    cfg = S.FAMILIES["color"]
    paths = S.generate(tmp_path, num_sft=40, num_rl=16, num_eval=0, image_size=224, seed=0, config=cfg)
    sft, rl = _rows(paths["sft"]), _rows(paths["rl"])
    assert {r["category"] for r in sft + rl} == {"color"}
    assert {r["answer"] for r in sft + rl} <= set(T.TARGET_COLORS)
    assert {r["kind"] for r in sft} == {"textual", "single", "recrop1"}
    for row in rl:
        img = Image.open(paths["root"] / row["image"][0])
        assert img.size == (224, 224)
        assert _inside(_target_mask(img, row["target_color"]), row["target_box_px"])
    for row in sft:
        calls = _check_structure(row)
        msgs = row["message_list"]
        turns = [m["content"][0]["text"] for m in msgs if m["role"] == "assistant"]
        # terse: a call turn is the call alone, the last turn one answer sentence
        assert all(CALL.fullmatch(t) for t in turns[:-1])
        assert turns[-1] == f"The answer is \\boxed{{{row['answer']}}}."
        for c in calls:
            assert all(round(v, 2) == v for v in c["arguments"]["bbox_2d"])
        # the trained turns (the last two assistant turns) fit the 64-position loss bucket of the tiny run
        trained = R.assistant_turn_mask(msgs, "final_turns")
        n = sum(len(tok.encode(m["content"][0]["text"])) + 1 for m, t in zip(msgs, trained) if t)
        assert n <= 64, (row["qid"], n)
