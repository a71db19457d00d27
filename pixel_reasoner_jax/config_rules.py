"""Validation rules of the run config: allowed names, value ranges and cross-field constraints.

Tables map dotted field names to rules, so every error names the field to change; entry point `validate`.
"""

import importlib
import urllib.parse
from collections.abc import Callable
from typing import Any

from pixel_reasoner_jax.answers import SCORINGS
from pixel_reasoner_jax.config import (
    BACKENDS,
    BENCHMARKS,
    CROP_PADDINGS,
    DTYPES,
    FILTERS,
    LOGPROB_TEMPERATURES,
    MODES,
    PROMPT_STYLES,
    SCHEDULES,
    SFT_LOSS_MASKS,
    SYNTHETIC_FAMILIES,
    TEMPLATES,
    TINY_INITS,
    TINY_SIZES,
    VARIANTS,
    WARM_START_SCHEDULES,
    ConfigError,
    RunConfig,
    mesh_shape,
    rollout_mesh_shape,
)
from pixel_reasoner_jax.hostmem import HOST_MALLOC
from pixel_reasoner_jax.models.layers import ATTENTION_IMPLS, LAYER_LOOPS, REMAT_POLICIES, WEIGHT_GRADS
from pixel_reasoner_jax.tools.ops import VIDEO_CROP_INDEXES  # the owner of the numbering choice

# Names of the train/ registries, used only when those modules are absent (they are the source of truth).
_FALLBACK_REGISTRIES = {
    "grpo.advantage": ("advantages", "ADVANTAGES", ("grpo", "mean", "rloo")),
    "grpo.loss_agg": (
        "losses",
        "LOSS_AGG",
        ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
    ),
    "reward.form": ("rewards", "REWARD_SHAPERS", ("paper", "code")),
}


def _get(cfg: RunConfig, field: str) -> Any:
    value = cfg
    for part in field.split("."):
        value = getattr(value, part)
    return value


def _registry_names() -> dict[str, tuple[str, ...]]:
    """Names of the train/ registries; a local copy only when the module itself does not exist yet."""
    names = {}
    for field, (module, attr, fallback) in _FALLBACK_REGISTRIES.items():
        full = f"pixel_reasoner_jax.train.{module}"
        try:
            names[field] = tuple(getattr(importlib.import_module(full), attr))
        except ModuleNotFoundError as e:
            if e.name != full:  # a broken dependency inside the module must surface, not be masked
                raise
            names[field] = fallback
    return names


_CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "variant": VARIANTS,
    "host_malloc": HOST_MALLOC,
    "model.dtype": DTYPES,
    "model.param_dtype": DTYPES,
    "model.remat": REMAT_POLICIES,
    "model.vision_remat": ("same", *REMAT_POLICIES),
    "model.attention": ATTENTION_IMPLS,
    "model.layer_loop": LAYER_LOOPS,
    "model.weight_grad": WEIGHT_GRADS,
    "data.sft_loss_mask": SFT_LOSS_MASKS,
    "data.synthetic_family": SYNTHETIC_FAMILIES,
    "model.tiny_size": TINY_SIZES,
    "model.tiny_init": TINY_INITS,
    "optim.schedule": SCHEDULES,
    "rollout.backend": BACKENDS,
    "rollout.template": TEMPLATES,
    "rollout.prompt_style": PROMPT_STYLES,
    "rollout.crop_padding": CROP_PADDINGS,
    "rollout.sampler_param_dtype": DTYPES,
    "rollout.video_crop_index": VIDEO_CROP_INDEXES,
    "grpo.filter": FILTERS,
    "grpo.warm_start_schedule": WARM_START_SCHEDULES,
    "grpo.logprob_temperature": LOGPROB_TEMPERATURES,
    "reward.scoring": tuple(SCORINGS),
    "eval.scoring": tuple(SCORINGS),
}

_pos = (lambda v: v > 0, "must be > 0")
_nonneg = (lambda v: v >= 0, "must be >= 0")
_at_least_one = (lambda v: v >= 1, "must be >= 1")
_unit_open = (lambda v: 0 < v < 1, "must be in (0, 1)")
_unit_closed = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
_beta = (lambda v: 0 <= v < 1, "must be in [0, 1)")


def _unset_or(rule: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    ok, what = rule
    return (lambda v: v is None or ok(v)), f"{what} (or unset)"


# Single-field range rules: field -> (predicate, what it must be).
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _nonneg,
    "model.logprob_chunk": _pos,
    "model.logprob_bucket_steps": _at_least_one,
    "mesh.rollout_tensor": _at_least_one,
    "data.seed": _nonneg,
    "data.num_sft": _pos,
    "data.num_rl": _pos,
    "data.num_eval": _pos,
    "data.image_size": (lambda v: v >= 56, "must be >= 56 px (two merged 28-px tokens)"),
    "data.synthetic_seed": _nonneg,
    "data.num_video_frames": _at_least_one,
    "data.video_frame_max_pixels": _pos,
    "data.sft_video_frame_max_pixels": _pos,
    "data.max_seq_len": _pos,
    "data.num_workers": _nonneg,
    "optim.lr": _pos,
    "optim.warmup_ratio": _unit_closed,
    "optim.min_lr_ratio": _unit_closed,
    "optim.weight_decay": _nonneg,
    "optim.b1": _beta,
    "optim.b2": _beta,
    "optim.eps": _pos,
    "optim.grad_clip": _nonneg,
    "sft.batch_size": _pos,
    "sft.micro_batches": _pos,
    "sft.epochs": _at_least_one,
    "sft.checkpoint_every": _nonneg,
    "sft.keep_checkpoints": _at_least_one,
    "rollout.temperature": _pos,
    "rollout.temperature_after_tool": _pos,
    "rollout.top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "rollout.top_k": (lambda v: v == -1 or v > 0, "must be -1 (off) or > 0"),
    "rollout.max_new_tokens": _pos,
    "rollout.prompt_max_len": _pos,
    "rollout.max_total_tokens": _pos,
    "rollout.max_tool_calls": _nonneg,
    "rollout.max_images": _at_least_one,
    "rollout.max_frames": _at_least_one,
    "rollout.min_crop_side": _nonneg,
    "rollout.request_timeout_s": _pos,
    "rollout.retries": _nonneg,
    "rollout.server_wait_s": _pos,
    "rollout.health_backoff_s": _pos,
    "rollout.health_max_backoff_s": _pos,
    "rollout.batch_size": _pos,
    "rollout.decode_bucket": _pos,
    "grpo.num_episodes": _at_least_one,
    "grpo.group_size": (lambda v: v >= 2, "must be >= 2 (G: a group needs two samples to compare)"),
    "grpo.prompts_per_rollout": _pos,
    "grpo.train_batch_size": _pos,
    "grpo.micro_batches": _pos,
    "grpo.eps_low": _unit_open,
    "grpo.eps_high": _unit_open,
    "grpo.kl_coef": _nonneg,
    "grpo.warm_start_lr": _nonneg,
    "grpo.entropy_coef": _nonneg,
    "grpo.tis_cap": (
        lambda v: v == 0 or v >= 1,
        "must be 0 (off) or >= 1 (a cap below 1 shrinks every token)",
    ),
    "grpo.uniform_tol": _pos,
    "grpo.replay_capacity": _nonneg,
    "grpo.epochs_per_rollout": _at_least_one,
    "grpo.max_staleness": _nonneg,
    # None takes the reward form's own constant.
    "reward.alpha": _unset_or(_nonneg),
    "reward.H": _unset_or(
        (lambda v: 0 < v <= 1, "must be in (0, 1] (H is a target rate of pixel-space reasoning)")
    ),
    "reward.beta": _unset_or(_nonneg),
    "reward.N": _unset_or(_nonneg),
    "eval.every": _nonneg,
    "eval.temperature": _pos,
    "eval.num_samples": _at_least_one,
    "eval.max_new_tokens": _pos,
    "eval.prompt_max_len": _pos,
    "eval.max_total_tokens": _pos,
    "eval.call_token_limit": _pos,
    "eval.batch_size": _pos,
    "log.every": _at_least_one,
    "log.plots_every": _nonneg,
    "log.checkpoint_every": _nonneg,
    "log.keep_checkpoints": _at_least_one,
    "log.rollouts_every": _nonneg,
    "log.rollout_groups": _at_least_one,
    "log.call_probe": _nonneg,
}

# Pixel ranges (min field, max field): 0 < min <= max.
_PIXEL_RANGES = (
    ("data.image_min_pixels", "data.image_max_pixels"),
    ("data.eval_image_min_pixels", "data.eval_image_max_pixels"),
    ("data.sft_image_min_pixels", "data.sft_image_max_pixels"),
    ("rollout.crop_min_pixels", "rollout.crop_max_pixels"),
    ("rollout.select_min_pixels", "rollout.select_max_pixels"),
    ("rollout.model_min_pixels", "rollout.model_max_pixels"),
    ("eval.crop_min_pixels", "eval.crop_max_pixels"),
    ("eval.model_min_pixels", "eval.model_max_pixels"),
)


def _check_buckets(field: str, buckets: tuple[int, ...], multiple: int, what: str) -> None:
    if not buckets:
        raise ConfigError(field, "must list at least one bucket")
    if any(b <= 0 or b % multiple for b in buckets):
        raise ConfigError(
            field, f"every bucket must be a positive multiple of {multiple} ({what}), got {buckets}"
        )
    if any(a >= b for a, b in zip(buckets, buckets[1:])):
        raise ConfigError(field, f"buckets must be strictly increasing, got {buckets}")


def _check_batch(field: str, batch: int, micro: int, dp: int, batch_field: str) -> None:
    """A batch splits into `micro` equal micro-batches, each sharded over the dp data-parallel devices."""
    if batch % micro:
        raise ConfigError(field, f"{micro} micro-batches must divide {batch_field} = {batch}")
    if (batch // micro) % dp:
        raise ConfigError(
            field,
            f"each micro-batch ({batch_field} {batch} / {micro} = {batch // micro} samples) must divide over "
            f"the {dp} data-parallel devices (mesh data * fsdp)",
        )


def validate(cfg: RunConfig, num_devices: int) -> None:
    """Checks every field and the cross-field rules for a run on `num_devices` devices.

    Raises:
      ConfigError: for the first failing rule; `field` is the dotted name of the field to change.
    """
    choices = {**_CHOICES, **_registry_names()}
    for field, allowed in choices.items():
        value = _get(cfg, field)
        if value not in allowed:
            raise ConfigError(field, f"unknown name {value!r}; expected one of {allowed}")
    for field, (ok, what) in _RANGES.items():
        value = _get(cfg, field)
        if not ok(value):
            raise ConfigError(field, f"{what}, got {value!r}")
    for lo, hi in _PIXEL_RANGES:
        if not 0 < _get(cfg, lo) <= _get(cfg, hi):
            raise ConfigError(lo, f"must satisfy 0 < {lo} <= {hi}, got {_get(cfg, lo)} and {_get(cfg, hi)}")

    if not cfg.workdir:
        raise ConfigError("workdir", "required: pass --workdir=DIR")
    if not cfg.model.checkpoint and cfg.variant != "tiny":
        raise ConfigError(
            "model.checkpoint",
            f"required for variant {cfg.variant!r}: a local HF folder (e.g. {cfg.model.hf_id})",
        )
    data, fsdp, _ = mesh_shape(cfg.mesh, num_devices)
    dp = data * fsdp
    if cfg.rollout.backend == "jax" and cfg.mode != "sft":
        rollout_dp, _ = rollout_mesh_shape(cfg.mesh, num_devices)
        batch_field = "eval.batch_size" if cfg.mode == "eval" else "rollout.batch_size"
        if _get(cfg, batch_field) % rollout_dp:
            raise ConfigError(
                batch_field,
                f"must divide over the sampler's {rollout_dp} data-parallel devices, got {_get(cfg, batch_field)}",
            )
    _validate_data(cfg)
    _validate_rollout(cfg)
    _validate_training(cfg, dp)
    benchmarks = cfg.eval.benchmark_names
    if not benchmarks or any(b not in BENCHMARKS for b in benchmarks):
        raise ConfigError(
            "eval.benchmarks",
            f"expected comma-separated names from {BENCHMARKS}, got {cfg.eval.benchmarks!r}",
        )
    _validate_eval(cfg)
    if cfg.eval.greedy and cfg.eval.num_samples != 1:
        raise ConfigError(
            "eval.num_samples", f"greedy decoding repeats one sample; got {cfg.eval.num_samples}"
        )


def _validate_data(cfg: RunConfig) -> None:
    d = cfg.data
    if d.synthetic:
        # The generated folder replaces every data path: an explicit one would be silently ignored.
        for field in ("data.sft_path", "data.rl_path", "data.eval_path", "data.data_root"):
            if _get(cfg, field):
                raise ConfigError(
                    field,
                    f"{_get(cfg, field)!r} conflicts with data.synthetic=True, which would replace it with "
                    "generated data; add --config.data.synthetic=False to read it",
                )
    else:
        needed = {"sft": ["data.sft_path"], "grpo": ["data.rl_path"], "eval": ["data.eval_path"]}[cfg.mode]
        if cfg.mode == "grpo" and cfg.sft.steps > 0:
            needed.append("data.sft_path")
        if cfg.mode == "grpo" and cfg.eval.every > 0:
            needed.append("data.eval_path")
        for field in needed:
            if not _get(cfg, field):
                raise ConfigError(field, f"required in {cfg.mode} mode unless data.synthetic is True")
    _check_buckets("data.seq_buckets", d.seq_buckets, cfg.model.logprob_chunk, "model.logprob_chunk")
    if d.seq_buckets[-1] != d.max_seq_len:
        raise ConfigError(
            "data.seq_buckets", f"the largest bucket must equal data.max_seq_len = {d.max_seq_len}"
        )
    # Patches merge 2 x 2 into one token, so a patch count must be a multiple of 4.
    _check_buckets("data.patch_buckets", d.patch_buckets, 4, "2 x 2 patch merging")


def _validate_rollout(cfg: RunConfig) -> None:
    r = cfg.rollout
    try:
        urls = r.urls
    except OSError as e:
        raise ConfigError("rollout.sglang_urls", f"cannot read the URL file: {e}") from None
    if r.backend == "sglang" and not (urls or r.launch_local_server):
        raise ConfigError(
            "rollout.sglang_urls", "backend 'sglang' needs server URLs or rollout.launch_local_server=True"
        )
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("rollout.sglang_urls", f"expected http(s)://host:port, got {url!r}")
    if len({u.rstrip("/") for u in urls}) != len(urls):
        raise ConfigError("rollout.sglang_urls", f"a server is listed twice: {list(urls)}")
    if r.health_max_backoff_s < r.health_backoff_s:
        raise ConfigError(
            "rollout.health_max_backoff_s",
            f"must be >= rollout.health_backoff_s = {r.health_backoff_s}, got {r.health_max_backoff_s}",
        )
    if r.prompt_max_len + r.max_new_tokens > r.max_total_tokens:
        raise ConfigError(
            "rollout.max_total_tokens",
            f"must hold a full prompt and one turn: prompt_max_len {r.prompt_max_len} + max_new_tokens "
            f"{r.max_new_tokens} > {r.max_total_tokens}",
        )
    if r.max_total_tokens > cfg.data.max_seq_len:
        raise ConfigError(
            "rollout.max_total_tokens",
            f"an episode of {r.max_total_tokens} tokens does not fit data.max_seq_len = {cfg.data.max_seq_len}",
        )


def _validate_eval(cfg: RunConfig) -> None:
    e = cfg.eval
    if e.prompt_max_len + e.max_new_tokens > e.max_total_tokens:
        raise ConfigError(
            "eval.max_total_tokens",
            f"must hold a full prompt and one turn: prompt_max_len {e.prompt_max_len} + max_new_tokens "
            f"{e.max_new_tokens} > {e.max_total_tokens}",
        )
    if e.call_token_limit > e.max_total_tokens:
        raise ConfigError(
            "eval.call_token_limit",
            f"must be <= eval.max_total_tokens = {e.max_total_tokens}, got {e.call_token_limit}",
        )
    if cfg.mode == "eval" and cfg.rollout.backend == "jax" and e.max_total_tokens > cfg.data.seq_buckets[-1]:
        raise ConfigError(
            "eval.max_total_tokens",
            f"the in-process sampler's largest sequence bucket (data.seq_buckets) is {cfg.data.seq_buckets[-1]}; "
            f"raise data.max_seq_len and data.seq_buckets or lower this, got {e.max_total_tokens}",
        )


def _validate_training(cfg: RunConfig, dp: int) -> None:
    s, g = cfg.sft, cfg.grpo
    if cfg.mode == "sft" and not (s.steps == -1 or s.steps > 0):
        raise ConfigError("sft.steps", f"must be -1 (from sft.epochs) or > 0 in sft mode, got {s.steps}")
    if cfg.mode == "grpo" and s.steps < 0:
        raise ConfigError("sft.steps", f"warm-start steps must be >= 0 in grpo mode, got {s.steps}")
    if cfg.mode == "sft" or (cfg.mode == "grpo" and s.steps > 0):
        _check_batch("sft.micro_batches", s.batch_size, s.micro_batches, dp, "sft.batch_size")
    if cfg.mode != "grpo":
        return
    if not (g.steps == -1 or g.steps > 0):
        raise ConfigError("grpo.steps", f"must be -1 (from grpo.num_episodes) or > 0, got {g.steps}")
    if g.train_batch_size % g.group_size:
        raise ConfigError(
            "grpo.train_batch_size",
            f"must be a multiple of grpo.group_size G = {g.group_size}, got {g.train_batch_size}",
        )
    if g.trained_per_rollout % g.train_batch_size:
        half = " // 2 (SSR trains on half the rollout batch)" if g.filter == "ssr" else ""
        raise ConfigError(
            "grpo.prompts_per_rollout",
            f"prompts_per_rollout * G = {g.samples_per_rollout}{half} must be a multiple of "
            f"grpo.train_batch_size = {g.train_batch_size}",
        )
    _check_batch("grpo.micro_batches", g.train_batch_size, g.micro_batches, dp, "grpo.train_batch_size")
    if g.filter == "ssr" and 0 < g.replay_capacity < g.train_batch_size:
        raise ConfigError(
            "grpo.replay_capacity",
            f"must be 0 (the rollout batch) or hold at least one batch ({g.train_batch_size}), got "
            f"{g.replay_capacity}",
        )
    # Checkpoints land on rollout boundaries, where no half-consumed rollout batch needs saving.
    if cfg.log.checkpoint_every % g.steps_per_rollout:
        raise ConfigError(
            "log.checkpoint_every",
            f"must be a multiple of the {g.steps_per_rollout} optimizer steps per rollout, got {cfg.log.checkpoint_every}",
        )
