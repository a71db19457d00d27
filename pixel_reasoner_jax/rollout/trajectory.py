"""What a finished episode is: its statuses, turns and `Trajectory`, and its trainer view `expand_trajectory`.

The reward, the trainer and the metrics read these; rollout/episode.py builds them.
"""

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.processing.batch import Example, build_example
from pixel_reasoner_jax.processing.chat import expand_pads
from pixel_reasoner_jax.processing.vision import (  # noqa: F401 (resize_video_frames: its old home)
    ImageProcessorConfig,
    Video,
    resize_video_frames,
)

# How an episode ended. Precedence when several hold (checked in this order): aborted, invalid_tokens;
# then for a turn that requests a tool: max_tool_calls, context_limit, max_images, context_limit (the
# observation does not fit); for a final turn: context_limit, tool_error, answered, malformed_call, no_answer.
STATUSES = {
    "answered": "the final turn is no tool call and holds a closed \\boxed{} answer",
    "no_answer": "the final turn is no tool call, holds no \\boxed{} answer and opens no <tool_call>",
    "malformed_call": (
        "the final turn holds no \\boxed{} answer and opens a <tool_call> but does not end with </tool_call> "
        "(an unclosed call, or text after the call), so by the original's rule it was never executed"
    ),
    "tool_error": (
        "the final turn (no tool call) came right after a failed call's error observation; the original "
        "scores such a trajectory 0 even with a correct answer (reference §9.1)"
    ),
    "max_tool_calls": "a call was requested after more than max_tool_calls executed calls (not executed)",
    "max_images": "the requested call's images would bring the conversation above max_images (not appended)",
    "context_limit": (
        "the expanded sequence reached max_total_tokens: a turn was cut by the remaining budget, or a "
        "call's observation would leave no room for another token (not appended)"
    ),
    "aborted": "the policy aborted the request (finish reason 'abort'); not trainable",
    "invalid_tokens": (
        "the policy sampled an image/video pad token that no image backs, or an id outside the tokenizer's "
        "vocabulary; not trainable"
    ),
}
UNTRAINABLE = frozenset({"aborted", "invalid_tokens"})


@dataclasses.dataclass(frozen=True)
class Turn:
    """One sampled assistant turn.

    Attributes:
      start, end: the sampled ids are input_ids[start:end] (collapsed sequence).
      weight_version: the policy version that sampled it.
      finish_reason: "stop" | "length" | "abort".
      temperature: the sampling temperature used.
      tool_call: the turn requested a tool (ends with </tool_call>, reference §3).
      tool_name: the called tool's name, when one could be read.
      tool_ok: True/False when the call was executed and appended, None otherwise.
      tool_error: the error message of a failed call.
      tool_origins: where each image the executed call appended comes from (tools/ops.Origin: original
        image or video frame index, normalised box in it), in order; () when nothing was appended.
      ignored_keys: keys of the call no tool reads (the original ignored them too), e.g. "reason".
      observation: the text of the tool turn appended after this one (its images follow it), or None.
    """

    start: int
    end: int
    weight_version: str
    finish_reason: str
    temperature: float
    tool_call: bool = False
    tool_name: str | None = None
    tool_ok: bool | None = None
    tool_error: str | None = None
    tool_origins: tuple = ()
    ignored_keys: tuple[str, ...] = ()
    observation: str | None = None


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """A finished episode: what the reward and the trainer read.

    Attributes:
      record: the query record the episode answered.
      episode_id: caller-given id (also the prefix of request rids).
      input_ids: (T,) int32 collapsed ids (ONE pad per vision item).
      loss_mask: (T,) int8, 1 exactly on the tokens the policy sampled.
      logprobs: (T,) float32 sampler log-prob of each sampled token, 0.0 where loss_mask is 0.
      prompt_length: ids of the initial prompt.
      media: vision items in pad order, at their final size (PIL images; `Video` for a video query).
      grids: (N, 3) int64 grid_thw of `media`, in pad order.
      second_per_grid_ts: seconds per temporal grid step of each video item, in order.
      status: a key of STATUSES.
      turns: the sampled turns in order.
      num_calls: tool-call turns (an unexecuted final one included: the original's count, §9.2 code form).
      num_valid_calls, num_failed_calls: executed calls whose observation is in the sequence.
      ended_after_failed_call: the last turn came right after a failed call (reference §9.1).
      has_answer: the last turn holds a closed \\boxed{}.
      truncated: the last turn stopped on its token limit (finish "length").
      response_text: the assistant turns' text (special tokens dropped), joined with newlines.
      solution_text: what the original's rule_reward read (answers.original_solution): every token after
        the prompt decoded with special tokens, tool-result turns included, vision pads and later
        assistant headers dropped.
      expanded_length: tokens of the expanded sequence.
    """

    record: Any
    episode_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    logprobs: np.ndarray
    prompt_length: int
    media: tuple[Image.Image | Video, ...]
    grids: np.ndarray
    second_per_grid_ts: tuple[float, ...]
    status: str
    turns: tuple[Turn, ...]
    num_calls: int
    num_valid_calls: int
    num_failed_calls: int
    ended_after_failed_call: bool
    has_answer: bool
    truncated: bool
    response_text: str
    solution_text: str
    expanded_length: int

    def scored_text(self, scoring: str) -> str:
        """The text an answer scoring reads (answers.SCORINGS): the original's solution string for
        "original" (what its rule_reward saw), the assistant turns for "strict" (no special tokens, so a
        fallback "Answer: B" line reads "B", not "B<|im_end|>")."""
        if scoring == "original":
            return self.solution_text
        if scoring == "strict":
            return self.response_text
        raise ValueError(f"scoring must be 'original' or 'strict', got {scoring!r}")

    @property
    def is_video_item(self) -> np.ndarray:
        """(N,) bool: which media items are videos."""
        return np.array([isinstance(m, Video) for m in self.media], dtype=bool)

    @property
    def image_grids(self) -> np.ndarray:
        return self.grids[~self.is_video_item].reshape(-1, 3)

    @property
    def video_grids(self) -> np.ndarray:
        return self.grids[self.is_video_item].reshape(-1, 3)

    @property
    def turn_versions(self) -> tuple[str, ...]:
        return tuple(t.weight_version for t in self.turns)

    @property
    def policy_versions(self) -> frozenset[str]:
        return frozenset(self.turn_versions)

    @property
    def trainable(self) -> bool:
        return self.status not in UNTRAINABLE

    @property
    def num_ignored_keys(self) -> int:
        """Keys of the episode's tool calls that no tool reads (released checkpoints add e.g. "reason")."""
        return sum(len(t.ignored_keys) for t in self.turns)


def expand_trajectory(traj: Trajectory, proc_cfg: ImageProcessorConfig, model_cfg: ModelConfig) -> Example:
    """The trainer's view of a rollout: each pad expanded to its grid's count, mask and log-probs repeated
    with it (pads are never sampled, so they stay 0), pixels of every item, M-RoPE over the whole sequence.

    Raises:
      ValueError: the trajectory is not trainable (aborted, invalid tokens), or its grids disagree with
        its media.
    """
    qid = getattr(traj.record, "qid", traj.episode_id)
    if not traj.trainable:
        raise ValueError(f"trajectory {traj.episode_id!r} has status {traj.status!r}, which is not trainable")
    ex = build_example(traj.input_ids, traj.loss_mask, traj.logprobs, traj.media, proc_cfg, model_cfg, qid)
    if not np.array_equal(ex.grid_thw, traj.grids):
        raise ValueError(
            f"trajectory {traj.episode_id!r}: media give grids {ex.grid_thw.tolist()} but the episode "
            f"recorded {traj.grids.tolist()}"
        )
    # Each sampled token's temperature (greedy turns read 1.0: their log-probs are of the raw logits),
    # expanded with the pads like the mask and log-probs.
    temps = np.ones(len(traj.input_ids), np.float32)
    for turn in traj.turns:
        temps[turn.start : turn.end] = turn.temperature if turn.temperature > 0 else 1.0
    _, temps = expand_pads(
        traj.input_ids, temps, ex.grid_thw[~ex.is_video], ex.grid_thw[ex.is_video],
        image_pad=model_cfg.image_token_id, video_pad=model_cfg.video_token_id,
        merge_size=model_cfg.vision.spatial_merge_size,
    )  # fmt: skip
    return dataclasses.replace(ex, temperatures=temps.astype(np.float32))
