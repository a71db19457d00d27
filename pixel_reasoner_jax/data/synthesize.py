"""Trajectory synthesis as the paper did it: seeds -> an LLM writes the text around operations taken from
the seed's box / frames -> SFT JSONL in the PixelReasoner-SFT-Data schema; resumable, rate-limited, costed.

CLI: `python -m pixel_reasoner_jax.data.synthesize --config=configs/synth.py[:variant] --config.seeds=...
--config.out_dir=...` (configs/synth.py documents every key).
"""

import collections
import concurrent.futures as cf
import dataclasses
import json
import logging
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import openai

from pixel_reasoner_jax.config import ConfigError
from pixel_reasoner_jax.data import synth_config, synth_llm, trajectories
from pixel_reasoner_jax.data.records import BadMediaError, load_image
from pixel_reasoner_jax.data.synth_seeds import Seed, load_seeds
from pixel_reasoner_jax.tools import ops

logger = logging.getLogger(__name__)

KEPT = "kept"
RETRY = "api_error"  # the only status that leaves a seed to be asked again by the next run
_LOOPBACK = re.compile(r"^https?://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(/|$)")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one seed came to: its status (kept, wrong_answer, no_answer, bad_response, op_failed,
    bad_media, api_error), the requests it took and the tokens the API counted for them."""

    id: str
    kind: str
    status: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    no_usage: int = 0  # responses that reported no usage (their tokens are unknown, not zero)
    detail: str = ""


# ------------------------------------------------------------------------------------------- output log


def _read_lines(path: Path) -> list[dict]:
    """The rows of an append-only JSONL; a torn last line (a kill mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        logger.warning("%s: dropping a torn last line of %d bytes (killed mid-write)", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    rows = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path} line {lineno} is not JSON ({e}); this file is written only by synthesize"
            ) from e
    return rows


class OutputLog:
    """`<run>.jsonl` holds the kept trajectories (the SFT file); `<run>.state.jsonl` one line per finished
    seed. Both are appended line by line with fsync: a kill loses at most the seeds in flight."""

    def __init__(self, out_dir: Path, run_name: str):
        self.sft_path = out_dir / f"{run_name}.jsonl"
        self.state_path = out_dir / f"{run_name}.state.jsonl"
        states = _read_lines(self.state_path)
        rows = _read_lines(self.sft_path)
        self.outcomes = [Outcome(**s) for s in states]
        logged = {o.id for o in self.outcomes if o.status == KEPT}
        self._state = open(self.state_path, "a", encoding="utf-8")
        self._sft = open(self.sft_path, "a", encoding="utf-8")
        for row in rows:  # a kill between the row and its state line: the row is the record
            if row["qid"] not in logged:
                meta = row["synth"]
                self._log_state(Outcome(row["qid"], row["kind"], KEPT, **{k: meta[k] for k in _USAGE_KEYS}))
        self.done = {o.id for o in self.outcomes if o.status != RETRY}
        self.kept_before = sum(o.status == KEPT for o in self.outcomes)

    def _append(self, f, row: dict) -> None:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

    def _log_state(self, outcome: Outcome) -> None:
        self._append(self._state, dataclasses.asdict(outcome))
        self.outcomes.append(outcome)

    def finish(self, outcome: Outcome, row: dict | None) -> None:
        """Records a finished seed: its trajectory row first (when kept), then its state line."""
        if row is not None:
            self._append(self._sft, row)
        self._log_state(outcome)
        if outcome.status != RETRY:
            self.done.add(outcome.id)

    def close(self) -> None:
        self._state.close()
        self._sft.close()


_USAGE_KEYS = ("requests", "prompt_tokens", "completion_tokens", "no_usage")


# ------------------------------------------------------------------------------------------- one seed


def _safe(seed_id: str) -> str:
    """A file-name stem for a seed id (ids are data, never trusted as paths)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", seed_id)[:80].lstrip(".")
    return f"{stem}-{zlib.crc32(seed_id.encode()):08x}"


def _save_png(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)  # a kill never leaves a half image under the final name


class _Worker:
    """Builds one seed's trajectory: plan, tools, request, checks, media files and the SFT row."""

    def __init__(self, cfg: synth_config.SynthesisConfig, api: synth_llm.ChatAPI, out_dir: Path):
        self.cfg, self.api, self.out_dir = cfg, api, out_dir
        self.ops_cfg = cfg.ops.build()

    def _ask(self, messages, usage: collections.Counter) -> str:
        usage["requests"] += 1  # a failed request counts too: it was sent
        comp = self.api.complete(messages)
        if comp.prompt_tokens is None:
            usage["no_usage"] += 1
        usage["prompt_tokens"] += comp.prompt_tokens or 0
        usage["completion_tokens"] += comp.completion_tokens or 0
        return comp.text

    def __call__(self, seed: Seed, kind: str) -> tuple[Outcome, dict | None]:
        usage: collections.Counter = collections.Counter()

        def outcome(status: str, detail: str = "") -> Outcome:
            return Outcome(seed.id, kind, status, **{k: usage[k] for k in _USAGE_KEYS}, detail=detail[:300])

        try:
            media = [load_image(p) for p in (seed.frames or [seed.image])]
        except BadMediaError as e:
            return outcome("bad_media", str(e)), None
        try:
            if kind == trajectories.TEXTUAL:
                return self._textual(seed, media, usage, outcome)
            return self._pixel(seed, kind, media, usage, outcome)
        except synth_llm.FatalAPIError:
            raise
        except openai.APIError as e:  # after the client's retries; the next run asks again
            return outcome(RETRY, f"{type(e).__name__}: {e}"), None

    def _textual(self, seed, media, usage, outcome):
        a = self.cfg.api
        messages = synth_llm.textual_request(seed, media, a.image_max_side, a.detail)
        error = None
        for _ in range(self.cfg.textual_attempts):
            text = self._ask(messages, usage).strip()
            try:
                synth_llm.check_segments([text], seed.answer)
            except synth_llm.BadResponse as e:
                error = e
                continue
            head = trajectories.first_messages(self._media_item(seed), seed.question)
            msgs = [*head, {"role": "assistant", "content": [{"type": "text", "text": text}]}]
            return outcome(KEPT), self._row(seed, trajectories.TEXTUAL, msgs, outcome(KEPT))
        return outcome(error.reason, str(error)), None

    def _pixel(self, seed, kind, media, usage, outcome):
        rng = np.random.default_rng([self.cfg.seed, zlib.crc32(seed.id.encode())])
        try:
            if seed.is_video:
                right = trajectories.spread(
                    range(seed.window[0], seed.window[1] + 1), self.ops_cfg.max_frames
                )
                plan = trajectories.plan_video_ops(rng, kind, right, len(media))
                state = ops.VisualState.for_video(media)
            else:
                w, h = media[0].size
                box = [seed.box[0] * w, seed.box[1] * h, seed.box[2] * w, seed.box[3] * h]
                plan = trajectories.plan_image_ops(rng, kind, box, (w, h), self.ops_cfg.padding)
                state = ops.VisualState.for_images(media)
            results = trajectories.run_ops(state, plan, self.ops_cfg)
        except trajectories.PlanError as e:
            return outcome("op_failed", str(e)), None
        a = self.cfg.api
        text = self._ask(
            synth_llm.pixel_request(seed, media, plan, results, a.image_max_side, a.detail), usage
        )
        try:
            segments = synth_llm.split_parts(text, len(plan) + 1)
            synth_llm.check_segments(segments, seed.answer)
        except synth_llm.BadResponse as e:
            return outcome(e.reason, str(e)), None
        stem = _safe(seed.id)

        def write(img, name: str) -> str:
            _save_png(img, self.out_dir / name)
            return name  # relative to out_dir, as the published data's paths are relative to its root

        if seed.is_video:
            place = trajectories.frame_placer(
                plan, media, list(seed.frames), lambda img, n: write(img, f"selected/{stem}_{n}.png")
            )
        else:
            place = lambda k, i, img: write(img, f"crops/{stem}_{k + 1}.png")
        head = trajectories.first_messages(self._media_item(seed), seed.question)
        msgs = trajectories.assemble(head, segments, plan, results, place)
        return outcome(KEPT), self._row(seed, kind, msgs, outcome(KEPT))

    @staticmethod
    def _media_item(seed: Seed) -> dict[str, Any]:
        if seed.is_video:
            return {"type": "video", "video": list(seed.frames)}
        return {"type": "image", "image": seed.image}

    def _row(self, seed: Seed, kind: str, messages: list, done: Outcome) -> dict:
        row = {"qid": seed.id, "kind": kind, "answer": seed.answer, "message_list": messages}
        if seed.is_video:
            row["target_frames"] = list(range(seed.window[0], seed.window[1] + 1))
        else:
            row["target_box"] = list(seed.box)
        row["synth"] = {"model": self.api.model, **{k: getattr(done, k) for k in _USAGE_KEYS}}
        return row


# ----------------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class SynthReport:
    """A run's totals (this run and the ones it resumed); `to_dict` is what <run>.report.json holds."""

    seeds_total: int
    bad_seeds: dict[str, int]
    statuses: dict[str, int]
    kept_by_kind: dict[str, int]
    requests: int
    prompt_tokens: int
    completion_tokens: int
    responses_without_usage: int
    cost_usd: float
    done_before: int
    processed_now: int
    stopped_by_budget: bool
    sft_path: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _api_key(cfg: synth_config.SynthesisConfig) -> str:
    if not cfg.api.key_env:
        return "unused"  # the client needs some string; servers without auth ignore it
    key = os.environ.get(cfg.api.key_env)
    if not key and not _LOOPBACK.match(cfg.api.base_url):
        raise ConfigError("api.key_env", f"environment variable {cfg.api.key_env} is not set")
    return key or "unused"


def assign_kinds(seeds: list[Seed], cfg: synth_config.SynthesisConfig) -> dict[str, str]:
    """Seed id -> trajectory kind: the exact configured mix within image and within video seeds."""
    out = {}
    for video in (False, True):
        group = [s for s in seeds if s.is_video == video]
        kinds = trajectories.allocate_kinds(len(group), cfg.mix.weights(video), cfg.seed + int(video))
        out.update({s.id: k for s, k in zip(group, kinds)})
    return out


def _report(log: OutputLog, cfg, seeds_total, seed_report, done_before, now, stopped) -> SynthReport:
    total = collections.Counter()
    for o in log.outcomes:
        total.update({k: getattr(o, k) for k in _USAGE_KEYS})
    finals = {o.id: o for o in log.outcomes}  # the last word on each seed
    return SynthReport(
        seeds_total=seeds_total,
        bad_seeds=dict(seed_report.skipped),
        statuses=dict(collections.Counter(o.status for o in finals.values())),
        kept_by_kind=dict(collections.Counter(o.kind for o in finals.values() if o.status == KEPT)),
        requests=total["requests"],
        prompt_tokens=total["prompt_tokens"],
        completion_tokens=total["completion_tokens"],
        responses_without_usage=total["no_usage"],
        cost_usd=cfg.cost.estimate(total["prompt_tokens"], total["completion_tokens"]),
        done_before=done_before,
        processed_now=now,
        stopped_by_budget=stopped,
        sft_path=str(log.sft_path),
    )


def run(cfg: synth_config.SynthesisConfig, api: synth_llm.ChatAPI | None = None) -> SynthReport:
    """Synthesizes every seed not finished by an earlier run with the same out_dir and run_name.

    Raises:
      ConfigError: a bad field; synth_llm.FatalAPIError: the endpoint refuses every request.
    """
    synth_config.validate(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds, seed_report = load_seeds(cfg.seeds, cfg.seed_format, cfg.data_root, cfg.num_video_frames)
    kinds = assign_kinds(seeds, cfg)
    if cfg.max_seeds:
        seeds = seeds[: cfg.max_seeds]
    api = api or synth_llm.ChatAPI(
        cfg.api.base_url, cfg.api.model, _api_key(cfg), max_tokens=cfg.api.max_tokens,
        temperature=cfg.api.temperature, timeout_s=cfg.api.timeout_s, retries=cfg.api.retries,
        requests_per_minute=cfg.api.requests_per_minute,
    )  # fmt: skip
    log = OutputLog(out_dir, cfg.run_name)
    todo = [s for s in seeds if s.id not in log.done]
    done_before = len(seeds) - len(todo)
    logger.info(
        "synthesis: %d seeds, %d done before, %d to do -> %s",
        len(seeds),
        done_before,
        len(todo),
        log.sft_path,
    )
    worker, now, stopped = _Worker(cfg, api, out_dir), 0, False

    def spent() -> float:
        return cfg.cost.estimate(
            sum(o.prompt_tokens for o in log.outcomes), sum(o.completion_tokens for o in log.outcomes)
        )

    def settle(futures) -> None:
        nonlocal now
        for fut in futures:
            outcome, row = fut.result()
            log.finish(outcome, row)
            now += 1
            if now % cfg.log_every == 0:
                kept = sum(o.status == KEPT for o in log.outcomes)
                logger.info(
                    "synthesis: %d/%d seeds this run, %d kept in all, ~$%.4f", now, len(todo), kept, spent()
                )

    try:
        with cf.ThreadPoolExecutor(cfg.api.concurrency, thread_name_prefix="synth") as pool:
            pending: set[cf.Future] = set()
            try:
                for seed in todo:
                    if cfg.cost.budget and spent() >= cfg.cost.budget:
                        stopped = True
                        logger.warning(
                            "synthesis: budget $%.2f reached; stopping before new seeds", cfg.cost.budget
                        )
                        break
                    while len(pending) >= cfg.api.concurrency:
                        finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                        settle(finished)
                    pending.add(pool.submit(worker, seed, kinds[seed.id]))
                settle(cf.as_completed(pending))
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    finally:
        log.close()
        api.close()
    report = _report(log, cfg, len(seeds), seed_report, done_before, now, stopped)
    path = out_dir / f"{cfg.run_name}.report.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    logger.info("synthesis report: %s", json.dumps(report.to_dict()))
    return report


def main(config_dict) -> int:
    """CLI body: typed config -> run; a bad field exits 2 naming it."""
    try:
        report = run(synth_config.from_config_dict(config_dict))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except synth_llm.FatalAPIError as e:
        print(f"synthesis stopped: {e}", file=sys.stderr)
        return 3
    print(json.dumps(report.to_dict()))
    return 0


if __name__ == "__main__":
    from absl import app, flags  # imported here: flags are defined only when run as a program
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/synth.py[:gpt4o|textual|tiny]")
    flags.mark_flags_as_required(["config"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app.run(lambda argv: sys.exit(main(_CONFIG.value)))
