"""Token-exact multi-turn episodes: prompt, sampled turns, tool observations, limits, final status.

`Episode` is a token-in/token-out state machine, `run_episodes` drives many of them in lock-step through one
`Policy`, and `Trajectory` is the finished record the reward and `processing/batch.py` read.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from pixel_reasoner_jax.answers import extract_boxed, original_solution
from pixel_reasoner_jax.data.records import RLRecord, load_image, load_video_frames
from pixel_reasoner_jax.processing import chat
from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.processing.vision import (
    ImageProcessorConfig,
    resize_to_limits,
)
from pixel_reasoner_jax.rollout.policy import (
    FINISH_ABORT,
    FINISH_LENGTH,
    GenerationRequest,
    GenerationResult,
    Policy,
    SamplingParams,
    Video,
)
from pixel_reasoner_jax.rollout.trajectory import (
    STATUSES,
    UNTRAINABLE,
    Trajectory,
    Turn,
    resize_video_frames,
)
from pixel_reasoner_jax.tools.ops import PIX, OpsConfig, VisualState, apply_result
from pixel_reasoner_jax.tools.parse import TOOL_START, execute, is_tool_call_turn, parse_tool_call
from pixel_reasoner_jax.tools.prompts import (
    DEFAULT_TOOLS,
    PROMPT_STYLES,
    PromptTemplates,
    system_prompt,
    user_text,
)

# <|im_end|>, </tool_call>, <|endoftext|>. Stopping on </tool_call> saves decoding past a call; the
# <|im_end|> the policy then did not write is appended with mask 0 (reference/sglang.md §5 step 3).
DEFAULT_STOP_IDS = (151645, 151658, 151643)
PROMPT_MODES = ("vcot", "notool")

# Re-exported: callers import the finished-episode types from here as well.
__all__ = [
    "STATUSES",
    "UNTRAINABLE",
    "Episode",
    "EpisodeConfig",
    "PrefixError",
    "PromptMedia",
    "Trajectory",
    "Turn",
    "load_media",
    "model_view_ops",
    "resize_video_frames",
    "run_episodes",
]


class PrefixError(RuntimeError):
    """The sequence of a new request does not extend the previous request's: the state was altered."""


@dataclasses.dataclass(frozen=True)
class EpisodeConfig:
    """Limits, sampling and media sizes of one rollout episode (defaults: the paper's training rollout).

    Attributes:
      max_tool_calls: a call requested after more than this many executed calls ends the episode (§3.1:
        3, so at most 4 calls run).
      max_images: most vision items in the conversation (a video counts as one, as the original's list).
      max_total_tokens: budget of the EXPANDED sequence (each pad counted as its grid's tokens): the
        model's context. Each turn gets at most the remaining budget.
      call_token_limit: a call requested when the expanded sequence is above this is not executed
        (status context_limit): the original's force stop at 12*1024-200 tokens, checked after each turn.
        None = max_total_tokens. Eval sets it below the context, as the original's eval did (its vLLM
        context was prompt_max_len + generate_max_len = 18192 while the loop stopped calls at 12088).
      max_new_tokens: per-turn cap (the original's `--max_out_tokens`, 2048 in training and eval).
      temperature, temperature_after_tool: first turn, and turns after a tool observation (§8.2).
      top_p, top_k: sampling truncation (-1 = no top-k).
      stop_token_ids: ids that end a turn.
      original_min_pixels, original_max_pixels: qwen_vl_utils resize of the query images (§5); crops are
        cut from these images.
      video_min_pixels, video_max_pixels: per-frame resize of a video query's frames (§5: <= 512*784).
      num_video_frames: frames sampled from a video query (16).
      video_fps: frame rate the video item is declared with (2: second_per_grid = 1.0, §6).
      ops: visual-operation settings (crop and select sizes, padding, messages).
      prompt_mode: "vcot" (tool block + guideline) or "notool" (no tools; one turn, calls never run).
      tools: tools offered in vcot mode, by name (tools/prompts.TOOL_SCHEMAS).
      prompt_style: the prompt strings when `Episode.start` is given none (tools/prompts.PROMPT_STYLES).
    """

    max_tool_calls: int = 3
    max_images: int = 16
    max_total_tokens: int = 12 * 1024 - 200
    call_token_limit: int | None = None
    max_new_tokens: int = 2048
    temperature: float = 1.0
    temperature_after_tool: float = 0.9
    top_p: float = 0.95
    top_k: int = 40
    stop_token_ids: tuple[int, ...] = DEFAULT_STOP_IDS
    original_min_pixels: int = 4 * PIX
    original_max_pixels: int = 2000 * PIX
    video_min_pixels: int = 4 * PIX
    video_max_pixels: int = 512 * PIX
    num_video_frames: int = 16
    video_fps: float = 2.0
    ops: OpsConfig = dataclasses.field(default_factory=OpsConfig)
    prompt_mode: str = "vcot"
    tools: tuple[str, ...] = DEFAULT_TOOLS
    prompt_style: str = "released"

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
        object.__setattr__(self, "tools", tuple(self.tools))
        checks = [
            (self.max_tool_calls >= 0, "max_tool_calls", ">= 0"),
            (self.max_images >= 1, "max_images", ">= 1"),
            (self.max_total_tokens >= 1, "max_total_tokens", ">= 1"),
            (self.max_new_tokens >= 1, "max_new_tokens", ">= 1"),
            (self.call_token_limit is None or self.call_token_limit >= 1, "call_token_limit", "None or >= 1"),
            (self.temperature >= 0, "temperature", ">= 0"),
            (self.temperature_after_tool >= 0, "temperature_after_tool", ">= 0"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (self.top_k == -1 or self.top_k >= 1, "top_k", "-1 or >= 1"),
            (0 < self.original_min_pixels <= self.original_max_pixels, "original_min_pixels", "<= max, > 0"),
            (0 < self.video_min_pixels <= self.video_max_pixels, "video_min_pixels", "<= max, > 0"),
            (self.num_video_frames >= 1, "num_video_frames", ">= 1"),
            (self.video_fps > 0 and math.isfinite(self.video_fps), "video_fps", "a positive number"),
            (self.prompt_mode in PROMPT_MODES, "prompt_mode", f"one of {PROMPT_MODES}"),
            (self.prompt_style in PROMPT_STYLES, "prompt_style", f"one of {tuple(PROMPT_STYLES)}"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"EpisodeConfig.{name} must be {expected}, got {getattr(self, name)!r}")

    @classmethod
    def from_rollout(cls, rc: Any) -> "EpisodeConfig":
        """From the run config's `RolloutConfig` (pixel_reasoner_jax/config.py)."""
        ops = OpsConfig(
            crop_min_pixels=rc.crop_min_pixels,
            crop_max_pixels=rc.crop_max_pixels,
            select_min_pixels=rc.select_min_pixels,
            select_max_pixels=rc.select_max_pixels,
            padding=rc.crop_padding,
            max_frames=rc.max_frames,
            min_crop_side=rc.min_crop_side,
            video_crop_index=rc.video_crop_index,
        )
        return cls(
            max_tool_calls=rc.max_tool_calls,
            max_images=rc.max_images,
            max_total_tokens=rc.max_total_tokens,
            max_new_tokens=rc.max_new_tokens,
            temperature=rc.temperature,
            temperature_after_tool=rc.temperature_after_tool,
            top_p=rc.top_p,
            top_k=rc.top_k,
            ops=ops,
            prompt_mode=rc.template,
            prompt_style=rc.prompt_style,
        )


@dataclasses.dataclass(frozen=True)
class PromptMedia:
    """A query's decoded media before any resize: images, or the frames of its one video."""

    images: tuple[Image.Image, ...] = ()
    video_frames: tuple[Image.Image, ...] | None = None


def load_media(record: RLRecord, cfg: EpisodeConfig) -> PromptMedia:
    """Decodes a record's images (or samples its video's frames); load once, share across a group."""
    if record.is_video:
        source = record.images[0] if len(record.images) == 1 else record.images
        return PromptMedia(video_frames=tuple(load_video_frames(source, cfg.num_video_frames)))
    return PromptMedia(images=tuple(load_image(p) for p in record.images))


def model_view_ops(ops: OpsConfig, proc: ImageProcessorConfig) -> OpsConfig:
    """`ops` with its crop and select pixel ranges clamped into the processor's range.

    Every returned image is resized into the processor's limits before the model sees it. Clamping first
    makes that resize the identity, so the size the observation announces ("Image Size: WxH") and the size
    a later crop's absolute coordinates are read in are the size the model saw. With the real checkpoints'
    limits (up to 16384 tokens per image) nothing changes; unresized selected frames (None) get the
    processor's range for the same reason.
    """

    def clamp(lo: int | None, hi: int | None) -> tuple[int, int]:
        lo = proc.min_pixels if lo is None else lo
        hi = proc.max_pixels if hi is None else hi
        return (
            min(max(lo, proc.min_pixels), proc.max_pixels),
            max(min(hi, proc.max_pixels), proc.min_pixels),
        )

    crop_lo, crop_hi = clamp(ops.crop_min_pixels, ops.crop_max_pixels)
    sel_lo, sel_hi = clamp(ops.select_min_pixels, ops.select_max_pixels)
    return dataclasses.replace(
        ops,
        crop_min_pixels=crop_lo,
        crop_max_pixels=crop_hi,
        select_min_pixels=sel_lo,
        select_max_pixels=sel_hi,
    )


def _grid_of(item: Image.Image | Video, proc: ImageProcessorConfig) -> tuple[int, int, int]:
    """grid_thw of a media item at its final size (sides multiples of patch * merge)."""
    frames = item.frames if isinstance(item, Video) else (item,)
    w, h = frames[0].size
    if w % proc.factor or h % proc.factor:
        raise ValueError(f"media item is {w}x{h}; final sizes must be multiples of {proc.factor}")
    t = -(-len(frames) // proc.temporal_patch_size) if isinstance(item, Video) else 1
    return (t, h // proc.patch_size, w // proc.patch_size)


class Episode:
    """One query's conversation as ids, grown turn by turn; see the module docstring and `STATUSES`.

    Use `Episode.start(...)`, then alternate `next_request()` and `apply(result)` until `done`, then
    `trajectory()`. Prompt and observations carry loss mask 0; sampled ids are kept exactly with mask 1.
    """

    def __init__(self, *, tok, cfg, proc_cfg, record, episode_id, state, media, ids):
        self.tok: QwenTokenizer = tok
        self.cfg: EpisodeConfig = cfg
        self.proc_cfg: ImageProcessorConfig = proc_cfg
        self.record = record
        self.episode_id = episode_id
        self._state: VisualState = state
        self._ops = model_view_ops(cfg.ops, proc_cfg)
        self._ids: list[int] = [int(i) for i in ids]
        self._mask: list[int] = [0] * len(self._ids)
        self._logprobs: list[float] = [0.0] * len(self._ids)
        self.prompt_length = len(self._ids)
        self._media: list[Image.Image | Video] = list(media)
        self._grids: list[tuple[int, int, int]] = [_grid_of(m, proc_cfg) for m in self._media]
        self._merge2 = proc_cfg.merge_size**2
        self._expanded = len(self._ids) + sum(math.prod(g) // self._merge2 - 1 for g in self._grids)
        self._turns: list[Turn] = []
        self._pending: GenerationRequest | None = None
        self._last_ids: tuple[int, ...] = ()
        self._last_media: tuple = ()
        self._last_call_failed = False
        self.num_calls = self.num_valid_calls = self.num_failed_calls = 0
        self.status: str | None = None
        if self._expanded >= cfg.max_total_tokens:  # no room for a single sampled token
            self.status = "context_limit"

    # ------------------------------------------------------------------------------------------ start

    @classmethod
    def start(
        cls,
        record: RLRecord,
        tokenizer: QwenTokenizer,
        cfg: EpisodeConfig,
        templates: PromptTemplates | None,
        proc_cfg: ImageProcessorConfig,
        *,
        media: PromptMedia | None = None,
        episode_id: str | None = None,
    ) -> "Episode":
        """The prompt of `record`: system text (+ tool block in vcot mode), then the user turn with the
        media first and `question + "\\n\\n" + template` (reference §2), as ids with ONE pad per item.

        Args:
          record: the query.
          tokenizer: the Qwen tokenizer.
          cfg: limits and sizes.
          templates: prompt strings (None = those of `cfg.prompt_style`).
          proc_cfg: the model's processor limits; every image is resized into them (what the model sees).
          media: pre-decoded media of `record` (see `load_media`); None = decode now.
          episode_id: id used in request rids; default the record's qid.
        """
        templates = templates or PROMPT_STYLES[cfg.prompt_style]
        media = media or load_media(record, cfg)
        if record.is_video:
            if not media.video_frames:
                raise ValueError(f"record {record.qid!r} is a video query but no video frames were given")
            # qwen_vl_utils sized the frames (<= 512*784 px) and the server's processor re-resized them into
            # its MIN/MAX_PIXELS (reference §5), as it does every image. Crops and selections cut the first
            # size; absolute bbox pixels are read in the size the model saw.
            frames = resize_video_frames(
                media.video_frames, cfg.video_min_pixels, cfg.video_max_pixels, proc_cfg.factor
            )
            seen = resize_video_frames(frames, proc_cfg.min_pixels, proc_cfg.max_pixels, proc_cfg.factor)
            items = [Video(frames=seen, fps=cfg.video_fps)]
            state = VisualState.for_video(frames, seen_sizes=[f.size for f in seen])
        else:
            if not media.images:
                raise ValueError(f"record {record.qid!r} is an image query but has no images")
            kept = [
                resize_to_limits(im, cfg.original_min_pixels, cfg.original_max_pixels, proc_cfg.factor)
                for im in media.images
            ]
            items = [
                resize_to_limits(im, proc_cfg.min_pixels, proc_cfg.max_pixels, proc_cfg.factor) for im in kept
            ]
            # Crops cut the kept image; absolute bbox pixels are read in the size the model saw.
            state = VisualState.for_images(kept, seen_sizes=[im.size for im in items])
        tools = cfg.tools if cfg.prompt_mode == "vcot" else ()
        kind = chat.VIDEO if record.is_video else chat.IMAGE
        messages = [
            {"role": "system", "content": system_prompt(templates, tools)},
            {
                "role": "user",
                "content": [{"type": kind} for _ in items]
                + [{"type": "text", "text": user_text(record.question, templates, cfg.prompt_mode)}],
            },
        ]
        grids = [_grid_of(m, proc_cfg) for m in items]
        enc = chat.encode_conversation(
            tokenizer,
            messages,
            image_grids=[] if record.is_video else grids,
            video_grids=grids if record.is_video else [],
            add_generation_prompt=True,
            expand=False,
            merge_size=proc_cfg.merge_size,
        )
        return cls(
            tok=tokenizer,
            cfg=cfg,
            proc_cfg=proc_cfg,
            record=record,
            episode_id=record.qid if episode_id is None else episode_id,
            state=state,
            media=items,
            ids=enc.input_ids.tolist(),
        )

    # ------------------------------------------------------------------------------------------ state

    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def expanded_length(self) -> int:
        return self._expanded

    @property
    def input_ids(self) -> tuple[int, ...]:
        return tuple(self._ids)

    def _check_prefix(self) -> None:
        n = len(self._last_ids)
        # Media compare by identity: the same objects must still be there (pixel equality would be slow).
        same_media = len(self._media) >= len(self._last_media) and all(
            a is b for a, b in zip(self._media, self._last_media)
        )
        if tuple(self._ids[:n]) != self._last_ids or not same_media:
            first = next((i for i in range(n) if i >= len(self._ids) or self._ids[i] != self._last_ids[i]), n)
            raise PrefixError(
                f"episode {self.episode_id!r}: the new prompt does not extend the previous one "
                f"(ids differ from position {first} of {n}, or the media list changed)"
            )

    def next_request(self) -> GenerationRequest | None:
        """The next turn's request (the same object until `apply`), or None when the episode is done.

        Raises:
          PrefixError: the sequence no longer starts with the previous request's ids and media.
        """
        if self.done:
            return None
        if self._pending is not None:
            return self._pending
        self._check_prefix()
        budget = self.cfg.max_total_tokens - self._expanded
        sampling = SamplingParams(
            max_new_tokens=min(self.cfg.max_new_tokens, budget),
            temperature=self.cfg.temperature if not self._turns else self.cfg.temperature_after_tool,
            top_p=self.cfg.top_p,
            top_k=self.cfg.top_k,
            stop_token_ids=self.cfg.stop_token_ids,
        )
        self._pending = GenerationRequest(
            input_ids=tuple(self._ids),
            media=tuple(self._media),
            sampling=sampling,
            rid=f"{self.episode_id}/turn{len(self._turns)}",
        )
        self._last_ids, self._last_media = self._pending.input_ids, self._pending.media
        return self._pending

    # ------------------------------------------------------------------------------------------ apply

    def apply(self, result: GenerationResult) -> None:
        """Appends the sampled ids exactly, then runs the tool call they request or ends the episode.

        Raises:
          RuntimeError: no request is pending (call next_request first) or the episode is done.
        """
        if self._pending is None:
            raise RuntimeError(f"episode {self.episode_id!r}: apply() without a pending request")
        request, self._pending = self._pending, None
        out = [int(i) for i in result.output_ids]
        start = len(self._ids)
        self._ids.extend(out)
        self._mask.extend([1] * len(out))
        self._logprobs.extend(float(x) for x in result.logprobs)
        self._expanded += len(out)
        text = self.tok.decode(out, skip_special_tokens=False)
        turn = Turn(
            start, len(self._ids), result.weight_version, result.finish_reason, request.sampling.temperature
        )
        if result.finish_reason == FINISH_ABORT:
            return self._end(turn, "aborted")
        # Model output is untrusted: ids the tokenizer cannot read (the model's vocabulary is padded past
        # the tokenizer's) or pads no image backs end this one episode instead of raising in a whole batch.
        vocab = len(self.tok)
        if any(not 0 <= i < vocab for i in out) or self.tok.image_pad in out or self.tok.video_pad in out:
            return self._end(turn, "invalid_tokens")
        if self.cfg.prompt_mode == "notool" or not is_tool_call_turn(text):
            return self._end(turn, self._final_status(text, result))
        self._call(turn, text, closed=bool(out) and out[-1] == self.tok.im_end)

    def _final_status(self, text: str, result: GenerationResult) -> str:
        if result.finish_reason == FINISH_LENGTH and self._expanded >= self.cfg.max_total_tokens:
            return "context_limit"
        if self._last_call_failed:
            return "tool_error"
        if extract_boxed(text) is not None:
            return "answered"
        return "malformed_call" if TOOL_START in text else "no_answer"

    def _end(self, turn: Turn, status: str) -> None:
        self._turns.append(turn)
        self.status = status

    def _call(self, turn: Turn, text: str, closed: bool) -> None:
        self.num_calls += 1
        turn = dataclasses.replace(turn, tool_call=True)
        if self.num_valid_calls + self.num_failed_calls > self.cfg.max_tool_calls:
            return self._end(turn, "max_tool_calls")
        limit = self.cfg.call_token_limit
        if self._expanded >= self.cfg.max_total_tokens or (limit is not None and self._expanded > limit):
            return self._end(turn, "context_limit")
        call = parse_tool_call(text)
        result = execute(call, self._state, self._ops)
        turn = dataclasses.replace(turn, tool_name=result.name, ignored_keys=result.ignored_keys)
        proc = self.proc_cfg
        new_media = [
            resize_to_limits(im, proc.min_pixels, proc.max_pixels, proc.factor) for im in result.new_images
        ]
        if len(self._media) + len(new_media) > self.cfg.max_images:
            return self._end(turn, "max_images")
        grids = [_grid_of(m, proc) for m in new_media]
        parts = [result.text] + [{"type": chat.IMAGE} for _ in new_media]
        obs = chat.observation_ids(
            self.tok, parts, image_grids=grids, expand=False, closed=closed, merge_size=proc.merge_size
        )
        obs_expanded = len(obs) + sum(math.prod(g) // self._merge2 - 1 for g in grids)
        if self._expanded + obs_expanded >= self.cfg.max_total_tokens:
            return self._end(turn, "context_limit")
        self._ids.extend(int(i) for i in obs)
        self._mask.extend([0] * len(obs))
        self._logprobs.extend([0.0] * len(obs))
        self._expanded += obs_expanded
        self._media.extend(new_media)
        self._grids.extend(grids)
        self._state = apply_result(self._state, result)
        if result.ok:
            self.num_valid_calls += 1
        else:
            self.num_failed_calls += 1
        self._last_call_failed = not result.ok
        self._turns.append(
            dataclasses.replace(
                turn,
                tool_ok=result.ok,
                tool_error=result.error,
                tool_origins=tuple(result.origins),
                observation=result.text,
            )
        )

    # ------------------------------------------------------------------------------------------ result

    def trajectory(self) -> Trajectory:
        """The finished record.

        Raises:
          RuntimeError: the episode is not done.
        """
        if not self.done:
            raise RuntimeError(
                f"episode {self.episode_id!r} is not finished; it has {len(self._turns)} turns"
            )
        texts = [self.tok.decode(self._ids[t.start : t.end], skip_special_tokens=True) for t in self._turns]
        last = self._turns[-1] if self._turns else None
        tp = self.proc_cfg.temporal_patch_size
        return Trajectory(
            record=self.record,
            episode_id=self.episode_id,
            input_ids=np.asarray(self._ids, dtype=np.int32),
            loss_mask=np.asarray(self._mask, dtype=np.int8),
            logprobs=np.asarray(self._logprobs, dtype=np.float32),
            prompt_length=self.prompt_length,
            media=tuple(self._media),
            grids=np.asarray(self._grids, dtype=np.int64).reshape(-1, 3),
            second_per_grid_ts=tuple(tp / m.fps for m in self._media if isinstance(m, Video)),
            status=self.status,
            turns=tuple(self._turns),
            num_calls=self.num_calls,
            num_valid_calls=self.num_valid_calls,
            num_failed_calls=self.num_failed_calls,
            ended_after_failed_call=self._last_call_failed,
            has_answer=bool(texts) and extract_boxed(texts[-1]) is not None,
            truncated=last is not None and last.finish_reason == FINISH_LENGTH,
            response_text="\n".join(texts),
            # The prompt ends with the first assistant header: what follows is what the original scored.
            solution_text=original_solution(
                self.tok.decode(self._ids[self.prompt_length :], skip_special_tokens=False)
            ),
            expanded_length=self._expanded,
        )


def run_episodes(
    policy: Policy, episodes: Sequence[Episode], *, max_concurrency: int | None = None
) -> list[Trajectory]:
    """Drives episodes in lock-step: each round sends every live episode's next request in ONE
    `policy.generate` call (so the sampler batches them), until all are done.

    Args:
      policy: the sampler.
      episodes: started episodes (finished ones are allowed and simply returned).
      max_concurrency: most episodes live at once (None = all); a finished one is replaced by the next.

    Returns:
      Trajectories in the order of `episodes`.

    Raises:
      ValueError: max_concurrency < 1, or the policy returned a wrong number of results.
    """
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency}")
    limit = len(episodes) if max_concurrency is None else max_concurrency
    waiting = list(range(len(episodes)))[::-1]
    live: list[int] = []
    while waiting or live:
        while waiting and len(live) < limit:
            live.append(waiting.pop())
        live = [i for i in live if not episodes[i].done]
        if not live:
            continue
        requests = [episodes[i].next_request() for i in live]
        results = policy.generate(requests)
        if len(results) != len(requests):
            raise ValueError(f"policy returned {len(results)} results for {len(requests)} requests")
        for i, res in zip(live, results):
            episodes[i].apply(res)
        live = [i for i in live if not episodes[i].done]
    return [ep.trajectory() for ep in episodes]
