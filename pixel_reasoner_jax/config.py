"""Typed, frozen run configuration: dataclasses built once from the ml_collections ConfigDict, and validation.

Library code receives these dataclasses (or one section of them), never a ConfigDict.
"""

import dataclasses
import math
import pathlib
import typing
from collections.abc import Mapping
from typing import Any

MODES = ("sft", "grpo", "eval")
VARIANTS = ("tiny", "3b", "7b")
DTYPES = ("float32", "bfloat16")
SFT_LOSS_MASKS = ("final_turns", "per_turn")
SCHEDULES = ("cosine", "linear", "constant")  # train/state.make_schedule
WARM_START_SCHEDULES = ("constant", "cosine")  # train/state.OptimConfig.prefix_schedule
BACKENDS = ("jax", "sglang")
TEMPLATES = ("vcot", "notool")
PROMPT_STYLES = ("released", "terse")  # tools/prompts.PROMPT_STYLES
CROP_PADDINGS = ("capped", "fixed")
FILTERS = ("refill", "ssr", "none")
LOGPROB_TEMPERATURES = ("raw", "sampled")
BENCHMARKS = ("vstar", "tallyqa", "infovqa", "mvbench", "synthetic")
# data/synthetic.FAMILIES (a test keeps the two equal)
SYNTHETIC_FAMILIES = ("mixed", "color", "trap", "quarters")
TINY_SIZES = ("tiny", "narrow", "narrow_deep")  # models/tiny.SIZES
TINY_INITS = ("hf", "fan_in")  # models/tiny.INITS


class ConfigError(ValueError):
    """A run-config value that is missing, mistyped or inconsistent; str() starts with the dotted field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which weights, in which dtypes, with which memory/kernel choices (architecture: the checkpoint)."""

    checkpoint: str | None
    hf_id: str
    dtype: str
    param_dtype: str
    remat: str
    vision_remat: str
    freeze_vision: bool
    attention: str
    layer_loop: str
    weight_grad: str
    logprob_chunk: int
    logprob_bucket_steps: int
    tiny_size: str
    tiny_init: str


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ('data', 'fsdp', 'tensor') sizes, -1 = the rest; the sampler's tensor-parallel size."""

    data: int
    fsdp: int
    tensor: int
    rollout_tensor: int


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data sources (or the synthetic generator), image limits per stage, sequence/patch buckets."""

    sft_path: str | None
    rl_path: str | None
    eval_path: str | None
    data_root: str | None
    seed: int
    synthetic: bool
    num_sft: int
    num_rl: int
    num_eval: int
    image_size: int
    synthetic_seed: int
    synthetic_family: str
    sft_loss_mask: str
    num_video_frames: int
    image_min_pixels: int
    image_max_pixels: int
    eval_image_min_pixels: int
    eval_image_max_pixels: int
    video_frame_max_pixels: int
    sft_image_min_pixels: int
    sft_image_max_pixels: int
    sft_video_frame_max_pixels: int
    max_seq_len: int
    seq_buckets: tuple[int, ...]
    patch_buckets: tuple[int, ...]
    num_workers: int


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam with warmup + decay to min_lr_ratio * lr, weight decay and global-norm clipping (0 = off)."""

    lr: float
    warmup_ratio: float
    min_lr_ratio: float
    schedule: str
    weight_decay: float
    b1: float
    b2: float
    eps: float
    grad_clip: float


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """SFT length and batching; in grpo mode `steps` is the warm-start length (0 = none)."""

    steps: int
    batch_size: int
    micro_batches: int
    epochs: int
    checkpoint_every: int
    keep_checkpoints: int


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampler backend, sampling parameters, episode limits and visual-operation settings."""

    backend: str
    sglang_urls: str | None
    launch_local_server: bool
    template: str
    prompt_style: str
    temperature: float
    temperature_after_tool: float
    top_p: float
    top_k: int
    max_new_tokens: int
    prompt_max_len: int
    max_total_tokens: int
    max_tool_calls: int
    max_images: int
    crop_min_pixels: int
    crop_max_pixels: int
    select_min_pixels: int
    select_max_pixels: int
    crop_padding: str
    max_frames: int
    min_crop_side: int
    video_crop_index: str
    model_min_pixels: int
    model_max_pixels: int
    request_timeout_s: float
    retries: int
    server_wait_s: float
    health_backoff_s: float
    health_max_backoff_s: float
    batch_size: int
    decode_bucket: int
    sampler_param_dtype: str

    @property
    def urls(self) -> tuple[str, ...]:
        """The SGLang server URLs (empty when unset): the comma list, or the lines of the `@file` it names
        (blank lines and `#` comments skipped). Raises OSError when that file cannot be read."""
        spec = (self.sglang_urls or "").strip()
        if spec.startswith("@"):
            lines = pathlib.Path(spec[1:]).expanduser().read_text().splitlines()
            return tuple(u for u in (line.split("#", 1)[0].strip() for line in lines) if u)
        return tuple(u.strip() for u in spec.split(",") if u.strip())


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Group sampling, clipped objective, advantage estimator and zero-advantage filtering."""

    steps: int
    num_episodes: int
    group_size: int
    prompts_per_rollout: int
    train_batch_size: int
    micro_batches: int
    eps_low: float
    eps_high: float
    kl_coef: float
    entropy_coef: float
    tis_cap: float
    logprob_temperature: str
    loss_agg: str
    advantage: str
    filter: str
    uniform_tol: float
    replay_capacity: int
    epochs_per_rollout: int
    max_staleness: int
    warm_start_lr: float = 0.0
    warm_start_schedule: str = "constant"
    warm_start_fresh_moments: bool = True

    @property
    def samples_per_rollout(self) -> int:
        """Episodes sampled per rollout batch: prompts_per_rollout * G."""
        return self.prompts_per_rollout * self.group_size

    @property
    def trained_per_rollout(self) -> int:
        """Samples trained per rollout batch and epoch: all of them, or half under SSR (the original's
        `active_sampling` keeps len(items) // 2 for `--filter SSR`)."""
        n = self.samples_per_rollout
        return n // 2 if self.filter == "ssr" else n

    @property
    def replay_size(self) -> int:
        """SSR deque maxlen: replay_capacity, or the rollout batch when it is 0 (the original)."""
        return self.replay_capacity or self.samples_per_rollout

    @property
    def steps_per_rollout(self) -> int:
        """Loop steps (optimizer steps unless skipped) per rollout batch."""
        return self.trained_per_rollout // self.train_batch_size * self.epochs_per_rollout


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Accuracy reward and the curiosity/penalty shaping (paper symbols alpha, H, beta, N; None = the
    form's own constant, train/rewards.FORM_CONSTANTS)."""

    form: str
    curiosity: bool
    penalty: bool
    alpha: float | None
    H: float | None
    beta: float | None
    N: int | None
    scoring: str
    require_boxed: bool
    zero_after_failed_call: bool


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Benchmarks, decoding and eval-time image limits."""

    benchmarks: str
    scoring: str
    every: int
    greedy: bool
    temperature: float
    num_samples: int
    max_new_tokens: int
    prompt_max_len: int
    max_total_tokens: int
    call_token_limit: int
    batch_size: int
    crop_min_pixels: int
    crop_max_pixels: int
    resize_selected: bool
    model_min_pixels: int
    model_max_pixels: int

    @property
    def benchmark_names(self) -> tuple[str, ...]:
        """The benchmark names, split from the comma string."""
        return tuple(b.strip() for b in self.benchmarks.split(",") if b.strip())


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Metric, plot and checkpoint cadence (in optimizer steps)."""

    every: int
    plots_every: int
    tensorboard: bool
    checkpoint_every: int
    keep_checkpoints: int
    rollouts_every: int
    rollout_groups: int
    progress: bool
    call_probe: int


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole run: mode, variant, seed, workdir and one frozen section per concern."""

    mode: str
    variant: str
    seed: int
    workdir: str | None
    compile_cache_dir: str
    host_malloc: str
    model: ModelConfig
    mesh: MeshConfig
    data: DataConfig
    optim: OptimConfig
    sft: SFTConfig
    rollout: RolloutConfig
    grpo: GRPOConfig
    reward: RewardConfig
    eval: EvalConfig
    log: LogConfig


# ------------------------------------------------------------------------------------------------------
# ConfigDict -> dataclasses
# ------------------------------------------------------------------------------------------------------


def _convert(field: str, hint: Any, value: Any) -> Any:
    """Checks `value` against the annotation `hint` and returns it in the dataclass's type."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, field + ".")
    args = typing.get_args(hint)
    if type(None) in args:  # `str | None`
        return None if value is None else _convert(field, next(a for a in args if a is not type(None)), value)
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(field, f"expected a tuple of ints, got {value!r}")
        return tuple(_convert(f"{field}[{i}]", int, v) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(field, f"expected a bool, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(field, f"expected an int, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field, f"expected a float, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(field, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {field} has an unsupported annotation {hint!r}")


def _build(cls: type, values: Any, prefix: str) -> Any:
    section = prefix.rstrip(".") or "config"
    if not isinstance(values, Mapping):
        raise ConfigError(section, f"expected a section (mapping), got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    missing = [n for n in names if n not in values]
    if unknown:
        raise ConfigError(section, f"unknown keys {[prefix + k for k in unknown]}; known: {names}")
    if missing:
        raise ConfigError(section, f"missing keys {[prefix + k for k in missing]}")
    return cls(**{n: _convert(prefix + n, hints[n], values[n]) for n in names})


def from_config_dict(cd: Any) -> RunConfig:
    """Builds the frozen RunConfig from a ConfigDict (or a plain nested mapping).

    Raises:
      ConfigError: a key is unknown or missing, or a value has the wrong type; the message names it.
    """
    return from_mapping(RunConfig, cd)


def from_mapping(cls: type, values: Any, prefix: str = "") -> Any:
    """Builds any frozen config dataclass tree `cls` (e.g. the synthesis config) from a ConfigDict or a nested
    mapping, with the checks of `from_config_dict`; `prefix` starts every field name in errors.

    Raises:
      ConfigError: a key is unknown or missing, or a value has the wrong type; the message names it.
    """
    values = values.to_dict() if hasattr(values, "to_dict") else values
    return _build(cls, values, prefix)


def mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves the (data, fsdp, tensor) sizes, -1 taking the devices the others leave.

    Raises:
      ConfigError: a size is 0 or below -1, two sizes are -1, or the product is not `num_devices`.
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices must be an int >= 1, got {num_devices!r}")
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "tensor": mesh.tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}", f"must be >= 1 or -1 (the rest of the devices), got {size}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh.{free[1]}", f"only one mesh axis may be -1, got -1 for {free}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh.{free[0]}",
                f"cannot take the rest: the other axes use {fixed} devices, which does not divide "
                f"{num_devices} devices",
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            "mesh", f"data * fsdp * tensor = {fixed} must equal the number of devices, {num_devices}"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def rollout_mesh_shape(mesh: MeshConfig, num_devices: int) -> tuple[int, int]:
    """(data, tensor) sizes of the in-process sampler's mesh: tensor = rollout_tensor, data = the rest."""
    if mesh.rollout_tensor < 1 or num_devices % mesh.rollout_tensor:
        raise ConfigError(
            "mesh.rollout_tensor", f"must be >= 1 and divide {num_devices} devices, got {mesh.rollout_tensor}"
        )
    return num_devices // mesh.rollout_tensor, mesh.rollout_tensor


def validate(cfg: RunConfig, num_devices: int) -> None:
    """Checks every field and the cross-field rules for a run on `num_devices` devices.

    The rule tables live in `config_rules.py`; this is the entry point library code calls.

    Raises:
      ConfigError: for the first failing rule; `field` is the dotted name of the field to change.
    """
    from pixel_reasoner_jax import config_rules  # imported here: config_rules imports this module

    config_rules.validate(cfg, num_devices)
