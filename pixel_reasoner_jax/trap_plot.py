"""CLI: RaPR and accuracy against GRPO step for several runs on one figure, plus a start/end summary table.

`python -m pixel_reasoner_jax.trap_plot runs/trap_curiosity runs/trap_no_curiosity --out trap.png --H 0.3`
reads each run's metrics.jsonl (the learning-trap demonstration of configs/trap.py; any GRPO run works).
Runs that logged the call probe (`log.call_probe`, train/probe.py) also get its curve, dashed on the RaPR
panel: the share of responses that open with a call, read without sampling noise.
"""

import argparse
import dataclasses
import os
import pathlib

import numpy as np

from pixel_reasoner_jax.metrics import METRICS_FILE, read_metrics

RAPR, ACCURACY, P_CALL = "reward/rapr", "reward/accuracy", "probe/p_call"


@dataclasses.dataclass(frozen=True)
class RunCurves:
    """One run's GRPO curves: loop steps (the SFT warm start excluded) with RaPR and accuracy, and the call
    probe where every step logged it (else None)."""

    name: str
    steps: np.ndarray
    rapr: np.ndarray
    accuracy: np.ndarray
    p_call: np.ndarray | None = None

    def window(self, values: np.ndarray, end: bool, k: int) -> float:
        """Mean of the first (end False) or last (end True) k steps."""
        if values.size == 0:
            raise ValueError(f"run {self.name!r} has no GRPO steps")
        part = values[-k:] if end else values[:k]
        return float(part.mean())


def read_curves(workdir: str | os.PathLike, name: str | None = None) -> RunCurves:
    """RaPR and accuracy per GRPO step of `workdir/metrics.jsonl` (rows without RaPR, the SFT ones, skipped).

    Raises:
      FileNotFoundError: the run has no metrics file.
      ValueError: it has no GRPO step.
    """
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected the metrics of a GRPO run")
    last: dict[int, dict] = {}
    for row in read_metrics(path):
        if RAPR in row and ACCURACY in row:
            last[int(row["step"])] = row  # a resumed run may repeat a step: the latest line wins
    if not last:
        raise ValueError(f"{path} has no GRPO step (no {RAPR!r} key)")
    steps = np.array(sorted(last))
    probed = all(P_CALL in last[s] for s in steps)
    return RunCurves(
        name=name or pathlib.Path(workdir).resolve().name,
        steps=steps,
        rapr=np.array([last[s][RAPR] for s in steps], np.float64),
        accuracy=np.array([last[s][ACCURACY] for s in steps], np.float64),
        p_call=np.array([last[s][P_CALL] for s in steps], np.float64) if probed else None,
    )


def smooth(values: np.ndarray, k: int) -> np.ndarray:
    """Trailing moving average over up to k steps (the first points average what exists)."""
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(0, idx - k)
    return (c[idx] - c[lo]) / (idx - lo)


def summary(runs: list[RunCurves], k: int) -> str:
    """A text table: mean RaPR, accuracy and (where logged) call probe over each run's first and last k GRPO
    steps; "-" for a run without the probe."""
    probe = any(r.p_call is not None for r in runs)
    head = f"{'run':<28} {'steps':>5} {'RaPR first':>10} {'RaPR last':>10} {'acc first':>9} {'acc last':>9}"
    lines = [head + (f" {'p_call first':>12} {'p_call last':>11}" if probe else "")]
    for r in runs:
        line = (
            f"{r.name:<28} {r.steps.size:>5} {r.window(r.rapr, False, k):>10.3f} "
            f"{r.window(r.rapr, True, k):>10.3f} {r.window(r.accuracy, False, k):>9.3f} "
            f"{r.window(r.accuracy, True, k):>9.3f}"
        )
        if probe:
            line += (
                f" {'-':>12} {'-':>11}"
                if r.p_call is None
                else f" {r.window(r.p_call, False, k):>12.3f} {r.window(r.p_call, True, k):>11.3f}"
            )
        lines.append(line)
    return "\n".join(lines)


def plot(
    runs: list[RunCurves], out: str | os.PathLike, *, H: float | None = None, k: int = 5
) -> pathlib.Path:
    """Writes a two-panel PNG (RaPR, accuracy against loop step), one colour per run: thin raw lines and
    thick k-step moving averages, the call probe dashed on the RaPR panel where logged; a grey dashed line
    at the target RaPR H when given."""
    from matplotlib.figure import Figure  # Agg rendering without pyplot's global state

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for i, r in enumerate(runs):
        colour = f"C{i}"
        for ax, values in zip(axes, (r.rapr, r.accuracy)):
            ax.plot(r.steps, values, color=colour, alpha=0.3, linewidth=0.8)
            ax.plot(r.steps, smooth(values, k), color=colour, linewidth=2.0, label=r.name)
        if r.p_call is not None:
            axes[0].plot(
                r.steps, r.p_call, color=colour, linestyle="--", linewidth=1.5, label=f"{r.name} p_call"
            )
    if H is not None:
        axes[0].axhline(H, color="gray", linestyle="--", linewidth=1.0, label=f"H = {H:g}")
    for ax, title in zip(axes, ("RaPR (share of rollouts that crop)", "accuracy")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("loop step (SFT warm start before the first point)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)  # a viewer never sees a half-written PNG
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    parser.add_argument("--out", default="trap.png", help="PNG to write")
    parser.add_argument("--H", type=float, default=None, help="target RaPR to draw (reward.H)")
    parser.add_argument("--window", type=int, default=5, help="steps of the moving average and the summary")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error(f"--window must be >= 1, got {args.window}")
    runs = [read_curves(w) for w in args.runs]
    path = plot(runs, args.out, H=args.H, k=args.window)
    table = summary(runs, args.window)
    print(table)
    print(f"wrote {path}")
    return table


if __name__ == "__main__":
    main()
