"""Entry point: `python -m pixel_reasoner_jax.main --config=configs/grpo.py:tiny [--workdir DIR]`.

Owns the run's start: config -> frozen RunConfig -> validation, jax.distributed, generated tiny assets, dispatch.
"""

import dataclasses
import os
import pathlib
import shutil
import sys
import uuid

from absl import app, flags, logging
from ml_collections import config_flags

from pixel_reasoner_jax import hostmem
from pixel_reasoner_jax.config import ConfigError, RunConfig, from_config_dict, validate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "run config file[:variant], e.g. configs/grpo.py:tiny"
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "run folder; default runs/<mode>_<variant>, so the same command resumes the same run"
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator",
    os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "host:port of the jax.distributed coordinator (env JAX_COORDINATOR_ADDRESS); 'auto' = JAX detects the "
    "cluster (Cloud TPU pod slice, SLURM, Open MPI); unset = one process",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None, "processes of a multi-host run"
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ.get("JAX_PROCESS_ID", "-1")) if "JAX_PROCESS_ID" in os.environ else None,
    "this process's index in a multi-host run",
)  # fmt: skip

TINY_CKPT_DIR = "tiny_ckpt"
SYNTHETIC_DIR = "synthetic"
EXIT_CONFIG = 2
AUTO_COORDINATOR = "auto"
# Programs that compile faster than this are not written to the persistent cache. JAX's default (1 s)
# skips most programs of a CPU run, whose many small programs take 0.1-1 s each and add up to most of
# a tiny run's compile time; reading an entry back takes milliseconds.
CACHE_MIN_COMPILE_S = 0.1


def default_workdir(mode: str, variant: str) -> str:
    """runs/<mode>_<variant>: deterministic, so rerunning the same command resumes the same run."""
    return os.path.join("runs", f"{mode}_{variant}")


def build_config(config_dict, workdir_flag: str | None) -> RunConfig:
    """The frozen RunConfig with the workdir resolved (flag > config.workdir > default), not yet validated.

    Raises:
      ConfigError: a key is unknown or missing, or a value has the wrong type.
    """
    cfg = from_config_dict(config_dict)
    workdir = workdir_flag or cfg.workdir or default_workdir(cfg.mode, cfg.variant)
    return dataclasses.replace(cfg, workdir=os.path.abspath(workdir))


def _atomic_dir(final: pathlib.Path, write) -> None:
    """Runs `write(tmp)` into a sibling temp folder, then renames it to `final`: a kill leaves no half folder."""
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_assets(cfg: RunConfig) -> RunConfig:
    """Generates what the config asks for under the workdir when absent (process 0 writes, others wait):
    the tiny checkpoint (variant tiny without model.checkpoint) and the synthetic data (data.synthetic).

    Returns the config with model.checkpoint and the data paths pointing at them.
    """
    import jax

    from pixel_reasoner_jax import distributed  # imports jax, which this module loads only at run time

    workdir = pathlib.Path(cfg.workdir)
    main_process = jax.process_index() == 0
    if main_process:
        workdir.mkdir(parents=True, exist_ok=True)
    model, data = cfg.model, cfg.data
    if not model.checkpoint and cfg.variant == "tiny":
        ckpt = workdir / TINY_CKPT_DIR
        if main_process and not (ckpt / "config.json").is_file():
            from pixel_reasoner_jax.models import tiny

            logging.info("writing the tiny checkpoint to %s", ckpt)
            # export_hf renames into place: atomic
            tiny.write_tiny_checkpoint(
                ckpt, seed=cfg.seed, config=tiny.SIZES[cfg.model.tiny_size], init=cfg.model.tiny_init
            )
        model = dataclasses.replace(model, checkpoint=str(ckpt))
    if data.synthetic:
        root = workdir / SYNTHETIC_DIR
        if main_process and not root.is_dir():
            from pixel_reasoner_jax.data import synthetic

            logging.info("writing synthetic data to %s", root)
            family = dataclasses.replace(
                synthetic.FAMILIES[data.synthetic_family],
                prompt_style=cfg.rollout.prompt_style,
                ops_config=rollout_view_ops(cfg),
            )
            # The JSONL files name media relative to the folder, so it can be renamed after writing.
            _atomic_dir(
                root,
                lambda tmp: synthetic.generate(
                    tmp,
                    num_sft=data.num_sft,
                    num_rl=data.num_rl,
                    num_eval=data.num_eval,
                    image_size=data.image_size,
                    seed=data.synthetic_seed,
                    config=family,
                ),
            )
        data = dataclasses.replace(
            data,
            sft_path=str(root / "sft.jsonl"),
            rl_path=str(root / "rl.jsonl"),
            eval_path=str(root / "eval.jsonl"),
            data_root=str(root),
        )
    distributed.barrier("pixel_reasoner_assets")
    return dataclasses.replace(cfg, model=model, data=data)


def rollout_view_ops(cfg: RunConfig):
    """The visual operations as this run's rollouts execute them: the rollout's crop and select limits,
    clamped into the model's view (`episode.model_view_ops`). Synthetic SFT trajectories call the tools
    with them, so each observation they record ("Here is the cropped image (Image Size: 56x56):") and each
    returned image's size is what the policy meets at rollout time; with the original's limits a tiny run
    trained on "Image Size: 168x168" and garbled its answers after the rollout's "56x56" (measured)."""
    from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
    from pixel_reasoner_jax.rollout.episode import EpisodeConfig, model_view_ops

    r = cfg.rollout
    view = ImageProcessorConfig(min_pixels=r.model_min_pixels, max_pixels=r.model_max_pixels)
    return model_view_ops(EpisodeConfig.from_rollout(r).ops, view)


def setup_compile_cache(cfg: RunConfig) -> str | None:
    """Points JAX's persistent compilation cache at `cfg.compile_cache_dir` ("" = off) and returns the
    folder in use. The environment variable JAX_COMPILATION_CACHE_DIR, when set, wins over the config.

    Call before the first compile: programs compiled earlier are not cached.
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return jax.config.jax_compilation_cache_dir
    if not cfg.compile_cache_dir:
        return None
    path = os.path.abspath(os.path.expanduser(cfg.compile_cache_dir))
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    return path


class CompileStats:
    """Programs this process compiled or loaded from the persistent cache, and the seconds that took
    (JAX's monitoring events); main() logs them at the end so a user sees what a second run saves."""

    BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
    CACHE_HIT = "/jax/compilation_cache/cache_hits"

    def __init__(self):
        self.programs = 0
        self.cache_hits = 0
        self.seconds = 0.0

    def register(self) -> "CompileStats":
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def _on_duration(self, event: str, seconds: float, **_) -> None:
        if event == self.BACKEND_COMPILE:
            self.programs += 1
            self.seconds += seconds

    def _on_event(self, event: str, **_) -> None:
        if event == self.CACHE_HIT:
            self.cache_hits += 1


def _init_distributed() -> None:
    import jax

    if _COORDINATOR.value is None:
        return
    if _COORDINATOR.value == AUTO_COORDINATOR:
        # jax.distributed.initialize falls back to this variable, which would hand it the address "auto".
        os.environ.pop("JAX_COORDINATOR_ADDRESS", None)
        jax.distributed.initialize(num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
        return
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
        raise ConfigError(
            "--num_processes/--process_id",
            f"a multi-host run with coordinator {_COORDINATOR.value} needs both flags (or env "
            "JAX_NUM_PROCESSES / JAX_PROCESS_ID)",
        )
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )


def run(cfg: RunConfig) -> None:
    """Dispatches on cfg.mode: sft, grpo (SFT warm start, then GRPO) or eval (validated, assets prepared)."""
    if cfg.mode == "sft":
        from pixel_reasoner_jax.train import sft

        sft.run(cfg)
    elif cfg.mode == "grpo":
        from pixel_reasoner_jax.train import grpo

        grpo.run(cfg)
    else:
        from pixel_reasoner_jax.eval import run as evaluate

        evaluate.run(cfg)


def _quiet_libraries() -> None:
    """Orbax logs every save and wait at INFO through absl; keep its warnings, drop its chatter."""
    import logging as pylogging

    def keep(record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname

    logging.get_absl_handler().addFilter(keep)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; configure with --config.<section>.<key>=v")
    import jax

    try:
        if _CONFIG.value is None:
            raise ConfigError("config", "required: --config=configs/<mode>.py[:variant]")
        cfg = build_config(_CONFIG.value, _WORKDIR.value)
        # Before the first computation (the backend's threads take their malloc arenas when they start).
        try:
            reuse = hostmem.configure(cfg.host_malloc)
        except ValueError as e:
            raise ConfigError("host_malloc", str(e)) from None
        _init_distributed()
        validate(cfg, jax.device_count())
        if cfg.mode == "grpo":
            from pixel_reasoner_jax.train import grpo

            grpo.check_supported(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    _quiet_libraries()
    cache = setup_compile_cache(cfg)
    stats = CompileStats().register()
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # one process speaks for the run
    logging.info(
        "%s %s run in %s on %d devices (%d processes)",
        cfg.mode, cfg.variant, cfg.workdir, jax.device_count(), jax.process_count(),
    )  # fmt: skip
    logging.info("compilation cache: %s", cache or "off")
    logging.info("malloc: %s", "freed memory kept for reuse (host_malloc)" if reuse else "glibc defaults")
    cfg = prepare_assets(cfg)
    run(cfg)
    logging.info(
        "%d programs compiled or loaded in %.1f s, %d of them from the compilation cache",
        stats.programs, stats.seconds, stats.cache_hits,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    app.run(main)
