"""Tests of data/benchmarks.py and tables.py on hand-made files in the published schemas: the four eval parquets,
the RL data's release.parquet, comma lists and folders, broken rows, and the synthetic/explicit-path conflict.
"""

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pixel_reasoner_jax import config as C
from pixel_reasoner_jax import main as entry
from pixel_reasoner_jax.data import benchmarks as B
from pixel_reasoner_jax.data import records as R
from pixel_reasoner_jax.data import tables

FRAMES = [f"images/action_sequence/vid1/frame_{i:02d}.png" for i in range(1, 17)]
# One folder per download, named like the Hub data set, parquet and images/ side by side (prepare.sh layout).
EVAL_SETS = {
    "VStar-EvalData-PixelReasoner/vstar.parquet": [
        {
            "question": "What is the color of the cup?\nchoices:\nA: red\nB: blue",
            "image": ["images/direct_attributes/sa_1.png"],
            "is_video": False,
            "answer": "A",
            "qid": "vstar-0",
        },
        {
            "question": "Is the dog on the left or right side of the car?\nchoices:\nA: left\nB: right",
            "image": ["images/relative_position/sa_2.png"],
            "is_video": False,
            "answer": "B",
            "qid": "vstar-1",
        },
    ],
    "TallyQA-EvalData-PixelReasoner/tallyqa.parquet": [
        {
            "question": "How many birds are there?",
            "image": ["images/coco_3.png"],
            "is_video": False,
            "answer": "3",
            "qid": "tallyqa-0",
        },
    ],
    "InfoVQA-EvalData-PixelReasoner/infographics.parquet": [
        {
            "question": "What share of adults vote?",
            "image": ["images/info_4.png"],
            "is_video": False,
            "answer": ["12%", "12 percent"],
            "qid": "infographics-0",
        },
    ],
    "MVBench-EvalData-PixelReasoner/mvbench.parquet": [
        {
            "question": "What did the person do first?\nchoices:\nA: sit\nB: stand",
            "image": FRAMES,
            "is_video": True,
            "answer": "A",
            "qid": "mvbench-0",
        },
    ],
}


def _png(path, size=(32, 32), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _parquet(path, rows, schema=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture
def downloads(tmp_path):
    """The four eval data sets as downloaded and unzipped: {name: parquet path}, media beside each parquet."""
    out = {}
    for rel, rows in EVAL_SETS.items():
        path = _parquet(tmp_path / rel, rows)
        for row in rows:
            for i, m in enumerate(row["image"]):
                _png(path.parent / m, colour=(i * 15, 30, 30))
        out[rel.split("-")[0]] = path
    return out


def test_four_published_eval_parquets_as_one_comma_list(downloads):
    spec = ",".join(str(p) for p in downloads.values())
    recs, report = B.load_eval_records(spec, None)
    assert report.total == report.kept == 5 and not report.skipped
    by_qid = {r.qid: r for r in recs}
    assert [r.benchmark for r in recs] == ["vstar", "vstar", "tallyqa", "infovqa", "mvbench"]
    assert by_qid["vstar-0"].category == "direct_attributes"
    assert by_qid["vstar-1"].category == "relative_position"
    assert by_qid["tallyqa-0"].category is None and by_qid["tallyqa-0"].answer == "3"
    info = by_qid["infographics-0"]
    assert info.answer == ["12%", "12 percent"] and type(info.answer) is list  # plain lists, no ndarray
    # Relative paths resolve against each parquet's own folder when data_root is unset.
    assert info.images == [str(downloads["InfoVQA"].parent / "images/info_4.png")]
    video = by_qid["mvbench-0"]
    assert video.is_video is True and video.category == "action_sequence"
    assert video.images == [str(downloads["MVBench"].parent / f) for f in FRAMES]
    assert all(r.target_box is None and r.extra == {} for r in recs)


def test_folders_and_explicit_data_root(downloads, tmp_path):
    # A folder is every parquet/jsonl/json directly inside it, sorted; a file named twice is read once.
    both = tmp_path / "both"
    vstar_rows = EVAL_SETS["VStar-EvalData-PixelReasoner/vstar.parquet"]
    _parquet(both / "b_vstar.parquet", vstar_rows)
    (both / "a_tally.jsonl").write_text(
        "\n".join(json.dumps(r) for r in EVAL_SETS["TallyQA-EvalData-PixelReasoner/tallyqa.parquet"])
    )
    (both / "notes.txt").write_text("not data")
    assert tables.source_files(f"{both}, {both / 'a_tally.jsonl'}") == [
        str(both / "a_tally.jsonl"),
        str(both / "b_vstar.parquet"),
    ]
    # Their media live in the V* download; the jsonl's image is absent there, so it is counted and skipped.
    recs, report = B.load_eval_records(str(both), str(downloads["VStar"].parent))
    assert [r.qid for r in recs] == ["vstar-0", "vstar-1"]
    assert dict(report.skipped) == {"missing_media": 1} and "tallyqa-0" in report.examples["missing_media"][0]
    with pytest.raises(FileNotFoundError, match="holds no"):
        tables.source_files(str(tmp_path / "VStar-EvalData-PixelReasoner" / "images"))
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        B.load_eval_records(f"{downloads['VStar']},{tmp_path / 'nope.parquet'}", None)


def test_broken_rows_missing_media_and_repeated_qids_are_counted_and_skipped(downloads, tmp_path):
    root = downloads["VStar"].parent
    good = EVAL_SETS["VStar-EvalData-PixelReasoner/vstar.parquet"]
    rows = [
        *good,
        {**good[0], "question": None, "qid": "vstar-2"},  # broken: no question
        {**good[0], "image": ["images/gone.png"], "qid": "vstar-3"},  # missing image
        {**good[1], "question": "the same qid again"},  # vstar-1 twice
        {**good[0], "image": [], "qid": "vstar-4"},  # no media
    ]
    path = _parquet(root / "vstar_more.parquet", rows)
    recs, report = B.load_eval_records(str(path), None)
    assert [r.qid for r in recs] == ["vstar-0", "vstar-1"] and recs[1].question == good[1]["question"]
    assert report.total == 6 and report.kept == 2
    assert dict(report.skipped) == {
        "missing_field": 1,
        "missing_media": 1,
        "duplicate_qid": 1,
        "wrong_type": 1,
    }
    assert "gone.png" in report.examples["missing_media"][0]
    assert "kept 2 of 6" in report.summary() and "duplicate_qid" in report.summary()


def test_parquet_schema_is_checked_with_the_file_and_column_named(tmp_path):
    row = EVAL_SETS["TallyQA-EvalData-PixelReasoner/tallyqa.parquet"][0]
    no_answer = _parquet(tmp_path / "no_answer.parquet", [{k: v for k, v in row.items() if k != "answer"}])
    with pytest.raises(ValueError, match=r"no_answer.parquet.*lacks column\(s\) \['answer'\]"):
        B.load_eval_records(str(no_answer), None)
    bad_image = _parquet(tmp_path / "bad_image.parquet", [{**row, "image": 7}])
    with pytest.raises(ValueError, match=r"bad_image.parquet.*'image' holds integer"):
        R.load_rl_records(bad_image)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="cannot read parquet file .*garbage.parquet"):
        R.load_rl_records(garbage)


def test_release_parquet_rl_rows(tmp_path):
    """TIGER-Lab/PixelReasoner-RL-Data's release.parquet: answer lists, videos as frame lists (§7.2)."""
    root = tmp_path / "PixelReasoner-RL-Data"
    frames = [f"videos/clip7/{i}.png" for i in range(16)]
    for m in ["images/chart_1.png", *frames]:
        _png(root / m)
    rows = [
        {"question": "Read the title.", "image": ["images/chart_1.png"], "is_video": False,
         "answer": ["Sales"], "qid": "chartqa-1"},
        {"question": "What happens?", "image": frames, "is_video": True, "answer": ["B", "b"], "qid": "star-2"},
        {"question": "Flag unset", "image": ["images/chart_1.png"], "is_video": None, "answer": ["7"],
         "qid": "chartqa-4"},  # the RL data leaves is_video null on some image rows
        {"question": "No media here", "image": ["images/absent.png"], "is_video": False, "answer": ["x"],
         "qid": "chartqa-3"},
    ]  # fmt: skip
    path = _parquet(root / "release.parquet", rows)
    recs, report = R.load_rl_records(f"{path}")
    assert [r.qid for r in recs] == ["chartqa-1", "star-2", "chartqa-4"]
    assert dict(report.skipped) == {"missing_media": 1} and not recs[2].is_video
    img, vid, _ = recs
    assert img.answer == ["Sales"] and img.images == [str(root / "images/chart_1.png")] and not img.is_video
    assert vid.is_video and vid.images == [str(root / f) for f in frames] and vid.answer == ["B", "b"]
    assert img.benchmark == "chartqa" and img.category is None and img.target_box is None


def test_optional_category_and_target_box_columns(tmp_path):
    _png(tmp_path / "a.png")
    base = {"question": "Q?", "image": ["a.png"], "is_video": False, "answer": "A"}
    rows = [
        {**base, "qid": "mvbench-1", "category": "object_shuffle", "target_box": [0.1, 0.2, 0.5, 0.6]},
        {**base, "qid": "mvbench-2", "category": None, "target_box": None},
        {**base, "qid": "vstar-3", "category": None, "target_box": [0.5, 0.2, 0.1, 0.6]},  # x1 > x2
        {**base, "qid": "vstar-4", "category": None, "target_box": [0.0, 0.0, 1.5, 1.0]},  # beyond the image
    ]
    recs, report = B.load_eval_records(str(_parquet(tmp_path / "x.parquet", rows)), None)
    assert [(r.qid, r.category, r.target_box) for r in recs] == [
        ("mvbench-1", "object_shuffle", (0.1, 0.2, 0.5, 0.6)),
        ("mvbench-2", None, None),
    ]
    assert dict(report.skipped) == {"bad_box": 2}


@pytest.mark.parametrize(
    "bench,qid,paths,want",
    [
        ("mvbench", "MVBench-Fine-grained Pose-12", [], "fine_grained_pose"),
        ("mvbench", "mvbench-3", ["images/state_change/v/1.jpg"], "state_change"),
        ("mvbench", "mvbench-3", ["frames/v9/1.jpg"], None),
        ("mvbench", "mvbench-3", ["images/xaction_sequence/1.jpg"], None),  # whole words only
        ("vstar", "vstar-5", ["direct_attributes/sa_5.jpg"], "direct_attributes"),
        ("tallyqa", "tallyqa-1", ["images/relative_position/1.jpg"], None),  # only V* and MVBench have them
    ],
)
def test_derive_category(bench, qid, paths, want):
    assert B.derive_category(bench, qid, paths) == want


def test_benchmark_names_are_the_configs():
    for prefix, canon in B._BENCHMARK_PREFIXES:
        assert canon in C.BENCHMARKS and B.canonical_benchmark(prefix) == canon
    assert (
        B.canonical_benchmark("InfographicsVQA") == "infovqa" and B.canonical_benchmark("V*Bench") == "vstar"
    )


def test_plain_turns_numpy_values_into_python():
    row = {"image": np.array(["a.png", "b.png"], dtype=object), "is_video": np.bool_(True), "n": np.int64(3)}
    out = tables.plain(row)
    assert out == {"image": ["a.png", "b.png"], "is_video": True, "n": 3}
    assert type(out["image"]) is list and type(out["is_video"]) is bool and type(out["n"]) is int


# ------------------------------------------------------------------------------ config: explicit paths


def _eval_tiny(**overrides):
    from configs import eval as eval_config

    cd = eval_config.get_config("tiny")
    cd.workdir = "/tmp/run"
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        cd[section][key] = value
    return C.from_config_dict(cd)


@pytest.mark.parametrize("field", ["eval_path", "data_root"])
def test_an_explicit_path_and_synthetic_data_conflict(field):
    with pytest.raises(C.ConfigError, match=rf"^data\.{field}: '/x' conflicts with data\.synthetic=True"):
        C.validate(_eval_tiny(**{f"data__{field}": "/x"}), num_devices=1)


def test_an_explicit_rl_path_conflicts_in_grpo_tiny():
    from configs import grpo as grpo_config

    cd = grpo_config.get_config("tiny")
    cd.workdir = "/tmp/run"
    cd.data.rl_path = "/data/release.parquet"
    with pytest.raises(C.ConfigError, match=r"^data\.rl_path: .*data\.synthetic=True"):
        C.validate(C.from_config_dict(cd), num_devices=1)


def test_eval_tiny_reads_the_given_eval_path(downloads, tmp_path):
    """`configs/eval.py:tiny --config.data.eval_path=X --config.data.synthetic=False` keeps X and reads it."""
    spec = f"{downloads['VStar']},{downloads['MVBench']}"
    cfg = _eval_tiny(data__eval_path=spec, data__synthetic=False, model__checkpoint=str(tmp_path / "ckpt"))
    C.validate(cfg, num_devices=1)
    cfg = entry.prepare_assets(dataclasses.replace(cfg, workdir=str(tmp_path / "run")))
    assert cfg.data.eval_path == spec and not (tmp_path / "run" / entry.SYNTHETIC_DIR).exists()
    recs, _ = B.load_eval_records(cfg.data.eval_path, cfg.data.data_root)
    assert {r.benchmark for r in recs} == {"vstar", "mvbench"} <= set(cfg.eval.benchmark_names)
