"""Record files as row dicts: JSON lists, JSONL and schema-checked parquet, from a comma-separated list of files
and folders; the DataReport that counts every row a parser skips, and why.
"""

import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SOURCE_SUFFIXES = (".parquet", ".jsonl", ".json")
_EXAMPLES_PER_REASON = 3


class BadRecord(Exception):
    """Why one row is skipped (`reason` is the DataReport key); raised by row parsers, caught per row."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class DataReport:
    """What a parse kept and skipped: per-reason counts and a few example ids per reason.

    Reasons: bad_json (a JSONL line that does not parse), wrong_type (a row, field, message or content
    item of the wrong type), missing_field, empty_question, bad_messages (no user turn or not ending
    with an assistant turn), missing_media (path does not exist), bad_media (corrupt, or a side < 28 px),
    bad_box (a target_box that is not 4 fractions x1 < x2, y1 < y2 in [0, 1]), duplicate_qid (eval: a qid
    seen before; the first row wins).
    """

    source: str
    total: int = 0
    kept: int = 0
    skipped: Counter = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def add_skip(self, reason: str, row_id: str, detail: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < _EXAMPLES_PER_REASON:
            shown.append(f"{row_id} ({detail})")

    def summary(self) -> str:
        lines = [f"{self.source}: kept {self.kept} of {self.total} records"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {count} x {reason}, e.g. {'; '.join(self.examples.get(reason, []))}")
        return "\n".join(lines)

    def log(self) -> None:
        (logger.warning if self.skipped else logger.info)(self.summary())


# ------------------------------------------------------------------------------------------- sources


def source_files(spec: str | os.PathLike) -> list[str]:
    """The files a data-path setting names: comma-separated files and folders, in the order given.

    A folder stands for every *.parquet, *.jsonl and *.json directly inside it, sorted by name. A file named
    twice (directly or through its folder) is read once.

    Raises:
      FileNotFoundError: a named file or folder does not exist, or a folder holds no data file.
      ValueError: the setting names nothing.
    """
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"data path {str(spec)!r} names no file or folder")
    files: list[str] = []
    for part in parts:
        if os.path.isdir(part):
            found = sorted(
                os.path.join(part, n)
                for n in os.listdir(part)
                if n.lower().endswith(SOURCE_SUFFIXES) and os.path.isfile(os.path.join(part, n))
            )
            if not found:
                raise FileNotFoundError(f"data folder {part!r} holds no {'/'.join(SOURCE_SUFFIXES)} file")
            files += found
        elif os.path.isfile(part):
            files.append(part)
        else:
            raise FileNotFoundError(f"data file {part!r} does not exist")
    seen, unique = set(), []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


# ------------------------------------------------------------------------------------------- parquet


@dataclasses.dataclass(frozen=True)
class Column:
    """A column a parquet file must (or may) hold, with the value kinds it may have.

    Kinds: "string", "integer", "floating", "bool", "list<KIND>", "struct", or "any". An all-null column
    passes any check; its rows are judged one by one by the row parser.
    """

    name: str
    kinds: tuple[str, ...] = ("any",)
    required: bool = True


def _arrow_kind(t) -> str:
    import pyarrow as pa  # only reached from parquet reading (see read_rows)

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    for kind, test in (
        ("bool", pa.types.is_boolean),
        ("integer", pa.types.is_integer),
        ("floating", pa.types.is_floating),
        ("null", pa.types.is_null),
        ("struct", pa.types.is_struct),
    ):
        if test(t):
            return kind
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return f"list<{_arrow_kind(t.value_type)}>"
    return str(t)


def _check_schema(path: str, schema, columns: Sequence[Column]) -> None:
    kinds = {name: _arrow_kind(schema.field(name).type) for name in schema.names}
    missing = [c.name for c in columns if c.required and c.name not in kinds]
    if missing:
        raise ValueError(f"parquet file {path!r} lacks column(s) {missing}; it has {sorted(kinds)}")
    for c in columns:
        kind = kinds.get(c.name)
        # list<null>: every list in the column is empty or null; the rows say which.
        if kind is None or "any" in c.kinds or kind in ("null", "list<null>") or kind in c.kinds:
            continue
        raise ValueError(
            f"parquet file {path!r}: column {c.name!r} holds {kind}, expected one of {list(c.kinds)}"
        )


def plain(value: Any) -> Any:
    """NumPy arrays and scalars (as pandas hands out list columns) as plain Python lists and scalars."""
    if isinstance(value, np.ndarray | list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_parquet(path: str, columns: Sequence[Column]) -> list[Any]:
    # Imported here: pyarrow takes most of a second to import and only parquet sources need it.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        _check_schema(path, file.schema_arrow, columns)
        rows = file.read().to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"cannot read parquet file {path!r}: {e}") from e
    return [plain(row) for row in rows]


# --------------------------------------------------------------------------------------- JSON / JSONL


class _BadJsonLine(str):
    """Marks a JSONL line that did not parse (kept as a row so it is counted, not lost)."""


def read_rows(path: str | os.PathLike, columns: Sequence[Column] = ()) -> list[Any]:
    """Rows of a JSON list, a JSONL file, or a parquet file (checked against `columns`).

    An unparseable JSONL line becomes a marker row so the caller counts it instead of losing it. Parquet
    list columns come back as plain Python lists.

    Raises:
      FileNotFoundError: the file is missing.
      ValueError: the file cannot be read as a whole (bad JSON document, unreadable parquet, a parquet
        column missing or of the wrong type).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if path.lower().endswith(".parquet"):
        return _read_parquet(path, columns)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read data file {path!r}: {e}") from e
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"data file {path!r} starts like a JSON list but does not parse: {e}") from e
    rows: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            rows.append(_BadJsonLine(f"line {lineno}: {e.msg}"))
    return rows


def row_id(row: Any, index: int, stem: str) -> str:
    """The row's `qid` or `id`, else `<file stem>-<row index>`."""
    if isinstance(row, dict):
        for key in ("qid", "id"):
            if isinstance(row.get(key), str | int) and not isinstance(row.get(key), bool):
                return str(row[key])
    return f"{stem}-{index}"


def parse_sources(
    spec: str | os.PathLike,
    parse_one: Callable[[dict, str, str], Any],
    kind: str,
    columns: Sequence[Column] = (),
) -> tuple[list[Any], DataReport]:
    """Parses every row of every file of `spec` (see `source_files`) with `parse_one(row, row_id, file)`.

    A row that is not an object, or whose parser raises BadRecord, is counted in the report and skipped.
    The report is logged once.

    Raises:
      FileNotFoundError / ValueError: a named file is missing or unreadable, or no record survives.
    """
    report = DataReport(source=f"{kind} {spec}")
    out = []
    for path in source_files(spec):
        rows = read_rows(path, columns)
        report.total += len(rows)
        stem = Path(path).stem
        for i, row in enumerate(rows):
            rid = row_id(row, i, stem)
            try:
                if isinstance(row, _BadJsonLine):
                    raise BadRecord("bad_json", str(row))
                if not isinstance(row, dict):
                    raise BadRecord("wrong_type", f"row is {type(row).__name__}, expected an object")
                out.append(parse_one(row, rid, path))
            except BadRecord as e:
                report.add_skip(e.reason, rid, e.detail)
    report.kept = len(out)
    report.log()
    if not out:
        raise ValueError(f"no usable {kind} record in {str(spec)!r}:\n{report.summary()}")
    return out, report
