"""Metrics: JSONL lines, TensorBoard events read back from the raw TFRecord framing, plots, resume, progress."""

import io
import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from pixel_reasoner_jax import metrics as M


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: an implementation independent of the writer's."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path) -> list[event_pb2.Event]:
    """Parses a TFRecord file: u64 length, u32 masked crc(length), payload, u32 masked crc(payload)."""
    raw = path.read_bytes()
    events, pos = [], 0
    while pos < len(raw):
        header = raw[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", raw[pos + 8 : pos + 12])
        assert header_crc == _masked(header)
        payload = raw[pos + 12 : pos + 12 + length]
        (payload_crc,) = struct.unpack("<I", raw[pos + 12 + length : pos + 16 + length])
        assert payload_crc == _masked(payload)
        events.append(event_pb2.Event.FromString(payload))
        pos += 16 + length
    return events


def scalars(events) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for ev in events:
        for v in ev.summary.value:
            out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_crc32c_reference_vector():
    assert _crc32c(b"123456789") == 0xE3069283


def test_jsonl_lines_and_types(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(0, {"train/loss": 2.5, "rollout/tool_calls": np.float32(1.5), "n": np.int64(3)})
        w.write(1, {"train/loss": jnp.asarray(1.25), "reward/rapr": 0.5, "flag": True, "bad": float("nan")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 0, "train/loss": 2.5, "rollout/tool_calls": 1.5, "n": 3.0},
        {"step": 1, "train/loss": 1.25, "reward/rapr": 0.5, "flag": 1.0, "bad": None},
    ]
    rows = M.read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(rows[1]["bad"]) and rows[0]["n"] == 3.0


@pytest.mark.parametrize(
    "step,metrics,match",
    [
        (-1, {"a": 1.0}, "step"),
        (1.0, {"a": 1.0}, "step"),
        (0, {"step": 1.0}, "'step'"),
        (0, {"": 1.0}, "non-empty"),
        (0, {"a": np.ones(3)}, "'a'.*shape \\(3,\\)"),
        (0, {"a": "x"}, "'a'"),
    ],
)
def test_bad_input_raises(tmp_path, step, metrics, match):
    with M.MetricsWriter(tmp_path, tensorboard=False) as w, pytest.raises(ValueError, match=match):
        w.write(step, metrics)


def test_closed_writer_raises(tmp_path):
    w = M.MetricsWriter(tmp_path, tensorboard=False)
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.write(0, {"a": 1.0})


def test_disabled_writer_creates_nothing(tmp_path):
    w = M.MetricsWriter(tmp_path / "run", enabled=False)
    w.write(0, {"a": 1.0})
    assert w.plot() == []
    w.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_scalars_read_back(tmp_path):
    with M.MetricsWriter(tmp_path) as w:
        for step in range(3):
            w.write(step, {"train/loss": 1.0 / (step + 1), "reward/accuracy": 0.25 * step})
    (events_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    got = scalars(read_events(events_file))
    assert got["train/loss"] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3, rel=1e-6))]
    assert got["reward/accuracy"] == [(0, 0.0), (1, 0.25), (2, 0.5)]


def test_resume_truncates_jsonl_and_purges_tensorboard(tmp_path):
    with M.MetricsWriter(tmp_path) as w:
        for step in range(10):
            w.write(step, {"train/loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "train/lo')  # a line cut short by kill -9
    with M.MetricsWriter(tmp_path, resume_step=5) as w:
        w.write(6, {"train/loss": 60.0})
        w.write(7, {"train/loss": 70.0})
    rows = M.read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in rows] == [(s, float(s)) for s in range(6)] + [
        (6, 60.0),
        (7, 70.0),
    ]
    assert all(line.startswith("{") for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2  # the resumed writer never overwrites the first file
    resumed = [f for f in files if any(e.session_log.status for e in read_events(f))]
    (new,) = resumed
    starts = [e.step for e in read_events(new) if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [6]  # TensorBoard hides the old steps >= 6
    assert scalars(read_events(new))["train/loss"] == [(6, 60.0), (7, 70.0)]


def test_open_without_resume_drops_only_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1.0}\n{"step": 1, "a"')
    with M.MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"a": 2.0})
    assert path.read_text() == '{"step": 0, "a": 1.0}\n{"step": 1, "a": 2.0}\n'


@pytest.mark.parametrize(
    "key,group",
    [
        ("train/loss", "loss"),
        ("sft/nll", "loss"),
        ("reward/accuracy", "reward"),
        ("rollout/rapr", "reward"),
        ("eval/vstar/anls", "reward"),
        ("reward/bonus", "bonus_penalty"),
        ("reward/penalty", "bonus_penalty"),
        ("rollout/tool_calls", "tools"),
        ("rollout/n_ops", "tools"),
        ("policy/entropy", "policy"),
        ("policy/clip_frac_low", "policy"),
        ("policy/kl", "policy"),
        ("time/rollout_s", "timing"),
        ("time/train_s", "timing"),
        ("optim/lr", "optim"),
        ("optim/grad_norm", "optim"),
        ("rollout/tokens_per_s", "throughput"),
        ("rollout/tool_time_s", "timing"),
        ("rollout/response_tokens", "throughput"),
        ("weird_thing", "other"),
    ],
)
def test_plot_groups(key, group):
    assert M.group_of(key) == group


def test_plots_are_valid_pngs(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(20):
            w.write(
                step,
                {
                    "train/loss": 1.0 / (step + 1),
                    "reward/accuracy": step / 20,
                    "rollout/rapr": 0.5,
                    "reward/bonus": 0.01,
                    "reward/penalty": -0.01,
                    "rollout/tool_calls": 1.0,
                    "policy/entropy": 0.7,
                    "time/rollout_s": 2.0,
                    "time/train_s": 1.0,
                    **({"eval/vstar/accuracy": 0.5} if step % 5 == 0 else {}),
                },
            )
        files = w.plot()
    names = {f.name for f in files}
    assert names == {
        "loss.png",
        "reward.png",
        "bonus_penalty.png",
        "tools.png",
        "policy.png",
        "timing.png",
        "timing_split.png",
    }
    for f in files:
        assert f.parent == tmp_path / "plots"
        with Image.open(f) as img:
            assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
            img.verify()
    assert not list((tmp_path / "plots").glob("*.tmp.png"))


def test_timing_split_of_a_grpo_run_after_its_sft_warm_start(tmp_path):
    """SFT steps log data/train times, GRPO steps the trainer/rollout split: the plot covers the GRPO steps
    (the SFT-only key must not empty the common steps and leave the SFT phase's figure standing)."""
    grpo = {k: 1.0 for k in (*M.TRAINER_TIMES, *M.ROLLOUT_TIMES, M.STEP_TIME)}
    with M.MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 4):
            w.write(step, {"time/data_s": 0.1, "time/train_s": 1.0, "sft/loss": 2.0})
        w.plot()
        before = (tmp_path / "plots" / "timing_split.png").read_bytes()
        for step in range(4, 7):
            w.write(step, grpo)
        w.plot()
    series = M._series(M.read_metrics(tmp_path / M.METRICS_FILE))
    panels = M.timing_panels(series)
    assert [title for title, _ in panels] == ["trainer", "rollout"]
    assert M.timing_steps(series, panels).tolist() == [4, 5, 6]
    assert (tmp_path / "plots" / "timing_split.png").read_bytes() != before


def test_many_metrics_split_into_several_figures(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(0, {f"misc/m{i}": float(i) for i in range(14)})
        w.write(1, {f"misc/m{i}": float(i + 1) for i in range(14)})
    assert [f.name for f in M.plot(tmp_path)] == ["other.png", "other_2.png"]


def test_plot_without_metrics_writes_nothing(tmp_path):
    assert M.plot(tmp_path) == []
    assert not (tmp_path / "plots").exists()


def test_progress_prints_lines_when_not_a_tty():
    out = io.StringIO()
    bar = M.progress(10, "grpo", initial=5, file=out, mininterval=0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[0].startswith("grpo:") and "5/10" in lines[0] and "8/10" in lines[-1]


def test_progress_non_tty_default_is_throttled_and_disabled_is_silent():
    out = io.StringIO()
    bar = M.progress(100, "x", file=out)
    assert bar.mininterval == 30.0
    bar.close()
    silent = io.StringIO()
    bar = M.progress(10, "x", enabled=False, file=silent)
    bar.update(5)
    bar.close()
    assert silent.getvalue() == ""
