"""The one policy interface of rollouts: token-in/token-out generation requests and results.

The episode loop talks only to `Policy`; the in-process JAX sampler and the SGLang client implement it.
"""

import abc
import dataclasses
from collections.abc import Sequence

from PIL import Image

from pixel_reasoner_jax.processing.vision import Video  # public here too: requests carry videos

# Finish reasons, as SGLang reports them in meta_info.finish_reason.type.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Every sampling parameter explicit (SGLang applies model defaults to omitted ones).

    Log-probs are always log_softmax(logits / temperature) over the full vocabulary, before top-k/top-p
    truncation (SGLang's semantics); temperature 0 means greedy, with log-probs of the raw logits.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One continuation of one conversation.

    `input_ids` hold ONE pad token per image or video item (SGLang's input form); `media` lists those
    items in the order of their pads, images already resized to their final size by the caller.
    """

    input_ids: tuple[int, ...]
    media: tuple[Image.Image | Video, ...]
    sampling: SamplingParams
    rid: str = ""
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """The sampled continuation: ids exactly as sampled (untrimmed) and one log-prob per id."""

    output_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str
    matched_stop: int | None
    weight_version: str
    prompt_tokens: int = 0

    def __post_init__(self):
        if len(self.output_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.output_ids)} output ids but {len(self.logprobs)} log-probs")
        if self.finish_reason not in (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT):
            raise ValueError(f"unknown finish reason {self.finish_reason!r}")


class Policy(abc.ABC):
    """Generates continuations for a batch of requests; implementations may batch or parallelise."""

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in request order."""

    @property
    @abc.abstractmethod
    def weight_version(self) -> str:
        """Label of the weights that produce samples now."""
