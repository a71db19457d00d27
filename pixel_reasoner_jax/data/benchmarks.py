"""The published benchmark rows (`JasperHaozhe/{VStar,TallyQA,InfoVQA,MVBench}-EvalData-PixelReasoner`) as eval
records: benchmark names from qid prefixes, question categories, duplicate qids, `load_eval_records`.
"""

import dataclasses
import os
import re

from pixel_reasoner_jax.data.records import (
    CHECK_MODES,
    RL_COLUMNS,
    RLRecord,
    media_root,
    rl_from_row,
)
from pixel_reasoner_jax.data.tables import BadRecord, DataReport, parse_sources

# qid prefixes seen in the wild -> the run config's benchmark names (config.BENCHMARKS). The eval parquets name the benchmark by the qid's part
# before "-", whose exact spelling is not documented, so several are accepted.
_BENCHMARK_PREFIXES = (
    ("vstar", "vstar"),
    ("tallyqa", "tallyqa"),
    ("infographic", "infovqa"),
    ("infovqa", "infovqa"),
    ("mvbench", "mvbench"),
    ("synth", "synthetic"),
)
# V* Bench's two question types; its images live in folders of these names (reference benchmarks.md §1).
VSTAR_CATEGORIES = ("direct_attributes", "relative_position")
# MVBench's 20 tasks, as its annotation files name them (`<task>.json`, benchmarks.md §4).
MVBENCH_TASKS = (
    "action_sequence",
    "action_prediction",
    "action_antonym",
    "fine_grained_action",
    "unexpected_action",
    "object_existence",
    "object_interaction",
    "object_shuffle",
    "moving_direction",
    "action_localization",
    "scene_transition",
    "action_count",
    "moving_count",
    "moving_attribute",
    "state_change",
    "fine_grained_pose",
    "character_order",
    "egocentric_navigation",
    "episodic_reasoning",
    "counterfactual_inference",
)
_CATEGORIES = {"vstar": VSTAR_CATEGORIES, "mvbench": MVBENCH_TASKS}


def canonical_benchmark(name: str) -> str:
    """The config's benchmark name for a record's benchmark (its qid prefix).

    "VStar" / "V*Bench" -> "vstar", "InfoVQA" / "InfographicsVQA" -> "infovqa", "synthimage" -> "synthetic";
    an unknown name comes back lower-cased with only [a-z0-9] kept (so the caller can report it).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"canonical_benchmark: expected a non-empty str, got {name!r}")
    clean = re.sub(r"[^a-z0-9]", "", name.lower().replace("*", "star"))  # "V*" is V* Bench
    for prefix, canon in _BENCHMARK_PREFIXES:
        if clean.startswith(prefix):
            return canon
    return clean or name.lower()


def _words(text: str) -> str:
    return "_" + re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") + "_"


def derive_category(benchmark: str, qid: str, paths: list[str]) -> str | None:
    """A V* or MVBench row's category from names in its qid or media paths, else None.

    Looks for a category name as whole words ("relative_position", "Action Sequence", "fine-grained-pose")
    in the qid, then in each relative media path; the earliest match in the first text that has one wins.
    Only the row's own text is searched (never the data root), so a folder name outside the data set
    cannot leak in.
    """
    names = _CATEGORIES.get(benchmark)
    if not names:
        return None
    for text in (qid, *paths):
        words = _words(text)
        found = [(words.find(f"_{n}_"), n) for n in names if f"_{n}_" in words]
        if found:
            return min(found)[1]
    return None


def load_eval_records(
    eval_path: str, data_root: str | None, *, check: str = "verify"
) -> tuple[list[RLRecord], DataReport]:
    """Eval rows in the published schema, from comma-separated parquet/JSONL/JSON files and folders.

    Each record's `benchmark` is the canonical name of its `benchmark` column or qid prefix; `category` is
    the row's `category` column, else derived from its qid or media paths (`derive_category`); `target_box`
    comes from an optional column. Broken rows, missing or corrupt media and repeated qids (the first row
    wins: results are keyed by qid) are counted in the report and skipped.

    Args:
      eval_path: e.g. "/data/VStar-EvalData-PixelReasoner/vstar.parquet,/data/MVBench-EvalData-PixelReasoner".
      data_root: relative media paths resolve against it; None: against each row's own file's folder (the
        layout of a downloaded eval data set with its images.zip unpacked beside the parquet).
      check: media check per path, one of "none", "exists", "verify" (see records.check_media).

    Raises:
      FileNotFoundError / ValueError: a file is missing or unreadable (parquet schema included), or no
        record survives.
    """
    if check not in CHECK_MODES:
        raise ValueError(f"check must be one of {CHECK_MODES}, got {check!r}")
    seen: dict[str, str] = {}  # qid -> the file of its first row

    def parse(row: dict, rid: str, file: str) -> RLRecord:
        rec = rl_from_row(row, rid, media_root(data_root, file), check)
        if rec.qid in seen:
            raise BadRecord("duplicate_qid", f"qid {rec.qid!r} already read from {seen[rec.qid]}")
        seen[rec.qid] = os.path.basename(file)
        benchmark = canonical_benchmark(rec.benchmark)
        raw = row["image"] if isinstance(row["image"], list) else [row["image"]]
        category = rec.category or derive_category(benchmark, rec.qid, raw)
        return dataclasses.replace(rec, benchmark=benchmark, category=category)

    return parse_sources(eval_path, parse, "eval", RL_COLUMNS)
