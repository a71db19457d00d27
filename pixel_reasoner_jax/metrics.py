"""Run metrics: one JSON line per step, TensorBoard scalars, PNG curves grouped by topic, progress bars.

A disabled writer (every process but the first of a multi-host run) does nothing and creates no files.
"""

import json
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"
PLOTS_DIR = "plots"
_PANELS_PER_FIGURE = 12

# Plot groups: (file stem, regex searched in the lower-cased key); the first match wins, the rest go to
# "other". Keys are expected as "section/name" (e.g. "train/loss", "time/rollout_s", "reward/bonus").
PLOT_GROUPS = (
    ("timing", r"(^|/)time(/|_)|(?<!per)_(s|sec|seconds)$"),  # seconds, not rates like tokens_per_s
    ("loss", r"loss|nll"),
    ("bonus_penalty", r"bonus|penalty|curiosity"),
    ("reward", r"reward|acc|rapr|anls|pass@|score"),
    ("tools", r"tool|call|(^|/|_)ops?(_|$)|crop|select|turn|image"),
    ("policy", r"entropy|clip|kl|ratio|logprob|staleness"),
    ("optim", r"(^|/)lr$|grad|norm"),
    ("throughput", r"token|throughput|mfu|len|samples"),
)

# The GRPO loop's timing split (train/grpo.py, grpo_rollout.py, async_rollout.py): the trainer's side and
# the rollout side each add up to the loop step's wall time STEP_TIME; idle is time spent waiting for the other.
STEP_TIME = "time/step_s"
TRAINER_TIMES = (
    "time/trainer_idle_s",
    "time/probe_s",
    "time/reward_s",
    "time/old_logprobs_s",
    "time/train_s",
)
ROLLOUT_TIMES = ("time/rollout_s", "time/weight_push_s", "time/rollout_idle_s")


def _to_float(key: str, value: Any) -> float:
    """A Python float from a number, NumPy scalar or 0-d array (a JAX scalar is fetched to the host)."""
    if isinstance(value, bool | int | float):
        return float(value)
    arr = np.asarray(value)
    if arr.ndim != 0 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(
            f"metric {key!r} must be a scalar number, got {type(value).__name__} of shape {arr.shape}"
        )
    return float(arr)


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    return int(step)


def _step_of(row: Any) -> int | None:
    """The int "step" of a parsed line, or None when the line is not a metrics row."""
    if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
        return row["step"]
    return None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Reads a metrics.jsonl file; lines that are not a JSON object with an int "step" are skipped.

    Such lines come from a process killed mid-write; `null` values (non-finite floats) read back as NaN.
    """
    rows = []
    path = pathlib.Path(path)
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if _step_of(row) is None:
            continue
        rows.append({k: (math.nan if v is None else v) for k, v in row.items()})
    return rows


def _truncate(path: pathlib.Path, resume_step: int | None) -> None:
    """Keeps the well-formed lines with step <= resume_step (all of them when None), atomically."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8")
    kept = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill; appending after it would corrupt the next line too
        step = _step_of(row)
        if step is not None and (resume_step is None or step <= resume_step):
            kept.append(line)
    new_text = "".join(line + "\n" for line in kept)
    if new_text != text:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text(new_text, encoding="utf-8")
        os.replace(tmp, path)


class MetricsWriter:
    """Writes each step's scalar metrics to `workdir/metrics.jsonl` and `workdir/tensorboard/`.

    The JSONL file is opened in append mode, so a resumed run continues it; pass `resume_step` to first drop
    the lines a killed run wrote after its last checkpoint (TensorBoard is told to discard those steps too).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        enabled: bool = True,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
        flush_secs: int = 30,
    ):
        """Opens the writers.

        Args:
          workdir: run folder; created if missing.
          enabled: False makes every method a no-op (non-zero processes).
          tensorboard: also write TensorBoard event files.
          resume_step: the step restored from the checkpoint; later lines are dropped. None = keep all.
          flush_secs: TensorBoard flush period.
        """
        self.enabled = enabled
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self._file = None
        self._tb = None
        if not enabled:
            return
        if resume_step is not None:
            resume_step = _check_step(resume_step)
        self.workdir.mkdir(parents=True, exist_ok=True)
        _truncate(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter  # heavy import (protobuf), only when used

            self._tb = SummaryWriter(
                logdir=str(self.workdir / TB_DIR),
                # Steps >= purge_step from earlier event files are hidden by TensorBoard's reader.
                purge_step=None if resume_step is None else resume_step + 1,
                flush_secs=flush_secs,
                # Unique per writer: two writers opened in the same second would share a file name.
                filename_suffix=f".{os.getpid()}.{time.time_ns()}",
            )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends one line {"step": step, key: float, ...}; non-finite values are written as null.

        Raises:
          ValueError: a bad step, a key that is empty, not a string or "step", or a non-scalar value.
        """
        step = _check_step(step)
        values = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or not key or key == "step":
                raise ValueError(f"metric keys must be non-empty strings other than 'step', got {key!r}")
            values[key] = _to_float(key, value)
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsWriter for {self.workdir} is closed")
        row = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in values.items()}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)

    def flush(self) -> None:
        """Pushes buffered TensorBoard events to disk (the JSONL file is flushed on every write)."""
        if self._tb is not None:
            self._tb.flush()

    def plot(self) -> list[pathlib.Path]:
        """Renders `workdir/plots/*.png` from everything logged so far; returns the files written."""
        if not self.enabled:
            return []
        return plot(self.workdir)

    def close(self) -> None:
        """Flushes and closes the files; further writes raise."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def group_of(key: str) -> str:
    """The plot group (file stem) of a metric key, per PLOT_GROUPS."""
    lower = key.lower()
    for name, pattern in PLOT_GROUPS:
        if re.search(pattern, lower):
            return name
    return "other"


def _series(rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (steps, values), in file order, for every numeric key."""
    out: dict[str, tuple[list, list]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                steps, vals = out.setdefault(key, ([], []))
                steps.append(row["step"])
                vals.append(float(value))
    return {k: (np.asarray(s), np.asarray(v)) for k, (s, v) in out.items()}


def _save(fig, path: pathlib.Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)  # a viewer never sees a half-written PNG


def _panels(path: pathlib.Path, title: str, series: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    from matplotlib.figure import Figure  # Agg rendering without pyplot's global state

    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, (key, (steps, vals)) in zip(axes, series.items()):
        ax.plot(steps, vals, marker="." if len(steps) < 50 else None, linewidth=1.0)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(series) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    _save(fig, path)


def timing_panels(keys) -> list[tuple[str, list[str]]]:
    """(title, stacked keys) of each panel of `timing_split.png`: the trainer's and the rollout side's
    components when the GRPO split (TRAINER_TIMES, ROLLOUT_TIMES) is logged, else every timing key but
    STEP_TIME in one stack. STEP_TIME, when logged, is drawn over each panel as a line."""
    keys = set(keys)
    sides = [("trainer", TRAINER_TIMES), ("rollout", ROLLOUT_TIMES)]
    if all(k in keys for _, side in sides for k in side):
        return [(title, list(side)) for title, side in sides]
    return [("", sorted(keys - {STEP_TIME}))]


def timing_steps(series: dict[str, tuple[np.ndarray, np.ndarray]], panels) -> np.ndarray:
    """The steps at which every key the panels stack was logged (a GRPO run after its SFT warm start: the
    GRPO steps, not the SFT-only `time/data_s` intersected away to nothing)."""
    common = None
    for _, keys in panels:
        for key in keys:
            steps = set(series[key][0].tolist())
            common = steps if common is None else common & steps
    return np.asarray(sorted(common or ()), np.int64)


def _timing_split(path: pathlib.Path, series: dict[str, tuple[np.ndarray, np.ndarray]]) -> bool:
    """Stacked areas of the timing components (`timing_panels`) over the steps where all were logged."""
    from matplotlib.figure import Figure

    panels = timing_panels(series)
    x = timing_steps(series, panels)
    if not len(x) or sum(len(keys) for _, keys in panels) < 2:
        return False

    def values(key: str, missing: float = 0.0) -> np.ndarray:
        steps, vals = series[key]
        last = {int(s): v for s, v in zip(steps, vals)}  # the latest value of a repeated step wins
        return np.asarray([last.get(int(s), missing) for s in x], np.float64)

    fig = Figure(figsize=(8, 4 * len(panels)), layout="constrained")
    for ax, (title, keys) in zip(np.atleast_1d(fig.subplots(len(panels), 1, sharex=True)), panels):
        ax.stackplot(x, np.nan_to_num(np.stack([values(k) for k in keys])), labels=keys)
        if STEP_TIME in series:  # a gap where the step time was not logged
            ax.plot(x, values(STEP_TIME, np.nan), color="black", linewidth=1, label=f"{STEP_TIME} (wall)")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle("timing split per step")
    _save(fig, path)
    return True


def plot(workdir: str | os.PathLike) -> list[pathlib.Path]:
    """Renders the curves of `workdir/metrics.jsonl` into `workdir/plots/<group>.png`.

    One panel per metric, one figure per group of PLOT_GROUPS (split into `<group>_2.png`, ... above 12
    panels), plus `timing_split.png`, a stacked area of the timing metrics.

    Returns:
      The PNG files written, in group order.
    """
    workdir = pathlib.Path(workdir)
    series = _series(read_metrics(workdir / METRICS_FILE))
    if not series:
        return []
    out_dir = workdir / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict] = {}
    for key in sorted(series):
        groups.setdefault(group_of(key), {})[key] = series[key]
    order = [name for name, _ in PLOT_GROUPS] + ["other"]
    written = []
    for name in order:
        members = groups.get(name)
        if not members:
            continue
        keys = list(members)
        for part, start in enumerate(range(0, len(keys), _PANELS_PER_FIGURE)):
            chunk = {k: members[k] for k in keys[start : start + _PANELS_PER_FIGURE]}
            path = out_dir / (f"{name}.png" if part == 0 else f"{name}_{part + 1}.png")
            _panels(path, name.replace("_", " "), chunk)
            written.append(path)
        if name == "timing" and _timing_split(out_dir / "timing_split.png", members):
            written.append(out_dir / "timing_split.png")
    return written


class _LineStream:
    """A file for tqdm that turns its carriage-return redraws into whole lines (for logs, not terminals)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()


def progress(
    total: int | None,
    desc: str = "",
    initial: int = 0,
    *,
    enabled: bool = True,
    file=None,
    mininterval: float | None = None,
) -> tqdm.tqdm:
    """A tqdm bar; on a non-terminal it prints one plain line at most every `mininterval` seconds.

    Args:
      total: the step count at the end (None = unknown).
      desc: label in front of the bar.
      initial: the step a resumed run starts from.
      enabled: False returns a disabled bar (non-zero processes).
      file: stream, default stderr.
      mininterval: seconds between redraws; default 0.5 on a terminal, 30 otherwise.
    """
    stream = sys.stderr if file is None else file
    tty = bool(getattr(stream, "isatty", lambda: False)())
    if mininterval is None:
        mininterval = 0.5 if tty else 30.0
    return tqdm.tqdm(
        total=total,
        desc=desc,
        initial=initial,
        file=stream if tty else _LineStream(stream),
        mininterval=mininterval,
        disable=not enabled,
        dynamic_ncols=tty,
        ascii=not tty,
    )
