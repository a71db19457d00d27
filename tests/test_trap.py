"""The learning-trap set-up: its task family, its two variants and its plot CLI.

The effect itself (RaPR at the end lower without the curiosity bonus) is not yet shown on a CPU run, so no
test asserts it here; see the README's learning-trap section.
"""

import collections
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from configs import trap as trap_config
from pixel_reasoner_jax import trap_plot
from pixel_reasoner_jax.data import synthetic, trap_tasks
from pixel_reasoner_jax.data.synthetic_tasks import TARGET_COLORS
from pixel_reasoner_jax.tools import ops
from pixel_reasoner_jax.tools.prompts import PROMPT_STYLES, system_prompt


def _colours_in(img) -> set[str]:
    px = np.asarray(img.convert("RGB")).reshape(-1, 3)
    return {name for name, rgb in TARGET_COLORS.items() if np.any(np.all(px == rgb, axis=-1))}


def test_trap_task_asks_the_square_of_the_named_quarter():
    cfg = trap_tasks.TrapConfig()
    answers = collections.Counter()
    for i in range(60):
        task = trap_tasks.trap_task(np.random.default_rng([7, i]), cfg)
        answers[task.answer] += 1
        assert _colours_in(task.image) == set(trap_tasks.COLORS)  # one square of each colour
        x1, y1, x2, y2 = task.box
        quarter = next(q for q in trap_tasks.QUARTERS if f"the {q} quarter" in task.question)
        col, row = trap_tasks.QUARTERS[quarter]
        half = cfg.image_size // 2
        assert col * half <= x1 < x2 <= (col + 1) * half and row * half <= y1 < y2 <= (row + 1) * half
        assert _colours_in(task.image.crop(task.box)) == {task.answer}
        # The crop the tool cuts for a tight box shows the asked square and no other.
        s = cfg.image_size
        result = ops.crop_image(ops.VisualState.for_images([task.image]), [v / s for v in task.box], 1)
        assert result.ok and _colours_in(result.new_images[0]) == {task.answer}
    # The answer prior: red about half the time (30 +- 8 of 60 at two sigma), each other colour about a sixth.
    assert 22 <= answers["red"] <= 38
    assert all(answers[c] >= 4 for c in trap_tasks.COLORS)


def test_trap_config_rejects_bad_values():
    with pytest.raises(ValueError, match="prior"):
        trap_tasks.TrapConfig(prior=0.1)
    with pytest.raises(ValueError, match="square"):
        trap_tasks.TrapConfig(square=0.5)
    with pytest.raises(ValueError, match="background"):
        trap_tasks.TrapConfig(background=(130, 120))


def test_trap_canvas_follows_the_background_range():
    for background in ((105, 125), (215, 245)):
        cfg = trap_tasks.TrapConfig(background=background)
        img = np.asarray(trap_tasks.trap_task(np.random.default_rng(3), cfg).image)
        corner = img[:8, :8].reshape(-1, 3)  # the quarters' margins hold no square
        assert corner.min() >= background[0] and corner.max() < background[1]


def test_trap_family_writes_direct_and_crop_trajectories(tmp_path):
    paths = synthetic.generate(
        tmp_path, num_sft=10, num_rl=4, num_eval=1, seed=3, config=synthetic.FAMILIES["trap"]
    )
    sft = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    assert collections.Counter(r["kind"] for r in sft) == {"crop": 5, "direct": 5}
    for r in sft:
        turns = [m for m in r["message_list"] if m["role"] == "assistant"]
        assert turns[-1]["content"][0]["text"] == f"\\boxed{{{r['answer']}}}"
        if r["kind"] == "crop":
            assert turns[0]["content"][0]["text"].startswith("<tool_call>\n")
            crop = r["message_list"][3]["content"][1]["image"]
            assert (tmp_path / crop).is_file()
        else:
            assert len(turns) == 1
    rl = [json.loads(line) for line in paths["rl"].read_text().splitlines()]
    assert len(rl) == 4 and all(r["category"] == "trap" and "quarter" in r["question"] for r in rl)
    assert sft[0]["message_list"][0]["content"][0]["text"] == system_prompt()


def test_stray_trajectories_crop_another_square_and_answer_what_it_shows(tmp_path):
    q = synthetic.FAMILIES["quarters"]
    cfg = dataclasses.replace(q, trap=dataclasses.replace(q.trap, stray=0.5))
    paths = synthetic.generate(tmp_path, num_sft=12, num_rl=1, num_eval=1, seed=3, config=cfg)
    sft = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    assert collections.Counter(r["kind"] for r in sft) == {"crop": 6, "stray": 6}
    for r in sft:
        call, answer = [m["content"][0]["text"] for m in r["message_list"] if m["role"] == "assistant"]
        box = json.loads(call.split("\n")[1])["arguments"]["bbox_2d"]
        asked = [round(v / 448, 2) for v in r["target_box_px"]]  # the asked square, of the 448-px canvas
        crop_path = tmp_path / r["message_list"][3]["content"][1]["image"]
        (shown,) = _colours_in(Image.open(crop_path))  # one square in the crop
        assert answer == f"\\boxed{{{shown}}}"  # the demonstrator answers what its crop shows
        assert (box == asked) == (r["kind"] == "crop") and (shown == r["answer"]) == (r["kind"] == "crop")
    # Scenes and questions are those of the same seed without strays (the decoy is drawn last).
    plain = synthetic.generate(tmp_path / "plain", num_sft=12, num_rl=1, num_eval=1, seed=3, config=q)
    plain = [json.loads(line) for line in plain["sft"].read_text().splitlines()]
    assert [r["message_list"][1] for r in plain] == [r["message_list"][1] for r in sft]
    assert [r["target_box_px"] for r in plain] == [r["target_box_px"] for r in sft]
    with pytest.raises(ValueError, match="stray"):
        trap_tasks.TrapConfig(stray=1.5)


def test_synthetic_sft_records_carry_the_prompt_style(tmp_path):
    terse = dataclasses.replace(synthetic.FAMILIES["quarters"], prompt_style="terse")
    paths = synthetic.generate(tmp_path, num_sft=2, num_rl=1, num_eval=1, seed=3, config=terse)
    for line in paths["sft"].read_text().splitlines():
        system, user = json.loads(line)["message_list"][:2]
        assert system["content"][0]["text"] == system_prompt(PROMPT_STYLES["terse"])
        assert "quarter" in user["content"][1]["text"] and "Guidelines" not in user["content"][1]["text"]
    with pytest.raises(ValueError, match="prompt_style"):
        dataclasses.replace(terse, prompt_style="short")


def test_trap_variants_differ_only_in_curiosity():
    a = trap_config.get_config("curiosity").to_dict()
    b = trap_config.get_config("no_curiosity").to_dict()
    a.pop("workdir"), b.pop("workdir")
    assert a["reward"].pop("curiosity") is True and b["reward"].pop("curiosity") is False
    assert a == b
    with pytest.raises(ValueError, match="variant"):
        trap_config.get_config("tiny")


def _write_metrics(path, rapr, acc, sft_steps=2, p_call=None):
    rows = [{"step": s + 1, "sft/loss": 1.0} for s in range(sft_steps)]
    rows += [
        {"step": sft_steps + i + 1, "reward/rapr": r, "reward/accuracy": a}
        for i, (r, a) in enumerate(zip(rapr, acc))
    ]
    for row, p in zip(rows[sft_steps:], p_call or []):
        row["probe/p_call"] = p
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_trap_plot_reads_runs_and_writes_a_figure(tmp_path):
    _write_metrics(tmp_path / "a", [0.5, 0.5, 0.6, 0.7], [0.4, 0.5, 0.6, 0.7])
    _write_metrics(tmp_path / "b", [0.5, 0.3, 0.1, 0.0], [0.4, 0.5, 0.5, 0.5])
    out = tmp_path / "fig" / "trap.png"
    table = trap_plot.main(
        [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--H", "0.5", "--window", "2"]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = [trap_plot.read_curves(tmp_path / n) for n in "ab"]
    assert runs[0].steps.tolist() == [3, 4, 5, 6]  # the SFT rows are skipped
    assert runs[1].window(runs[1].rapr, True, 2) == pytest.approx(0.05)
    assert "0.650" in table and "0.050" in table
    assert "p_call" not in table and runs[0].p_call is None
    # A run with the call probe adds its columns; one without shows "-" there.
    _write_metrics(tmp_path / "p", [0.5, 0.3, 0.1, 0.0], [0.4, 0.5, 0.5, 0.5], p_call=[0.4, 0.35, 0.3, 0.2])
    table = trap_plot.main([str(tmp_path / "p"), str(tmp_path / "a"), "--out", str(out), "--window", "2"])
    np.testing.assert_allclose(trap_plot.read_curves(tmp_path / "p").p_call, [0.4, 0.35, 0.3, 0.2])
    head, with_probe, without = table.splitlines()
    assert "p_call first" in head and with_probe.split()[-2:] == ["0.375", "0.250"]
    assert without.split()[-2:] == ["-", "-"]
    np.testing.assert_allclose(trap_plot.smooth(np.array([1.0, 3.0, 5.0]), 2), [1.0, 2.0, 4.0])
    with pytest.raises(ValueError, match="no GRPO step"):
        _write_metrics(tmp_path / "c", [], [])
        trap_plot.read_curves(tmp_path / "c")
