"""Tests of eval/run.py: fidelity to the original's eval, per-sample rows with media, process shards, a
multi-benchmark report with categories and faithfulness, and a killed-then-resumed run of the tiny checkpoint.

Scripted policies make the episodes exact; the tiny checkpoint (random weights) runs the real sampler path.
"""

import dataclasses
import json
import pathlib

import pytest
from memorize import ANSWER, ScriptedPolicy, call_text, crop_text, noise_image, select_text

from configs import eval as eval_config
from pixel_reasoner_jax import config as C
from pixel_reasoner_jax.data.records import RLRecord
from pixel_reasoner_jax.eval import rows as eval_rows
from pixel_reasoner_jax.eval import run as eval_run
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.episode import Episode, PromptMedia
from pixel_reasoner_jax.rollout.policy import Policy, Video
from pixel_reasoner_jax.tools.ops import PIX


@dataclasses.dataclass(frozen=True)
class Rec(RLRecord):
    """An RLRecord with the optional benchmark fields (present on RLRecord itself once data/ has them)."""

    category: str | None = None
    target_box: list | None = None


def _cfg(tmp_path, ckpt, **overrides) -> C.RunConfig:
    c = eval_config.get_config("tiny")
    c.workdir = str(tmp_path / "run")
    c.model.checkpoint = str(ckpt)
    c.log.progress = False
    for key, value in overrides.items():
        section, field = key.split("__")
        setattr(getattr(c, section), field, value)
    return C.from_config_dict(c)


def _proc(ckpt, cfg) -> ImageProcessorConfig:
    base = ImageProcessorConfig.from_pretrained(ckpt)
    return dataclasses.replace(
        base, min_pixels=cfg.eval.model_min_pixels, max_pixels=cfg.eval.model_max_pixels
    )


def _image_record(tmp_path, qid, answer="B", seed=0, **kw) -> Rec:
    path = tmp_path / "data" / f"{qid}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(112, 84, seed=seed).save(path)
    bench = qid.split("-")[0]
    return Rec(
        qid=qid,
        question="Which letter?",
        images=[str(path)],
        is_video=False,
        answer=answer,
        benchmark=bench,
        **kw,
    )


def _video_record(tmp_path, qid, answer="B", size=(56, 56)) -> Rec:
    frames = []
    for k in range(16):
        path = tmp_path / "data" / qid / f"frame_{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        noise_image(*size, seed=100 + k).save(path)
        frames.append(str(path))
    return Rec(
        qid=qid, question="What happens?", images=frames, is_video=True, answer=answer, benchmark="mvbench"
    )


def _rows(cfg) -> list[dict]:
    return [json.loads(line) for line in (eval_run_dir(cfg) / "samples.jsonl").read_text().splitlines()]


def eval_run_dir(cfg) -> pathlib.Path:
    return pathlib.Path(cfg.workdir) / eval_run.EVAL_DIR


# ------------------------------------------------------------------------------------------ fidelity


def test_eval_config_matches_the_original_limits(tiny_ckpt, tmp_path):
    c = eval_config.get_config("7b")
    c.workdir, c.model.checkpoint, c.data.eval_path = str(tmp_path), str(tiny_ckpt), "x.jsonl"
    ep = eval_run.episode_config(C.from_config_dict(c))
    # --max_out_tokens 2048 per turn; vLLM context prompt_max_len 10000 + generate_max_len 8192; force stop
    # of calls above 12*1024 - 200 tokens; greedy.
    assert (ep.max_new_tokens, ep.max_total_tokens, ep.call_token_limit) == (2048, 18192, 12088)
    assert ep.temperature == 0.0 and ep.ops.video_crop_index == "original"
    assert ep.ops.select_min_pixels is None  # selected frames are not resized in eval (§5)


def test_failed_call_does_not_zero_a_correct_answer_and_extra_keys_are_counted(tiny_ckpt, tok, tmp_path):
    cfg = _cfg(tmp_path, tiny_ckpt, eval__max_new_tokens=64)
    recs = [_image_record(tmp_path, "vstar-1", seed=1), _image_record(tmp_path, "vstar-2", seed=2)]
    extra = call_text("crop_image", '{"bbox_2d": [0.1, 0.1, 0.6, 0.6], "target_image": 1, "reason": "zoom"}')
    extra = extra.replace('"name"', '"id": 7, "name"')  # an extra top-level key as well
    scripts = {
        "vstar-1/0": [crop_text([0.1, 0.1, 0.5, 0.5], target=5), ANSWER],  # failed call, then correct
        "vstar-2/0": [extra, ANSWER],
    }
    policy = ScriptedPolicy(tok, scripts)
    report = eval_run.evaluate(cfg, recs, policy, tok, _proc(tiny_ckpt, cfg))
    rows = {r["qid"]: r for r in _rows(cfg)}
    # The original's training reward zeroes this answer (zero_after_failed_call); its eval dumps do not.
    assert rows["vstar-1"]["status"] == "tool_error" and rows["vstar-1"]["correct"] is True
    assert rows["vstar-1"]["n_failed"] == 1 and rows["vstar-1"]["n_extra_keys"] == 0
    assert rows["vstar-2"]["n_valid"] == 1 and rows["vstar-2"]["n_extra_keys"] == 2
    assert report["benchmarks"]["vstar"]["extra_keys"] == 2
    assert report["benchmarks"]["vstar"]["tool_error_rate"] == 0.5  # 1 failed of 2 executed calls
    # Every turn was sampled with the per-turn cap (or the remaining context when smaller).
    assert {r.sampling.max_new_tokens for r in policy.requests} == {64}


def test_call_token_limit_stops_calls_below_the_context(tiny_ckpt, tok, tmp_path):
    cfg = _cfg(tmp_path, tiny_ckpt)
    ep_cfg = dataclasses.replace(eval_run.episode_config(cfg), max_new_tokens=64)
    rec = _image_record(tmp_path, "vstar-1")
    for limit, status in ((None, "answered"), (1, "context_limit")):
        ep = Episode.start(
            rec, tok, dataclasses.replace(ep_cfg, call_token_limit=limit), None, _proc(tiny_ckpt, cfg)
        )
        policy = ScriptedPolicy(tok, {"vstar-1": [crop_text([0.1, 0.1, 0.5, 0.5]), ANSWER]})
        [traj] = eval_run.run_episodes(policy, [ep])
        assert traj.status == status and traj.num_valid_calls == (limit is None)


def test_video_frames_land_in_the_model_pixel_range(tiny_ckpt, tok, tmp_path):
    cfg = _cfg(tmp_path, tiny_ckpt)
    ep_cfg = eval_run.episode_config(cfg)
    base = _proc(tiny_ckpt, cfg)
    rec = _video_record(tmp_path, "mvbench-1")
    # Large frames come down below the video cap, then into the model range; tiny ones come up into it.
    for frame_size, proc in (((700, 500), base), ((30, 30), dataclasses.replace(base, min_pixels=12 * PIX))):
        frames = tuple(noise_image(*frame_size, seed=k) for k in range(16))
        ep = Episode.start(rec, tok, ep_cfg, None, proc, media=PromptMedia(video_frames=frames))
        [item] = ep.next_request().media  # the prompt's one video item, as the model gets it
        assert isinstance(item, Video)
        w, h = item.frames[0].size
        assert proc.min_pixels <= w * h <= proc.max_pixels and w % 28 == 0 and h % 28 == 0


def test_video_crop_index_after_a_selection(tiny_ckpt, tok, tmp_path):
    rec = _video_record(tmp_path, "mvbench-1", size=(112, 112))
    for numbering, target in (("original", 2), ("observed", 1)):
        cfg = _cfg(
            tmp_path / numbering, tiny_ckpt, rollout__video_crop_index=numbering, eval__max_new_tokens=64
        )
        script = [select_text([4, 9]), crop_text([0.1, 0.1, 0.6, 0.6], target=target), ANSWER]
        eval_run.evaluate(
            cfg, [rec], ScriptedPolicy(tok, {"mvbench-1/0": script}), tok, _proc(tiny_ckpt, cfg)
        )
        [row] = _rows(cfg)
        # Both read the first selected frame (frame 4): the crop's origin is that frame.
        assert row["n_valid"] == 2 and row["crop_origins"][0]["image"] == 3, numbering


# ------------------------------------------------------------------------------------------ report, rows


def test_multi_benchmark_report_with_categories_faithfulness_and_viewer_rows(tiny_ckpt, tok, tmp_path):
    cfg = _cfg(tmp_path, tiny_ckpt, eval__max_new_tokens=64)
    box = [0.1, 0.1, 0.3, 0.3]
    recs = [
        _image_record(tmp_path, "vstar-a/1", category="direct_attributes", target_box=box, seed=1),
        _image_record(tmp_path, "vstar-b", category="relative_position", target_box=box, seed=2),
        _image_record(tmp_path, "infovqa-1", answer="2018", seed=3),
        _video_record(tmp_path, "mvbench-1"),
    ]
    scripts = {
        "vstar-a/1/0": [crop_text(box), ANSWER],  # padded crop holds the target: faithful and correct
        "vstar-b/0": [crop_text([0.6, 0.6, 0.9, 0.9]), ANSWER],  # correct, crop elsewhere
        "infovqa-1/0": ["The year is \\boxed{2019}.<|im_end|>"],
        "mvbench-1/0": [select_text([1, 2]), "\\boxed{A}<|im_end|>"],
    }
    report = eval_run.evaluate(cfg, recs, ScriptedPolicy(tok, scripts), tok, _proc(tiny_ckpt, cfg))
    v = report["benchmarks"]["vstar"]
    assert v["accuracy"] == 1.0 and v["rapr"] == 1.0
    assert v["faithfulness"]["crop_hit_rate"] == 0.5 and v["faithfulness"]["correct_saw_target"] == 0.5
    assert set(v["categories"]) == {"direct_attributes", "relative_position"}
    info = report["benchmarks"]["infovqa"]
    assert info["primary"] == "anls" and info["score"] == pytest.approx(0.75)  # 2019 vs 2018: 1 - 1/4
    assert report["benchmarks"]["mvbench"]["accuracy"] == 0.0
    md = (eval_run_dir(cfg) / "report.md").read_text()
    assert "## Per category" in md and "| vstar | direct_attributes | 1 | 100.0 |" in md
    assert "| mvbench | 1 | 0.0 (acc) | 67.8† | -67.8 |" in md
    rows = _rows(cfg)
    assert [r["qid"] for r in rows] == [r.qid for r in recs]  # the records' order
    a = rows[0]
    assert a["category"] == "direct_attributes" and a["target_box"] == box
    assert a["faithful"] == {"n_crops": 1, "n_hits": 1, "saw_target": True}
    # [0.1, 0.1, 0.3, 0.3] padded by min(0.1, 600/side) = 0.1 -> [0, 0, 0.4, 0.4] (int pixels of 112x84).
    assert a["crop_boxes"] == [pytest.approx([0.0, 0.0, 44 / 112, 33 / 84])]
    assert a["crop_origins"] == [{"image": 0, "box": a["crop_boxes"][0]}]
    assert [t["role"] for t in a["turns"]] == ["assistant", "tool", "assistant"]
    assert "Here is the cropped image" in a["turns"][1]["text"] and len(a["turns"][1]["images"]) == 1
    out = eval_run_dir(cfg)
    for row in rows:
        paths = row["inputs"] + [p for t in row["turns"] for p in t["images"]]
        assert paths and all((out / p).is_file() and p.startswith("media/") for p in paths)
        assert all("/" not in p.split("/")[1] and ".." not in p for p in paths)
    mv = rows[3]
    assert len(mv["inputs"]) == 1 and len(mv["turns"][1]["images"]) == 2  # first frame; two selected frames
    assert eval_rows.safe_name("vstar-a/1") != eval_rows.safe_name("vstar-a_1")


def test_broken_media_is_counted_and_skipped(tiny_ckpt, tok, tmp_path):
    cfg = _cfg(tmp_path, tiny_ckpt)
    good = _image_record(tmp_path, "vstar-1")
    bad = Rec(
        qid="vstar-2",
        question="q",
        images=[str(tmp_path / "missing.png")],
        is_video=False,
        answer="B",
        benchmark="vstar",
    )
    report = eval_run.evaluate(
        cfg, [good, bad], ScriptedPolicy(tok, {"vstar-1/0": [ANSWER]}), tok, _proc(tiny_ckpt, cfg)
    )
    v = report["benchmarks"]["vstar"]
    assert v["n"] == 1 and v["n_media_errors"] == 1 and v["accuracy"] == 1.0


def test_process_shards_merge_on_process_zero(tiny_ckpt, tok, tmp_path):
    cfg = _cfg(tmp_path, tiny_ckpt)
    recs = [_image_record(tmp_path, f"vstar-{k}", seed=k) for k in range(5)]
    scripts = {f"vstar-{k}/0": [ANSWER] for k in range(5)}
    proc = _proc(tiny_ckpt, cfg)
    p1 = ScriptedPolicy(tok, scripts)
    assert eval_run.evaluate(cfg, recs, p1, tok, proc, process_index=1, process_count=2) is None
    assert sorted(r.rid for r in p1.requests) == ["vstar-1/0/turn0", "vstar-3/0/turn0"]
    p0 = ScriptedPolicy(tok, scripts)
    report = eval_run.evaluate(cfg, recs, p0, tok, proc, process_index=0, process_count=2)
    assert len(p0.requests) == 3 and report["overall"]["n"] == 5
    assert [r["qid"] for r in _rows(cfg)] == [f"vstar-{k}" for k in range(5)]


# ------------------------------------------------------------------------------------------ resume


class _Killable(Policy):
    """Counts the episodes it generates for; raises once an episode outside the first `allowed` shows up."""

    def __init__(self, inner: Policy, allowed: int | None):
        self.inner, self.allowed, self.episodes = inner, allowed, []

    @property
    def weight_version(self) -> str:
        return self.inner.weight_version

    def generate(self, requests):
        for r in requests:
            episode = r.rid.rpartition("/turn")[0]
            if episode not in self.episodes:
                if self.allowed is not None and len(self.episodes) >= self.allowed:
                    raise KeyboardInterrupt("killed")
                self.episodes.append(episode)
        return self.inner.generate(requests)


def test_tiny_checkpoint_eval_killed_after_a_chunk_resumes_without_redoing(tiny_ckpt, tmp_path, monkeypatch):
    recs = [_image_record(tmp_path, f"vstar-{k}", seed=k) for k in range(3)] + [
        _video_record(tmp_path, "mvbench-1")
    ]
    eval_path = tmp_path / "eval.jsonl"
    with open(eval_path, "w") as f:
        for r in recs:
            f.write(
                json.dumps(
                    {
                        "qid": r.qid,
                        "question": r.question,
                        "image": r.images,
                        "is_video": r.is_video,
                        "answer": r.answer,
                    }
                )
                + "\n"
            )
    cfg = _cfg(
        tmp_path, tiny_ckpt, data__eval_path=str(eval_path), data__synthetic=False,
        eval__benchmarks="vstar,mvbench", eval__batch_size=2, eval__max_new_tokens=6,
    )  # fmt: skip
    made: list[_Killable] = []
    real = eval_run.open_eval_policy

    def wrapped(cfg, model_cfg, processor, allowed):
        policy, close = real(cfg, model_cfg, processor)
        made.append(_Killable(policy, allowed))
        return made[-1], close

    monkeypatch.setattr(eval_run, "open_eval_policy", lambda *a: wrapped(*a, allowed=2))
    with pytest.raises(KeyboardInterrupt):
        eval_run.run(cfg)
    first = _rows(cfg)
    assert [r["qid"] for r in first] == ["vstar-0", "vstar-1"]  # the first chunk of 2 was kept
    monkeypatch.setattr(eval_run, "open_eval_policy", lambda *a: wrapped(*a, allowed=None))
    report = eval_run.run(cfg)
    assert made[1].episodes == ["vstar-2/0", "mvbench-1/0"]  # only what was not finished
    rows = _rows(cfg)
    assert [r["qid"] for r in rows] == [r.qid for r in recs] and rows[:2] == first
    assert report["overall"]["n"] == 4 and set(report["benchmarks"]) == {"vstar", "mvbench"}
    assert (eval_run_dir(cfg) / "report.md").read_text().startswith("# Evaluation of")
    # A third run finds everything done: it does not even load the model.
    assert eval_run.run(cfg)["overall"]["n"] == 4 and len(made) == 2
