"""Tests of data/records.py and tables.py: RL/SFT schemas, broken-record accounting, paths, media, loss rule."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from pixel_reasoner_jax.data import records as R
from pixel_reasoner_jax.data import tables


def _png(path, size=(64, 48), colour=(10, 200, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def _jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return path


@pytest.fixture
def media(tmp_path):
    root = tmp_path / "data"
    _png(root / "img/a.png")
    _png(root / "img/b.png", size=(30, 90))
    for i in range(16):
        _png(root / f"vid/v1/{i}.png", colour=(i * 10, 0, 0))
    (root / "img/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    _png(root / "img/tiny.png", size=(10, 40))
    return root


def _rl_rows(root):
    frames = [f"vid/v1/{i}.png" for i in range(16)]
    return [
        {"qid": "vstar-1", "question": "Q1?", "image": ["img/a.png"], "is_video": False, "answer": "A"},
        {"qid": "mvbench-2", "question": "Q2?", "image": frames, "is_video": True, "answer": ["x", "y"]},
        {
            "qid": "tally-3",
            "question": "Q3?",
            "image": [str(root / "img/b.png")],
            "is_video": False,
            "answer": 3,
        },
        {"qid": "nf-1", "question": "Q?", "image": ["img/a.png"], "is_video": False},  # no answer
        {"qid": "wt-1", "question": 7, "image": ["img/a.png"], "is_video": False, "answer": "A"},
        {"qid": "wt-2", "question": "Q?", "image": ["img/a.png"], "is_video": "yes", "answer": "A"},
        {"qid": "wt-3", "question": "Q?", "image": ["img/a.png"], "is_video": False, "answer": {"a": 1}},
        {"qid": "eq-1", "question": "   ", "image": ["img/a.png"], "is_video": False, "answer": "A"},
        {"qid": "mm-1", "question": "Q?", "image": ["img/nowhere.png"], "is_video": False, "answer": "A"},
        {"qid": "bm-1", "question": "Q?", "image": ["img/corrupt.png"], "is_video": False, "answer": "A"},
        {"qid": "bm-2", "question": "Q?", "image": ["img/tiny.png"], "is_video": False, "answer": "A"},
        '{"qid": "broken-json", "question": ',
        ["not", "an", "object"],
    ]


def test_rl_schema_counts_reports_and_skips_each_kind_of_broken_record(media, caplog):
    path = _jsonl(media / "rl.jsonl", _rl_rows(media))
    with caplog.at_level(logging.INFO, logger=tables.__name__):
        recs, report = R.load_rl_records(path)
    assert [r.qid for r in recs] == ["vstar-1", "mvbench-2", "tally-3"]
    assert report.total == 13 and report.kept == 3
    assert dict(report.skipped) == {
        "missing_field": 1,
        "wrong_type": 4,
        "empty_question": 1,
        "missing_media": 1,
        "bad_media": 2,
        "bad_json": 1,
    }
    assert any(e.startswith("nf-1") for e in report.examples["missing_field"])
    assert any("tiny.png" in e for e in report.examples["bad_media"])
    assert any("line 12" in e for e in report.examples["bad_json"])
    logged = [r for r in caplog.records if r.name == tables.__name__]
    assert len(logged) == 1 and "kept 3 of 13" in logged[0].getMessage()


def test_rl_fields_paths_and_benchmark(media, tmp_path):
    path = _jsonl(media / "rl.jsonl", _rl_rows(media)[:3])
    recs, _ = R.load_rl_records(path)
    a, v, t = recs
    assert a.images == [str(media / "img/a.png")] and not a.is_video and a.benchmark == "vstar"
    assert (
        v.is_video
        and v.images == [str(media / f"vid/v1/{i}.png") for i in range(16)]
        and v.answer == ["x", "y"]
    )
    assert t.images == [str(media / "img/b.png")] and t.answer == "3"  # numbers compare as their text
    # An explicit data root replaces the file's directory for relative paths only.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = _jsonl(elsewhere / "rl.jsonl", _rl_rows(media)[:3])
    recs2, _ = R.load_rl_records(moved, data_root=media)
    assert [r.images for r in recs2] == [r.images for r in recs]
    # Without it, relative paths resolve under `elsewhere` and go missing; the absolute one still works.
    recs3, report = R.load_rl_records(moved)
    assert [r.qid for r in recs3] == ["tally-3"] and dict(report.skipped) == {"missing_media": 2}


def test_rl_json_list_and_explicit_benchmark(media):
    rows = [{"qid": "q1", "question": "Q?", "image": "img/a.png", "answer": "A", "benchmark": "infovqa"}]
    path = media / "rl.json"
    path.write_text(json.dumps(rows))
    (rec,), report = R.load_rl_records(path)
    assert rec.benchmark == "infovqa" and rec.images == [str(media / "img/a.png")] and not rec.is_video
    assert report.kept == 1 and not report.skipped
    rows = [{"qid": "q2", "question": "Q?", "image": ["img/a.png", "img/b.png"], "answer": "A"}]
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="is_video"):  # several paths and no flag: ambiguous, skipped
        R.load_rl_records(path)


def test_check_modes(media):
    path = _jsonl(media / "rl.jsonl", _rl_rows(media)[8:11])  # missing, corrupt, tiny
    recs, report = R.load_rl_records(path, check="exists")
    assert [r.qid for r in recs] == ["bm-1", "bm-2"] and dict(report.skipped) == {"missing_media": 1}
    recs, report = R.load_rl_records(path, check="none")
    assert len(recs) == 3 and not report.skipped
    with pytest.raises(ValueError, match="check must be one of"):
        R.load_rl_records(path, check="deep")


def test_file_level_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        R.load_rl_records(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.json"
    bad.write_text("[{]")
    with pytest.raises(ValueError, match="bad.json"):
        R.load_sft_records(bad)
    allbad = _jsonl(tmp_path / "allbad.jsonl", [{"qid": "x"}, "{"])
    with pytest.raises(ValueError, match=r"(?s)allbad.jsonl.*missing_field"):
        R.load_rl_records(allbad)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pq = tmp_path / "release.parquet"
        pq.write_bytes(b"PAR1")
        with pytest.raises(ValueError, match=r"release.parquet.*pyarrow.*JSONL"):
            R.load_rl_records(pq)


# ------------------------------------------------------------------------------------------------- SFT


def _traj(video=False, loss_false_first=True):
    first = (
        {"type": "video", "video": [f"vid/v1/{i}.png" for i in range(16)]}
        if video
        else {"image": "img/a.png"}
    )
    args = {"bbox_2d": [0.1, 0.1, 0.3, 0.3], "target_image": 1}
    call = "<tool_call>\n" + json.dumps({"name": "crop_image", "arguments": args}) + "\n</tool_call>"
    bad = {"role": "assistant", "content": [{"type": "text", "text": "look " + call}]}
    if loss_false_first:
        bad["loss"] = False
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [first, {"text": "What colour?"}]},
        bad,
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "\nHere is the cropped image (Image Size: 64x48):"},
                {"type": "image", "image": "img/b.png"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "again " + call}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "\nHere is the cropped image (Image Size: 64x48):"},
                {"type": "image", "image": "img/a.png"},
            ],
        },
        {"role": "assistant", "content": "It is \\boxed{green}."},
    ]


def test_sft_parse_normalises_content_and_resolves_media(media):
    rows = [
        {"qid": "t1", "message_list": _traj()},
        {"id": 5, "message_list": _traj(video=True), "source": "star"},
    ]
    path = media / "sft.json"
    path.write_text(json.dumps(rows))
    (img, vid), report = R.load_sft_records(path)
    assert (
        report.kept == 2 and img.qid == "t1" and vid.qid == "5" and vid.extra == {"id": 5, "source": "star"}
    )
    assert img.messages[0]["content"] == [{"type": "text", "text": "You are a helpful assistant."}]
    assert img.messages[1]["content"][0] == {"type": "image", "image": str(media / "img/a.png")}
    assert img.messages[1]["content"][1] == {"type": "text", "text": "What colour?"}
    assert img.messages[2]["loss"] is False and "loss" not in img.messages[4]
    assert (
        img.images == [str(media / p) for p in ("img/a.png", "img/b.png", "img/a.png")] and not img.is_video
    )
    frames = [str(media / f"vid/v1/{i}.png") for i in range(16)]
    assert vid.is_video and vid.messages[1]["content"][0]["video"] == frames
    assert vid.images == frames + [str(media / "img/b.png"), str(media / "img/a.png")]


def test_sft_broken_records(media):
    no_user = [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]
    ends_user = _traj()[:-1]
    bad_role = _traj()
    bad_role[2] = {**bad_role[2], "role": "tool"}
    bad_loss = _traj()
    bad_loss[2] = {**bad_loss[2], "loss": "no"}
    empty_q = _traj()
    empty_q[1] = {"role": "user", "content": [{"image": "img/a.png"}, {"text": " "}]}
    missing_crop = _traj()
    missing_crop[3] = {"role": "user", "content": [{"type": "image", "image": "crops/gone.png"}]}
    bad_item = _traj()
    bad_item[1] = {"role": "user", "content": [{"type": "audio", "audio": "x.wav"}, {"text": "q"}]}
    odd_type = _traj()
    odd_type[3] = {"role": "user", "content": [{"type": ["image"], "image": "img/a.png"}]}
    rows = [
        {"qid": "ok", "message_list": _traj()},
        {"qid": "nomsg"},
        {"qid": "emptymsg", "message_list": []},
        {"qid": "nouser", "message_list": no_user},
        {"qid": "endsuser", "message_list": ends_user},
        {"qid": "badrole", "message_list": bad_role},
        {"qid": "badloss", "message_list": bad_loss},
        {"qid": "emptyq", "message_list": empty_q},
        {"qid": "missingcrop", "message_list": missing_crop},
        {"qid": "baditem", "message_list": bad_item},
        {"qid": "oddtype", "message_list": odd_type},
        {"qid": "norole", "message_list": [{"content": "x"}]},
    ]
    recs, report = R.load_sft_records(_jsonl(media / "sft.jsonl", rows))
    assert [r.qid for r in recs] == ["ok"]
    assert dict(report.skipped) == {
        "missing_field": 2,
        "wrong_type": 5,
        "bad_messages": 2,
        "empty_question": 1,
        "missing_media": 1,
    }
    assert any(e.startswith("missingcrop") and "gone.png" in e for e in report.examples["missing_media"])


def test_mask_rule_on_self_correction_trajectory():
    msgs = _traj()
    # final_turns: the original trains only the last two assistant turns (positions -1 and -3).
    assert R.assistant_turn_mask(msgs, "final_turns") == [False, False, False, False, True, False, True]
    assert R.assistant_turn_mask(msgs, "per_turn") == [False, False, False, False, True, False, True]
    # Two erroneous crops before the right one: final_turns still trains exactly the last two.
    two = msgs[:4] + [{**msgs[2]}, msgs[3]] + msgs[4:]
    assert R.assistant_turn_mask(two, "final_turns") == [False] * 6 + [True, False, True]
    assert R.assistant_turn_mask(two, "per_turn") == [False] * 6 + [True, False, True]
    # A two-step zoom with no erroneous turn: per_turn trains all three, final_turns drops the first.
    zoom = _traj(loss_false_first=False)
    assert R.assistant_turn_mask(zoom, "per_turn") == [False, False, True, False, True, False, True]
    assert R.assistant_turn_mask(zoom, "final_turns") == [False, False, False, False, True, False, True]
    textual = [msgs[0], msgs[1], msgs[-1]]
    assert R.assistant_turn_mask(textual, "final_turns") == [False, False, True]
    assert R.assistant_turn_mask(textual[1:], "final_turns") == [False, True]
    with pytest.raises(ValueError, match="final_turns"):
        R.assistant_turn_mask(msgs, "all")


# ----------------------------------------------------------------------------------------------- media


def test_load_image(tmp_path, media):
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    out = R.load_image(tmp_path / "t.png")
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    for name, match in (
        ("corrupt.png", "not a decodable image"),
        ("tiny.png", "10x40"),
        ("gone.png", "does not exist"),
    ):
        with pytest.raises(R.BadMediaError, match=f"{name}.*{match}|{match}") as e:
            R.load_image(media / "img" / name)
        assert name in str(e.value)


def test_load_video_frames_from_directory_and_list(tmp_path):
    d = tmp_path / "frames"
    for i in range(1, 21):  # natural order must put frame_2 before frame_10
        _png(d / f"frame_{i}.png", colour=(i * 10, 0, 0))
    frames = R.load_video_frames(d, num_frames=16)
    want = np.linspace(0, 19, 16).round().astype(int) + 1
    assert [f.getpixel((0, 0))[0] // 10 for f in frames] == want.tolist()
    listed = R.load_video_frames([d / f"frame_{i}.png" for i in range(20, 0, -1)], num_frames=4)
    assert [f.getpixel((0, 0))[0] // 10 for f in listed] == [20, 14, 7, 1]  # list order is kept
    with pytest.raises(R.BadMediaError, match="20 frames; expected at least 32"):
        R.load_video_frames(d, num_frames=32)
    with pytest.raises(R.BadMediaError, match="missing.mp4"):
        R.load_video_frames(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(os.urandom(256))
    with pytest.raises(R.BadMediaError, match="junk.mp4"):
        R.load_video_frames(tmp_path / "junk.mp4")
