"""Tests for eval/report.py: aggregation of hand-made dumps, per-category tables, the paper's numbers beside
ours, crop faithfulness and the resumable dump I/O.

Expected numbers are worked out by hand in the comments, never taken from the code under test.
"""

import json

import pytest

from pixel_reasoner_jax.eval import metrics as M
from pixel_reasoner_jax.eval import report as R

# ---------------------------------------------------------------------------------------------------------
# Aggregation on hand-made dumps
# ---------------------------------------------------------------------------------------------------------


def _row(qid, bench, correct, anls, calls, failed, status="answered", boxed="x", sample=0, valid=None):
    return {
        "qid": qid,
        "benchmark": bench,
        "question": f"question {qid}",
        "gt": "x",
        "response": f"\\boxed{{{boxed}}}" if boxed is not None else "no answer",
        "boxed": boxed,
        "correct": correct,
        "anls": anls,
        "n_calls": calls,
        "n_failed": failed,
        "n_valid": calls - failed if valid is None else valid,
        "status": status,
        "sample": sample,
    }


HAND_DUMPS = [
    _row("vstar-1", "vstar", True, 1.0, 2, 1),  # used ops, one valid
    _row("vstar-2", "vstar", False, 0.0, 0, 0),  # no ops
    _row(
        "vstar-3", "vstar", False, 0.0, 2, 1, status="max_tool_calls", boxed=None, valid=0
    ),  # failed + unrun
    _row("infovqa-1", "infovqa", False, 0.75, 1, 0),
    _row("infovqa-2", "infovqa", True, 1.0, 0, 0),
]


def test_aggregate_hand_made():
    rep = R.aggregate(HAND_DUMPS)
    assert rep["num_samples"] == 5
    v = rep["benchmarks"]["vstar"]
    # vstar: 1 of 3 correct; 2 of 3 made a call; only vstar-1 had a valid one; calls 2+0+2 = 4 over 3.
    assert v["n"] == 3 and v["n_queries"] == 3
    assert v["accuracy"] == pytest.approx(1 / 3)
    assert v["score"] == pytest.approx(1 / 3) and v["primary"] == "accuracy"
    assert v["anls"] == pytest.approx(1 / 3)
    assert v["rapr"] == pytest.approx(2 / 3)
    assert v["rapr_valid"] == pytest.approx(1 / 3)
    assert v["mean_calls"] == pytest.approx(4 / 3)
    assert v["mean_failed"] == pytest.approx(2 / 3)
    assert v["mean_valid"] == pytest.approx(1 / 3)
    assert v["boxed_rate"] == pytest.approx(2 / 3)
    assert v["accuracy_with_ops"] == pytest.approx(0.5)  # vstar-1 right, vstar-3 wrong
    assert v["accuracy_without_ops"] == pytest.approx(0.0)
    assert v["status"] == {"answered": 2, "max_tool_calls": 1}
    i = rep["benchmarks"]["infovqa"]
    # infovqa reports ANLS: (0.75 + 1) / 2 = 0.875; accuracy 1/2.
    assert i["primary"] == "anls" and i["score"] == pytest.approx(0.875)
    assert i["accuracy"] == pytest.approx(0.5)
    assert i["rapr"] == pytest.approx(0.5) and i["rapr_valid"] == pytest.approx(0.5)
    o = rep["overall"]
    # overall micro: 2/5 correct, 3/5 made calls, 2/5 had a valid call, 2+0+2+1+0 = 5 calls / 5.
    assert o["n"] == 5
    assert o["accuracy"] == pytest.approx(0.4)
    assert o["rapr"] == pytest.approx(0.6)
    assert o["rapr_valid"] == pytest.approx(0.4)
    assert o["mean_calls"] == pytest.approx(1.0)
    assert o["status"] == {"answered": 4, "max_tool_calls": 1}
    assert rep["macro_score"] == pytest.approx((1 / 3 + 0.875) / 2)
    assert not any(k.startswith("pass@") for k in o)
    json.dumps(rep)  # the report is plain JSON


def test_aggregate_pass_at_k():
    rows = [
        _row("vstar-1", "vstar", False, 0.0, 0, 0, sample=0),
        _row("vstar-1", "vstar", True, 1.0, 1, 0, sample=1),
        _row("vstar-2", "vstar", False, 0.0, 0, 0, sample=0),
        _row("vstar-2", "vstar", False, 0.0, 0, 0, sample=1),
    ]
    v = R.aggregate(rows)["benchmarks"]["vstar"]
    # 1 of 4 samples right; 1 of 2 queries has a right sample.
    assert v["accuracy"] == pytest.approx(0.25)
    assert v["n_queries"] == 2
    assert v["pass@2"] == pytest.approx(0.5)


def test_report_markdown():
    md = R.report_markdown(R.aggregate(HAND_DUMPS), title="hand")
    lines = md.splitlines()
    assert lines[0] == "# hand"
    vstar = next(line for line in lines if line.startswith("| vstar "))
    cells = [c.strip() for c in vstar.strip("|").split("|")]
    # executed calls 1+1, 0, 0+1 = 3 of which 2 failed: tool errors 66.7; paper V* 84.3 (verified), so
    # delta 33.33 - 84.3 = -51.0; no target boxes, so no faithfulness numbers.
    assert cells == [
        "vstar", "3", "33.3 (acc)", "84.3", "-51.0", "33.3", "33.3", "66.7", "33.3", "1.33", "66.7", "0",
        "–", "–", "answered 2, max_tool_calls 1",
    ]  # fmt: skip
    info = next(line for line in lines if line.startswith("| infovqa "))
    assert "| 87.5 (ANLS) | 84.0† | +3.5 | 50.0 | 87.5 |" in info  # 84.0 is unverified
    assert any(line.startswith("| overall (micro) | 5 | 40.0 (acc) | – | – |") for line in lines)
    assert "Macro score (mean of the benchmark scores): 60.4" in md  # (33.33 + 87.5) / 2 = 60.42
    assert "- mvbench: 67.8 — paper table as recalled (unverified)" in md
    assert "## Per category" not in md  # no row names a category
    warm = R.report_markdown(
        R.aggregate(HAND_DUMPS), paper_model=R.paper_model_for("/ckpt/PixelReasoner-WarmStart")
    )
    assert "| 33.3 (acc) | 79.0 | -45.7 |" in warm and "PixelReasoner-WarmStart" in warm
    with pytest.raises(ValueError, match="paper_model"):
        R.report_markdown(R.aggregate(HAND_DUMPS), paper_model="GPT-5")


def _cat_row(qid, category, correct, calls=0, failed=0, extra=0, faithful=None, status="answered"):
    return {
        **_row(qid, qid.split("-")[0], correct, float(correct), calls, failed, status=status),
        "category": category,
        "n_extra_keys": extra,
        "faithful": faithful,
    }


def test_categories_extra_keys_faithfulness_and_media_errors():
    hit = {"n_crops": 2, "n_hits": 1, "saw_target": True}
    miss = {"n_crops": 1, "n_hits": 0, "saw_target": False}
    rows = [
        _cat_row("vstar-1", "direct_attributes", True, calls=2, extra=1, faithful=hit),
        _cat_row("vstar-2", "direct_attributes", True, calls=1, faithful=miss),
        _cat_row("vstar-3", "relative_position", False, calls=1, failed=1, extra=2, faithful=miss),
        _cat_row(
            "vstar-4", "relative_position", True, faithful={"n_crops": 0, "n_hits": 0, "saw_target": False}
        ),
        _cat_row("mvbench-1", "action_sequence", True, calls=1),
        _cat_row("mvbench-2", "action_sequence", False, status=R.MEDIA_ERROR),
    ]
    rep = R.aggregate(rows)
    v = rep["benchmarks"]["vstar"]
    assert v["extra_keys"] == 3 and v["responses_with_extra_keys"] == 2
    cats = v["categories"]
    assert cats["direct_attributes"]["accuracy"] == 1.0 and cats["relative_position"]["accuracy"] == 0.5
    f = v["faithfulness"]
    # crops 2 + 1 + 1 + 0 = 4 with 1 hit; responses with crops: 3, one saw the target; correct ones with a
    # crop: vstar-1 (saw) and vstar-2 (did not) -> 1/2.
    assert f == {
        "n_with_target": 4,
        "crop_hit_rate": 0.25,
        "saw_target_rate": 1 / 3,
        "correct_saw_target": 0.5,
    }
    m = rep["benchmarks"]["mvbench"]
    assert m["n"] == 1 and m["n_media_errors"] == 1 and m["accuracy"] == 1.0
    assert m["faithfulness"]["crop_hit_rate"] is None
    md = R.report_markdown(rep)
    assert "## Per category" in md
    assert "| vstar | relative_position | 2 | 50.0 | 50.0 | 50.0 | 0.50 | 0.0 |" in md
    assert "| mvbench | action_sequence | 1 | 100.0 |" in md
    assert "1 media errors (not scored)" in md
    json.dumps(rep)


def test_dump_round_trip_and_bad_lines(tmp_path):
    results = [M.SampleResult.from_json(r) for r in HAND_DUMPS]
    path = tmp_path / "dump.jsonl"
    R.write_dumps(path, results[:2])
    R.append_dumps(path, results[2:])
    assert R.read_dumps(path) == results
    # A kill in the middle of an append leaves an unterminated line: skipped, or cut from the file.
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"qid": "vstar-9", "bench')
    with pytest.raises(ValueError, match=r"dump.jsonl:6: not a dump row"):
        R.read_dumps(path)
    assert R.read_dumps(path, tail="skip") == results and path.read_bytes() != whole
    assert R.read_dumps(path, tail="cut") == results and path.read_bytes() == whole
    # A line separator inside a response is not a line break of the dump.
    odd = M.SampleResult.from_json({**HAND_DUMPS[0], "response": "a\u2028b\x85c"})
    R.write_dumps(path, [odd])
    assert R.read_dumps(path) == [odd]
    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(ValueError, match=r"dump.jsonl:2: not a dump row"):
        R.read_dumps(path)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"n_failed": 2}, "n_valid 1 \\+ n_failed 2 exceeds n_calls 2"),
        ({"n_calls": -1}, "n_calls must be an int >= 0"),
        ({"correct": 1}, "correct must be bool"),
        ({"anls": 1.5}, "anls must be a number in"),
        ({"gt": []}, "non-empty list"),
    ],
)
def test_sample_result_validation(change, match):
    with pytest.raises((TypeError, ValueError), match=match):
        M.SampleResult.from_json({**HAND_DUMPS[0], **change})


def test_bad_aggregate_input():
    with pytest.raises(ValueError, match="no samples"):
        R.aggregate([])
    with pytest.raises(ValueError, match="lacks keys"):
        R.aggregate([{"qid": "a"}])
    with pytest.raises(ValueError, match="lacks 'benchmarks'"):
        R.report_markdown({})
