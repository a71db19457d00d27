"""Test helpers for rollouts: a scripted Policy, synthetic media and records, and a checkpoint that has
memorised one tool-using episode so that its greedy policy replays it (crop, crop of the crop, answer).
"""

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from pixel_reasoner_jax.data.records import RLRecord
from pixel_reasoner_jax.rollout.policy import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationRequest,
    GenerationResult,
    Policy,
)


def call_text(name: str, arguments: str, closed: bool = False) -> str:
    """An assistant turn that calls `name`; `arguments` is the raw JSON text (it may be malformed on
    purpose). Unclosed turns stop on </tool_call>, as the sampler does with the default stop ids."""
    end = "<|im_end|>" if closed else ""
    return (
        f'Let me look closer.\n<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>{end}'
    )


def crop_text(bbox: Sequence[float], target: int = 1, closed: bool = False) -> str:
    return call_text("crop_image", f'{{"bbox_2d": {list(bbox)}, "target_image": {target}}}', closed)


def select_text(frames: Sequence[int], closed: bool = False) -> str:
    return call_text("select_frames", f'{{"target_frames": {list(frames)}}}', closed)


ANSWER = "The answer is \\boxed{B}.<|im_end|>"


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of uniform noise: every crop of it differs from every other crop."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def record(qid: str, question: str = "Which letter is in the corner?", video: bool = False) -> RLRecord:
    """A query record; tests pass its media to Episode.start directly, so `images` is never read."""
    return RLRecord(
        qid=qid, question=question, images=["unused.png"], is_video=video, answer="B", benchmark="synthetic"
    )


@dataclasses.dataclass(frozen=True)
class Scripted:
    """One scripted turn: its text, and a finish reason that overrides the derived one (e.g. "abort")."""

    text: str
    finish_reason: str | None = None


class ScriptedPolicy(Policy):
    """Answers each request with the next scripted text of its episode, tokenized with the real tokenizer.

    Requests are matched to scripts by their rid `<episode_id>/turn<k>`. Like a real sampler it stops
    after the first stop id (kept in the output), cuts at max_new_tokens (finish "length"), and returns
    one log-prob per id (fake but distinct: -(call + 1) / 100 - j / 1000 for the j-th id of a call).

    Attributes:
      requests: every request received, in order.
      results: rid -> the result returned for it.
      batch_sizes: number of requests per generate call.
    """

    def __init__(self, tok, scripts: Mapping[str, Sequence[str | Scripted]], *, bump_versions: bool = False):
        self.tok = tok
        self.scripts = {
            k: [s if isinstance(s, Scripted) else Scripted(s) for s in v] for k, v in scripts.items()
        }
        self.bump_versions = bump_versions
        self.requests: list[GenerationRequest] = []
        self.results: dict[str, GenerationResult] = {}
        self.batch_sizes: list[int] = []
        self._version = "v0"

    @property
    def weight_version(self) -> str:
        return self._version

    def _one(self, request: GenerationRequest) -> GenerationResult:
        episode_id, _, turn = request.rid.rpartition("/turn")
        script = self.scripts[episode_id][int(turn)]
        ids = self.tok.encode(script.text)
        stops = set(request.sampling.stop_token_ids)
        first_stop = next((j for j, i in enumerate(ids) if i in stops), None)
        if first_stop is not None:
            ids = ids[: first_stop + 1]
        finish, matched = (FINISH_STOP, ids[-1]) if first_stop is not None else (FINISH_LENGTH, None)
        if len(ids) > request.sampling.max_new_tokens:
            ids = ids[: request.sampling.max_new_tokens]
            finish, matched = FINISH_LENGTH, None
        call = len(self.requests)
        logprobs = tuple(-(call + 1) / 100 - j / 1000 for j in range(len(ids)))
        return GenerationResult(
            output_ids=tuple(ids),
            logprobs=logprobs,
            finish_reason=script.finish_reason or finish,
            matched_stop=matched,
            weight_version=self._version,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.batch_sizes.append(len(requests))
        out = []
        for r in requests:
            res = self._one(r)
            self.requests.append(r)
            self.results[r.rid] = res
            out.append(res)
        if self.bump_versions:
            self._version = f"v{len(self.batch_sizes)}"
        return out
