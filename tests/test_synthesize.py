"""Trajectory synthesis (data/synthesize.py): seed adapters and bad seeds, the kind mix, the writer's text
checks, the kept path through a real-HTTP stub of the OpenAI API, resume after kill -9, API failures, and an
end-to-end run against our own /v1/chat/completions server with the tiny random checkpoint."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import portpicker
import pytest
from PIL import Image
from server_helpers import send_json

from pixel_reasoner_jax.config import ConfigError
from pixel_reasoner_jax.data import records as R
from pixel_reasoner_jax.data import synth_config, synth_llm, synthesize
from pixel_reasoner_jax.data.synth_seeds import load_seeds
from pixel_reasoner_jax.tools.prompts import PromptTemplates, system_prompt, user_text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import synth as synth_configs  # noqa: E402

CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.S)
TEMPLATES = PromptTemplates()


# ------------------------------------------------------------------------------------------- fixtures


class StubOpenAI:
    """A real HTTP server speaking /v1/chat/completions with text from `respond(body)`; it logs every request.

    `respond` returns text, or (status, message) for an error reply. Usage: prompt tokens = request bytes
    // 100, completion tokens = words of the reply (any fixed rule: the test checks the sums).
    """

    def __init__(self, respond):
        self.respond, self.bodies, self.lock = respond, [], threading.Lock()
        self.auth, self.prompt_tokens, self.completion_tokens = [], [], []
        self.in_flight = self.most_in_flight = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                body = json.loads(raw)
                with stub.lock:
                    stub.bodies.append(body)
                    stub.auth.append(self.headers.get("Authorization"))
                    stub.in_flight += 1
                    stub.most_in_flight = max(stub.most_in_flight, stub.in_flight)
                try:
                    out = stub.respond(body)
                finally:
                    with stub.lock:
                        stub.in_flight -= 1
                if isinstance(out, tuple):
                    status, payload = out[0], {"error": {"message": out[1], "type": "x", "code": None}}
                else:
                    status = 200
                    usage = {"prompt_tokens": len(raw) // 100, "completion_tokens": len(out.split())}
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    with stub.lock:
                        stub.prompt_tokens.append(usage["prompt_tokens"])
                        stub.completion_tokens.append(usage["completion_tokens"])
                    payload = {
                        "id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": out}}],
                        "usage": usage,
                    }  # fmt: skip
                send_json(self, status, payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", portpicker.pick_unused_port()), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def questions(self) -> Counter:
        """Requests per seed (the seed's question, read back from the request)."""
        return Counter(_question(b) for b in self.bodies)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _texts(body) -> list[str]:
    return [c["text"] for c in body["messages"][-1]["content"] if c.get("type") == "text"]


def _question(body) -> str:
    texts = _texts(body)
    m = re.match(r"Question: (.*?)\n\nCorrect answer", texts[0], re.S)
    return m.group(1) if m else texts[-1].split("\n\n")[0]


def writer(textual: dict[str, str], garbage: frozenset = frozenset()):
    """A well-behaved writer: n parts for pixel requests (answering what the request says is correct),
    `textual[question]` for textual ones, and text without markers for questions in `garbage`."""

    def respond(body):
        q = _question(body)
        if q in garbage:
            return "I cannot follow the format."
        if body["messages"][0]["content"] != synth_llm.WRITER_SYSTEM:
            return textual[q]
        texts = _texts(body)
        n = int(re.search(r"Write (\d+) parts", texts[-1]).group(1))
        answer = re.search(r"Correct answer: (.*)\n", texts[0]).group(1)
        parts = [f"[PART {k}]\nStep {k}: looking at the returned view." for k in range(1, n)]
        return "\n".join([*parts, f"**[PART {n}]**\nNow it is readable: \\boxed{{{answer}}}."])

    return respond


def _scene(size: int, box, seed: int) -> Image.Image:
    """Noise with one red rectangle at pixel box."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(90, 170, size=(size, size, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    arr[y1:y2, x1:x2] = (220, 30, 30)
    return Image.fromarray(arr)


def make_seeds(root: Path, n_image: int = 6, n_video: int = 3, frames: int = 16) -> Path:
    """Seed JSONL: image seeds (224 px, a red box) and video seeds (16 frames of 112 px, box in frames 5-7)."""
    rows = []
    for i in range(n_image):
        x, y = 20 + 25 * (i % 6), 150 - 20 * (i % 5)
        box = (x, y, x + 30, y + 24)
        _scene(224, box, i).save(root / f"img{i}.png")
        rows.append({"id": f"img-{i}", "image": f"img{i}.png", "question": f"What is at spot {i}?",
                     "answer": f"R{i}", "box": [box[0] / 224, box[1] / 224, box[2] / 224, box[3] / 224]})  # fmt: skip
    for j in range(n_video):
        paths = []
        for f in range(1, frames + 1):
            p = root / f"vid{j}" / f"frame_{f:02d}.png"
            p.parent.mkdir(exist_ok=True)
            _scene(112, (40, 40, 70, 60) if 5 <= f <= 7 else (0, 0, 0, 0), 100 * j + f).save(p)
            paths.append(str(p.relative_to(root)))
        rows.append({"id": f"vid-{j}", "video": paths, "question": f"What flashes in clip {j}?",
                     "answer": f"V{j}", "frames": [5, 7]})  # fmt: skip
    path = root / "seeds.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(seeds: Path, out: Path, url: str, variant: str = "tiny", **overrides):
    cd = synth_configs.get_config(variant)
    with cd.unlocked():
        cd.seeds, cd.out_dir, cd.api.base_url = seeds and str(seeds), str(out), url
        for key, value in overrides.items():
            section = cd
            *path, leaf = key.split(".")
            for p in path:
                section = section[p]
            section[leaf] = value
    return synth_config.from_config_dict(cd)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


# ----------------------------------------------------------------------------------------------- seeds


def test_seed_adapters_count_and_skip_bad_seeds(tmp_path):
    seeds = make_seeds(tmp_path, n_image=2, n_video=1)
    bad = [
        {"id": "no-file", "image": "missing.png", "question": "q?", "answer": "a", "box": [0.1, 0.1, 0.2, 0.2]},
        {"id": "pixel-box", "image": "img0.png", "question": "q?", "answer": "a", "box": [10, 10, 50, 50]},
        {"id": "no-q", "image": "img0.png", "question": " ", "answer": "a", "box": [0.1, 0.1, 0.2, 0.2]},
        {"id": "img-0", "image": "img0.png", "question": "dup?", "answer": "a", "box": [0.1, 0.1, 0.2, 0.2]},
        {"id": "both", "image": "img0.png", "video": [], "question": "q?", "answer": "a"},
        {"id": "window", "video": [f"vid0/frame_{f:02d}.png" for f in range(1, 17)], "question": "q?",
         "answer": "a", "frames": [9, 17]},
        {"id": "short", "video": [f"vid0/frame_{f:02d}.png" for f in range(1, 16)], "question": "q?",
         "answer": "a", "frames": [1, 2]},
    ]  # fmt: skip
    with open(seeds, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in bad) + "{not json\n")
    got, report = load_seeds(seeds)
    assert [s.id for s in got] == ["img-0", "img-1", "vid-0"]
    assert got[2].is_video and got[2].window == (5, 7) and len(got[2].frames) == 16
    assert os.path.isabs(got[0].image) and got[0].size == (224, 224)
    assert report.total == 11 and report.kept == 3
    assert dict(report.skipped) == {"missing_media": 1, "bad_box": 1, "empty_question": 1, "duplicate_id": 1,
                                    "missing_field": 1, "bad_frames": 1, "bad_video": 1, "bad_json": 1}  # fmt: skip

    # V* layout: one JSON per image beside it, pixel [x, y, w, h] boxes, correct option first.
    vdir = tmp_path / "vstar"
    vdir.mkdir()
    _scene(200, (50, 60, 90, 80), 0).save(vdir / "sa_1.jpg")
    ann = {"target_object": ["cup"], "bbox": [[50, 60, 40, 20]], "question": "What is the color of the cup?",
           "options": ["red", "blue", "green", "white"]}  # fmt: skip
    (vdir / "sa_1.json").write_text(json.dumps(ann))
    (vdir / "sa_2.json").write_text(json.dumps({**ann, "bbox": []}))  # no image and no box
    (vs,), vreport = load_seeds(vdir, "vstar")
    assert vs.box == pytest.approx((0.25, 0.3, 0.45, 0.4)) and vreport.skipped == {"missing_field": 1}
    letter = vs.answer
    assert re.search(rf"\n{letter}: red(\n|$)", vs.question) and vs.question.startswith(
        ann["question"] + "\nchoices:\nA: "
    )

    # Webpage screenshot rows: pixel [x1, y1, x2, y2] answer box.
    web = tmp_path / "web.jsonl"
    _scene(400, (0, 0, 1, 1), 1).resize((400, 200)).save(tmp_path / "page.png")
    web.write_text(json.dumps({"id": 7, "screenshot": "page.png", "question": "Price?", "answer": 12,
                               "answer_bbox": [100, 50, 200, 100]}) + "\n")  # fmt: skip
    (ws,), _ = load_seeds(web, "webpage")
    assert (ws.id, ws.answer, ws.box) == ("7", "12", pytest.approx((0.25, 0.25, 0.5, 0.5)))


def test_kind_mix_is_exact_per_modality(tmp_path):
    cfg = config(tmp_path / "s.jsonl", tmp_path / "out", "http://127.0.0.1:1/v1", **{"mix.textual": 0.0})
    fake = [synthesize.Seed(f"i{k}", "q", "a", image="x", box=(0, 0, 1, 1)) for k in range(100)]
    fake += [synthesize.Seed(f"v{k}", "q", "a", frames=("f",) * 16, window=(1, 2)) for k in range(20)]
    kinds = synthesize.assign_kinds(fake, cfg)
    image = Counter(kinds[f"i{k}"] for k in range(100))
    video = Counter(kinds[f"v{k}"] for k in range(20))
    assert image == {"single": 30, "recrop1": 20, "recrop2": 20, "zoom2": 30}
    assert video == {"select": 18, "reselect": 2}
    assert kinds == synthesize.assign_kinds(fake, cfg)  # a rerun draws the same kinds


def test_writer_text_checks():
    good = "[PART 1]\nA first look.\n\n**[PART 2]:**\nIt reads \\boxed{K7}."
    assert synth_llm.split_parts(good, 2) == ["A first look.", "It reads \\boxed{K7}."]
    for text, n in [(good, 3), ("intro\n" + good, 2), ("[PART 1]\n\n[PART 2]\nx", 2), ("[PART 2]\na", 1)]:
        with pytest.raises(synth_llm.BadResponse, match="bad_response"):
            synth_llm.split_parts(text, n)
    synth_llm.check_segments(["look", "so \\boxed{k7}"], ["K7", "K-7"])
    cases = [
        (["x <tool_call>", "\\boxed{K7}"], "bad_response"),
        (["x<|im_end|>", "\\boxed{K7}"], "bad_response"),
        (["\\boxed{K7} early", "\\boxed{K7}"], "bad_response"),
        (["look", "no box"], "no_answer"),
        (["look", "\\boxed{K8}"], "wrong_answer"),
    ]
    for segments, reason in cases:
        with pytest.raises(synth_llm.BadResponse) as e:
            synth_llm.check_segments(segments, "K7")
        assert e.value.reason == reason


def test_config_variants_and_errors(tmp_path, monkeypatch):
    for variant in synth_configs.VARIANTS:
        cfg = config(tmp_path / "s", tmp_path / "o", "https://api.example.com/v1", variant)
        synth_config.validate(cfg)
    assert config(tmp_path, tmp_path, "https://x/v1", "gpt4o").api.model == "gpt-4o"
    with pytest.raises(ConfigError, match=r"^api.concurrency"):
        synth_config.validate(config(tmp_path, tmp_path, "https://x/v1", **{"api.concurrency": 0}))
    with pytest.raises(ConfigError, match=r"^seeds"):
        synth_config.validate(config(None, tmp_path, "https://x/v1"))
    values = synth_configs.get_config("tiny").to_dict()
    values["api"]["temperature"] = "hot"
    with pytest.raises(ConfigError, match=r"^api.temperature: expected a float"):
        synth_config.from_config_dict(values)
    values["api"]["extra"] = 1
    with pytest.raises(ConfigError, match=r"^api: unknown keys \['api.extra'\]"):
        synth_config.from_config_dict(values)
    monkeypatch.delenv("SYNTH_TEST_KEY", raising=False)
    remote = config(tmp_path / "s", tmp_path / "o", "https://x/v1", **{"api.key_env": "SYNTH_TEST_KEY"})
    with pytest.raises(ConfigError, match=r"^api.key_env: environment variable SYNTH_TEST_KEY is not set"):
        synthesize._api_key(remote)
    monkeypatch.setenv("SYNTH_TEST_KEY", "sk-secret-123")
    assert synthesize._api_key(remote) == "sk-secret-123"
    cli = [sys.executable, "-m", "pixel_reasoner_jax.data.synthesize", "--config=configs/synth.py:tiny"]
    done = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "config error: seeds: set the seed file" in done.stderr


def test_rate_limiter_spaces_request_starts(monkeypatch):
    clock = {"now": 100.0, "slept": []}

    class FakeTime:
        @staticmethod
        def monotonic():
            return clock["now"]

        @staticmethod
        def sleep(s):
            clock["slept"].append(s)

    monkeypatch.setattr(synth_llm, "time", FakeTime)
    limiter = synth_llm.RateLimiter(per_minute=30)  # one start every 2 s
    for _ in range(3):
        limiter.wait()
    clock["now"] += 10  # idle time is not banked into a burst beyond the next slot
    limiter.wait()
    assert clock["slept"] == [0.0, 2.0, 4.0, 0.0]
    synth_llm.RateLimiter(0).wait()  # unlimited: never sleeps
    assert len(clock["slept"]) == 4


# ----------------------------------------------------------------------------------- kept path (stub)


def _expected_calls(row: dict) -> None:
    """The tool calls follow the seed's box / window; erroneous ones miss it and are not trained."""
    msgs = row["message_list"]
    assistants = [m for m in msgs if m["role"] == "assistant"]
    calls = [json.loads(c) for m in assistants for c in CALL.findall(m["content"][0]["text"])]
    flags = [m.get("loss", True) for m in assistants]
    n_wrong = {"single": 0, "recrop1": 1, "recrop2": 2, "zoom2": 0, "select": 0, "reselect": 1, "textual": 0}
    assert flags == [False] * n_wrong[row["kind"]] + [True] * (len(assistants) - n_wrong[row["kind"]])
    assert len(calls) == len(assistants) - 1
    if row["kind"] in ("select", "reselect"):
        assert calls[-1]["arguments"]["target_frames"] == [5, 6, 7]
        assert all(not set(c["arguments"]["target_frames"]) & {5, 6, 7} for c in calls[:-1])
    elif row["kind"] != "zoom2" and calls:
        box = calls[-1]["arguments"]["bbox_2d"]
        t = row["target_box"]
        assert box[0] <= t[0] + 1e-9 and box[2] >= t[2] - 1e-9 and calls[-1]["arguments"]["target_image"] == 1
    elif calls:
        assert [c["arguments"]["target_image"] for c in calls] == [1, 2]
    for k, m in enumerate(msgs):  # every tool call is followed by its observation
        if m["role"] == "assistant" and k + 1 < len(msgs):
            text = msgs[k + 1]["content"][0]["text"]
            assert text.startswith(
                ("\nHere is the cropped image (Image Size: ", "\nHere are the selected frames")
            )


def test_kept_path_through_a_stub_api(tmp_path, caplog, tok, proc, tiny_ckpt):
    from pixel_reasoner_jax.data.sft_examples import sft_example
    from pixel_reasoner_jax.models.config import ModelConfig

    seeds = make_seeds(tmp_path, n_image=8, n_video=4)
    cfg = config(seeds, tmp_path / "out", "http://127.0.0.1:1/v1", **{"mix.textual": 0.25,
                 "api.key_env": "SYNTH_KEY", "api.concurrency": 3, "api.requests_per_minute": 6000.0,
                 "cost.prompt_per_1k": 0.5, "cost.completion_per_1k": 2.0})  # fmt: skip
    all_seeds = load_seeds(seeds)[0]
    kinds = synthesize.assign_kinds(all_seeds, cfg)
    assert Counter(kinds.values()) == {"textual": 3, "single": 2, "recrop1": 1, "recrop2": 1, "zoom2": 2,
                                       "select": 3}  # fmt: skip
    # One textual seed answers wrong (dropped), one pixel seed gets text without part markers (dropped).
    wrong = next(s for s in all_seeds if kinds[s.id] == "textual")
    garbage = next(s for s in all_seeds if kinds[s.id] == "zoom2")
    textual = {s.question: f"It shows \\boxed{{{s.answer}}}." for s in all_seeds}
    textual[wrong.question] = "Probably \\boxed{Q}."
    stub = StubOpenAI(writer(textual, garbage=frozenset({garbage.question})))
    cfg = dataclasses.replace(cfg, api=dataclasses.replace(cfg.api, base_url=stub.url))
    os.environ["SYNTH_KEY"] = "sk-test-DO-NOT-LEAK"
    try:
        with caplog.at_level("INFO"):
            report = synthesize.run(cfg)
    finally:
        del os.environ["SYNTH_KEY"]
        stub.close()
    statuses = {s["id"]: s["status"] for s in _rows(tmp_path / "out" / "sft.state.jsonl")}
    assert statuses == {s.id: {wrong.id: "wrong_answer", garbage.id: "bad_response"}.get(s.id, "kept")
                        for s in all_seeds}  # fmt: skip
    assert report.statuses == {"kept": 10, "wrong_answer": 1, "bad_response": 1}
    assert report.processed_now == 12 and report.done_before == 0 and report.seeds_total == 12
    rows = _rows(report.sft_path)
    assert len(rows) == 10 and len({r["qid"] for r in rows}) == 10
    # Tokens and cost come from the API's usage fields (the stub's rule), summed over every request.
    assert report.requests == len(stub.bodies) == 12 and report.responses_without_usage == 0
    assert 1 <= stub.most_in_flight <= 3  # api.concurrency
    assert report.prompt_tokens == sum(stub.prompt_tokens) and report.completion_tokens == sum(
        stub.completion_tokens
    )
    assert report.cost_usd == pytest.approx(report.prompt_tokens * 0.5e-3 + report.completion_tokens * 2e-3)
    # The key is sent, and never logged or written.
    assert set(stub.auth) == {"Bearer sk-test-DO-NOT-LEAK"}
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"sk-test-DO-NOT-LEAK" not in path.read_bytes(), path
    assert "sk-test-DO-NOT-LEAK" not in caplog.text

    # Requests: pixel ones carry the full input and every crop; textual ones the notool prompt.
    for body in stub.bodies:
        images = [c for c in body["messages"][-1]["content"] if c.get("type") == "image_url"]
        assert all(i["image_url"]["url"].startswith("data:image/png;base64,") for i in images)
        if body["messages"][0]["content"] == synth_llm.WRITER_SYSTEM:
            n_ops = int(re.search(r"Write (\d+) parts", _texts(body)[-1]).group(1)) - 1
            video = "video of 16 frames" in " ".join(_texts(body))
            assert len(images) == (16 if video else 1 + n_ops)
        else:
            assert _texts(body)[-1].endswith(TEMPLATES.notool) and len(images) in (1, 16)

    # The output is the published SFT schema: loads with the SFT loader and tokenizes with per-turn flags.
    records, rep = R.load_sft_records(report.sft_path, check="verify")
    assert rep.kept == len(rows) and not rep.skipped
    mcfg = ModelConfig.from_pretrained(tiny_ckpt)
    by_kind = Counter()
    for row, rec in zip(rows, records):
        msgs = row["message_list"]
        assert msgs[0]["content"] == [{"type": "text", "text": system_prompt()}]
        assert msgs[1]["content"][0]["type"] == ("video" if row["qid"].startswith("vid") else "image")
        assert msgs[1]["content"][-1]["text"] == user_text(msgs[1]["content"][-1]["text"].split("\n\n")[0])
        assert row["synth"]["model"] == "tiny" and row["synth"]["requests"] == 1
        _expected_calls(row)
        by_kind[row["kind"]] += 1
        mask = R.assistant_turn_mask(rec.messages, "per_turn")
        wrong = [m.get("loss") is False for m in rec.messages]
        assert [m and not w for m, w in zip(mask, wrong)] == mask
        if row["kind"] in ("recrop1", "reselect"):
            ex = sft_example(rec, tok, proc, mcfg, mask_mode="per_turn", num_video_frames=16)
            text = tok.decode(ex.input_ids[ex.loss_mask == 1].tolist())
            assert "Step 1" not in text and "Step 2" in text and "\\boxed{" in text
    assert by_kind == Counter(report.kept_by_kind)
    # ... and is what configs/sft.py reads: its SFT loader takes the file as data.sft_path.
    from configs import sft as sft_configs
    from pixel_reasoner_jax import main as prj_main
    from pixel_reasoner_jax.config import validate
    from pixel_reasoner_jax.train import sft as sft_train

    cd = sft_configs.get_config("tiny")
    cd.data.synthetic, cd.data.sft_path, cd.data.sft_loss_mask = False, report.sft_path, "per_turn"
    cd.model.checkpoint = str(tiny_ckpt)
    run_cfg = prj_main.build_config(cd, str(tmp_path / "run"))
    validate(run_cfg, 8)
    assert [r.qid for r in sft_train.load_records(run_cfg)] == [r["qid"] for r in rows]
    saved = json.loads((tmp_path / "out" / "sft.report.json").read_text())
    assert saved == report.to_dict()


# ------------------------------------------------------------------------------------- resume, errors


def test_resume_after_kill_never_reasks_a_finished_seed(tmp_path):
    seeds = make_seeds(tmp_path, n_image=6, n_video=2)
    all_seeds = load_seeds(seeds)[0]
    held = all_seeds[3]
    arrived, release = threading.Event(), threading.Event()
    base = writer({})

    def respond(body):
        if _question(body) == held.question and not release.is_set():
            arrived.set()  # the 4th seed's request hangs until the client is killed
            release.wait(120)
            return 503, "gone"
        return base(body)

    stub = StubOpenAI(respond)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pixel_reasoner_jax.data.synthesize", "--config=configs/synth.py:tiny",
           f"--config.seeds={seeds}", f"--config.out_dir={out}", f"--config.api.base_url={stub.url}",
           "--config.api.concurrency=1", "--config.mix.textual=0.0"]  # fmt: skip
    log = open(tmp_path / "run.log", "wb")
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert arrived.wait(120), (tmp_path / "run.log").read_text()
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert [s["id"] for s in _rows(out / "sft.state.jsonl")] == [s.id for s in all_seeds[:3]]
        with open(out / "sft.jsonl", "a") as f:
            f.write('{"qid": "torn')  # as a kill in the middle of a write leaves it
        release.set()
        again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        report = json.loads(again.stdout.strip().splitlines()[-1])
        asked = stub.questions()
        # Every seed asked once; only the one in flight at the kill was asked again.
        assert asked == {s.question: 2 if s is held else 1 for s in all_seeds}
        assert (report["done_before"], report["processed_now"], report["statuses"]) == (3, 5, {"kept": 8})
        rows = _rows(out / "sft.jsonl")
        assert sorted(r["qid"] for r in rows) == sorted(s.id for s in all_seeds)
        # A third run finds nothing to do and asks nothing.
        third = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert (
            third.returncode == 0 and json.loads(third.stdout.strip().splitlines()[-1])["processed_now"] == 0
        )
        assert stub.questions() == asked
    finally:
        release.set()
        log.close()
        stub.close()


def test_api_errors_retry_next_run_and_a_refused_key_stops(tmp_path):
    seeds = make_seeds(tmp_path, n_image=3, n_video=0)
    failing = {"What is at spot 1?"}
    base = writer({})
    stub = StubOpenAI(lambda body: (500, "server on fire") if _question(body) in failing else base(body))
    try:
        cfg = config(seeds, tmp_path / "out", stub.url, **{"api.retries": 0, "mix.textual": 0.0})
        first = synthesize.run(cfg)
        assert first.statuses == {"kept": 2, "api_error": 1} and first.requests == 3
        failing.clear()
        second = synthesize.run(cfg)
        assert (second.done_before, second.processed_now, second.statuses) == (2, 1, {"kept": 3})
        assert stub.questions()["What is at spot 1?"] == 2 and len(stub.bodies) == 4
        stub.respond = lambda body: (401, "invalid api key")
        with pytest.raises(synth_llm.FatalAPIError, match="AuthenticationError"):
            synthesize.run(dataclasses.replace(cfg, out_dir=str(tmp_path / "other")))
        assert (tmp_path / "other" / "sft.state.jsonl").read_text() == ""
    finally:
        stub.close()


# --------------------------------------------------------------------------- against our own server


class _CountingPolicy:
    """The served policy, counting the requests that reach the model."""

    def __init__(self, policy):
        self.policy, self.count = policy, 0

    def generate(self, requests):
        self.count += len(requests)
        return self.policy.generate(requests)

    def __getattr__(self, name):
        return getattr(self.policy, name)


def test_end_to_end_against_our_server(tmp_path, tiny_ckpt, monkeypatch):
    """Our /v1/chat/completions with the tiny random checkpoint writes garbage: every pixel trajectory fails
    the part format and every textual answer is wrong, each counted; usage comes from the server; a rerun
    with more seeds asks the server only for the new ones."""
    from pixel_reasoner_jax.serve.backend import JaxBackend
    from pixel_reasoner_jax.serve.http import SGLangServer

    seeds = make_seeds(tmp_path, n_image=4, n_video=1)
    backend = JaxBackend(str(tiny_ckpt), "0", max_batch=1, seq_buckets=(1024,), patch_buckets=(1024,),
                         decode_bucket=16)  # fmt: skip
    counting = _CountingPolicy(backend.policy)
    # The class's own property goes back after the test (a bare `del` would leave JaxBackend without one,
    # breaking every later JaxBackend in the process).
    monkeypatch.setattr(type(backend), "policy", property(lambda self: counting))
    srv = SGLangServer(backend, port=portpicker.pick_unused_port(), max_batch=1, batch_wait_s=0.0).start()
    try:
        cfg = config(seeds, tmp_path / "out", srv.url + "/v1", **{"max_seeds": 3})
        first = synthesize.run(cfg)
        assert counting.count == 3 == first.requests and first.processed_now == 3
        second = synthesize.run(dataclasses.replace(cfg, max_seeds=0))
    finally:
        srv.stop()
    assert counting.count == 5 and second.done_before == 3 and second.processed_now == 2
    kinds = synthesize.assign_kinds(load_seeds(seeds)[0], cfg)
    states = {s["id"]: s for s in _rows(tmp_path / "out" / "sft.state.jsonl")}
    for sid, kind in kinds.items():
        want = ("no_answer", "wrong_answer") if kind == "textual" else ("bad_response",)
        assert states[sid]["status"] in want, (sid, kind, states[sid])
        assert states[sid]["prompt_tokens"] > 100 and 0 < states[sid]["completion_tokens"] <= 16
    assert second.statuses.get("kept", 0) == 0 and sum(second.statuses.values()) == 5
    assert second.requests == 5 and second.prompt_tokens == sum(s["prompt_tokens"] for s in states.values())
    assert second.cost_usd == pytest.approx(cfg.cost.estimate(second.prompt_tokens, second.completion_tokens))
    assert (tmp_path / "out" / "sft.jsonl").read_text() == ""
