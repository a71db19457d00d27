"""Typed, frozen configuration of trajectory synthesis (keys declared in configs/synth.py) and its checks;
every error names the field to change (config.ConfigError).
"""

import dataclasses
import re
from typing import Any

from pixel_reasoner_jax.config import ConfigError, from_mapping
from pixel_reasoner_jax.data.synth_seeds import SEED_FORMATS
from pixel_reasoner_jax.data.trajectories import IMAGE_KINDS, TEXTUAL, VIDEO_KINDS
from pixel_reasoner_jax.tools import ops

DETAILS = ("high", "low", "auto", "")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    """The OpenAI-compatible endpoint, request settings and rate limits (the key comes from `key_env`)."""

    base_url: str
    model: str
    key_env: str
    max_tokens: int
    temperature: float
    timeout_s: float
    retries: int
    requests_per_minute: float
    concurrency: int
    image_max_side: int
    detail: str


@dataclasses.dataclass(frozen=True)
class CostConfig:
    """USD per 1k prompt / completion tokens, and an optional spending stop (0 = none)."""

    prompt_per_1k: float
    completion_per_1k: float
    budget: float

    def estimate(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens / 1000 * self.prompt_per_1k + completion_tokens / 1000 * self.completion_per_1k


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """Weights of the trajectory kinds within image / video seeds; `textual`: share of all seeds."""

    single: float
    recrop1: float
    recrop2: float
    zoom2: float
    select: float
    reselect: float
    textual: float

    def weights(self, video: bool) -> dict[str, float]:
        """Kind -> share among the seeds of one modality (textual first, the rest split by the weights)."""
        kinds = VIDEO_KINDS if video else IMAGE_KINDS
        total = sum(getattr(self, k) for k in kinds)
        out = {TEXTUAL: self.textual}
        out.update({k: (1 - self.textual) * getattr(self, k) / total for k in kinds})
        return out


@dataclasses.dataclass(frozen=True)
class SynthOpsConfig:
    """The visual operations as the training rollout runs them (mirrors rollout.* of the run config)."""

    crop_padding: str
    crop_min_pixels: int
    crop_max_pixels: int
    select_min_pixels: int
    select_max_pixels: int
    max_frames: int
    min_crop_side: int

    def build(self) -> ops.OpsConfig:
        return ops.OpsConfig(
            crop_min_pixels=self.crop_min_pixels,
            crop_max_pixels=self.crop_max_pixels,
            select_min_pixels=self.select_min_pixels,
            select_max_pixels=self.select_max_pixels,
            padding=self.crop_padding,
            max_frames=self.max_frames,
            min_crop_side=self.min_crop_side,
        )


@dataclasses.dataclass(frozen=True)
class SynthesisConfig:
    """One synthesis run: seeds, outputs, endpoint, prices, kind mix and operation settings."""

    variant: str
    seeds: str | None
    seed_format: str
    data_root: str | None
    out_dir: str | None
    run_name: str
    num_video_frames: int
    max_seeds: int
    seed: int
    textual_attempts: int
    log_every: int
    api: ApiConfig
    cost: CostConfig
    mix: MixConfig
    ops: SynthOpsConfig


def _require(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise ConfigError(field, why)


def validate(cfg: SynthesisConfig) -> None:
    """Checks every field a run needs.

    Raises:
      ConfigError: the first failing field, by its dotted name.
    """
    _require(bool(cfg.seeds), "seeds", "set the seed file, e.g. --config.seeds=/data/seeds.jsonl")
    _require(bool(cfg.out_dir), "out_dir", "set the output folder, e.g. --config.out_dir=/data/synth")
    _require(cfg.seed_format in SEED_FORMATS, "seed_format", f"must be one of {SEED_FORMATS}")
    _require(
        bool(_RUN_NAME.match(cfg.run_name)), "run_name", "must be 1-64 of [A-Za-z0-9._-], no leading dot"
    )
    _require(cfg.num_video_frames >= 2, "num_video_frames", "must be >= 2")
    for field in ("max_seeds", "seed"):
        _require(getattr(cfg, field) >= 0, field, "must be >= 0")
    _require(cfg.textual_attempts >= 1, "textual_attempts", "must be >= 1")
    _require(cfg.log_every >= 1, "log_every", "must be >= 1")
    a = cfg.api
    _require(
        a.base_url.startswith(("http://", "https://")), "api.base_url", "must start with http:// or https://"
    )
    _require(bool(a.model.strip()), "api.model", "must name the model")
    _require(
        a.key_env == "" or a.key_env.isidentifier(),
        "api.key_env",
        "must be an environment variable name or ''",
    )
    for field in ("max_tokens", "retries", "concurrency", "image_max_side"):
        _require(getattr(a, field) >= (0 if field == "retries" else 1), f"api.{field}", "out of range")
    _require(a.image_max_side >= 28, "api.image_max_side", "must be >= 28")
    _require(a.temperature >= 0, "api.temperature", "must be >= 0")
    _require(a.timeout_s > 0, "api.timeout_s", "must be > 0")
    _require(a.requests_per_minute >= 0, "api.requests_per_minute", "must be >= 0 (0 = unlimited)")
    _require(a.detail in DETAILS, "api.detail", f"must be one of {DETAILS}")
    for field in ("prompt_per_1k", "completion_per_1k", "budget"):
        _require(getattr(cfg.cost, field) >= 0, f"cost.{field}", "must be >= 0")
    m = cfg.mix
    for field in (*IMAGE_KINDS, *VIDEO_KINDS):
        _require(getattr(m, field) >= 0, f"mix.{field}", "must be >= 0")
    _require(0 <= m.textual <= 1, "mix.textual", "must lie in [0, 1]")
    if m.textual < 1:
        _require(sum(getattr(m, k) for k in IMAGE_KINDS) > 0, "mix.single", "image kind weights sum to 0")
        _require(sum(getattr(m, k) for k in VIDEO_KINDS) > 0, "mix.select", "video kind weights sum to 0")
    try:
        cfg.ops.build()
    except ValueError as e:
        raise ConfigError("ops", str(e)) from None


def from_config_dict(cd: Any) -> SynthesisConfig:
    """The typed config of a configs/synth.py ConfigDict (types checked here, values by `validate`)."""
    return from_mapping(SynthesisConfig, cd)
