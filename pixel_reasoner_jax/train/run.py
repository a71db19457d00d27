"""What the SFT and GRPO loops share: mesh, model and train state (fresh or restored), checkpoints, metrics,
the per-step sample log, and the final Hugging Face export.

`RunContext.open` is the one place a run decides between a fresh start and a resume from its last checkpoint.
"""

import dataclasses
import json
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.config import RunConfig, mesh_shape
from pixel_reasoner_jax.metrics import MetricsWriter, progress, read_metrics
from pixel_reasoner_jax.models import hf_io
from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.models.qwen25vl import Qwen25VL
from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.train import state as st
from pixel_reasoner_jax.train.checkpoint import Checkpointer

CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "hf_export"
SAMPLES_FILE = "samples.jsonl"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def host(x) -> np.ndarray:
    """A NumPy copy of a replicated (or fully addressable) array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


def scalars(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """`{prefix/key: float}` of a step's (device) scalar metrics, fetched once."""
    fetched = jax.device_get({k: host(v) for k, v in metrics.items()})
    return {f"{prefix}/{k}": float(v) for k, v in fetched.items()}


class SampleLog:
    """`workdir/samples.jsonl`: one line per loop step naming the records it used (the data order a person
    or a resume test can compare); lines after the restored step are dropped, as MetricsWriter does."""

    def __init__(self, workdir: pathlib.Path, enabled: bool, resume_step: int):
        self.path = workdir / SAMPLES_FILE
        self.enabled = enabled
        if not enabled:
            return
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)

    def write(self, step: int, phase: str, qids: list[str], **fields: Any) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "phase": phase, "qids": list(qids), **fields}) + "\n")


def read_samples(workdir: str | os.PathLike) -> list[dict]:
    """The rows of `workdir/samples.jsonl` (empty when absent)."""
    return read_metrics(pathlib.Path(workdir) / SAMPLES_FILE)


def _model_kwargs(cfg: RunConfig) -> dict[str, Any]:
    m = cfg.model
    return dict(
        dtype=_DTYPES[m.dtype],
        param_dtype=_DTYPES[m.param_dtype],
        remat=m.remat,
        vision_remat=m.vision_remat,
        attention=m.attention,
        layer_loop=m.layer_loop,
        weight_grad=m.weight_grad,
    )


def optim_config(cfg: RunConfig, total_steps: int) -> st.OptimConfig:
    """The optimizer settings of a run of `total_steps` updates; in grpo mode with `grpo.warm_start_lr > 0`
    the `sft.steps` warm-start updates are the schedule's prefix (`grpo.warm_start_schedule`)."""
    o = cfg.optim
    prefix = cfg.sft.steps if cfg.mode == "grpo" and cfg.grpo.warm_start_lr > 0 else 0
    return st.OptimConfig(
        lr=o.lr,
        total_steps=max(1, total_steps),
        warmup_ratio=min(o.warmup_ratio, 0.999),  # the config allows 1.0; the schedule needs < 1
        schedule=o.schedule,
        min_lr_ratio=o.min_lr_ratio,
        weight_decay=o.weight_decay,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        grad_clip=o.grad_clip,
        prefix_steps=min(prefix, max(1, total_steps) - 1),
        prefix_lr=cfg.grpo.warm_start_lr,
        prefix_schedule=cfg.grpo.warm_start_schedule,
    )


@dataclasses.dataclass
class RunContext:
    """A run's shared objects; `state` is replaced by every step, `start_step` is the restored loop step.

    Attributes:
      start_step: loop step of the restored checkpoint (0 for a fresh run). Loop steps number the metric
        and sample-log lines; checkpoints and the LR schedule count optimizer steps (`state.step`). The two
        are equal unless GRPO skipped steps for want of an informative sample: a GRPO checkpoint keeps its
        loop step in extra["loop_step"].
      extra: the restored checkpoint's JSON extra ({} for a fresh run).
      restored_step: the restored checkpoint's step (None for a fresh run); its NumPy arrays item (the
        replay buffer) is `checkpointer.arrays(restored_step)`.
    """

    cfg: RunConfig
    workdir: pathlib.Path
    mesh: jax.sharding.Mesh
    model_cfg: ModelConfig
    tokenizer: QwenTokenizer
    image_cfg: ImageProcessorConfig
    graphdef: Any
    state: st.TrainState
    shardings: st.TrainState
    optimizer: Any
    schedule: Any
    frozen: Any
    checkpointer: Checkpointer
    writer: MetricsWriter
    samples: SampleLog
    extra: dict
    start_step: int
    is_main: bool
    restored_step: int | None = None

    @classmethod
    def open(cls, cfg: RunConfig, total_steps: int, *, keep: int) -> "RunContext":
        """Builds the mesh and optimizer, then restores the latest checkpoint of `workdir/checkpoints` or
        loads `cfg.model.checkpoint` into a fresh state.

        Args:
          total_steps: optimizer steps of the whole run (the LR schedule's length).
          keep: checkpoints kept on disk.
        """
        workdir = pathlib.Path(cfg.workdir)
        ckpt_dir = cfg.model.checkpoint
        mesh = sharding.make_mesh(*mesh_shape(cfg.mesh, jax.device_count()))
        model_cfg = ModelConfig.from_pretrained(ckpt_dir)
        frozen = st.freeze_prefixes(st.VISION_TOWER) if cfg.model.freeze_vision else None
        ocfg = optim_config(cfg, total_steps)
        optimizer = st.make_optimizer(ocfg, frozen)
        checkpointer = Checkpointer(workdir / CHECKPOINT_DIR, max_to_keep=keep, async_save=True)
        latest = checkpointer.latest_step()
        kw = _model_kwargs(cfg)
        t0 = time.perf_counter()
        if latest is None:
            with sharding.use_mesh(mesh, "train"):
                model = hf_io.load_model(ckpt_dir, mesh=mesh, rules="train", **kw)
            graphdef, state, shardings = st.create_train_state(model, optimizer, mesh, "train", seed=cfg.seed)
            extra = {}
            logging.info("fresh start from %s (%.1f s)", ckpt_dir, time.perf_counter() - t0)
        else:
            graphdef, abstract, shardings = st.abstract_train_state(
                lambda: Qwen25VL(model_cfg, rngs=nnx.Rngs(0), **kw), optimizer, mesh, "train", seed=cfg.seed
            )
            state, extra = checkpointer.restore(latest, abstract)
            logging.info(
                "resumed from step %d of %s (%.1f s)",
                latest,
                checkpointer.directory,
                time.perf_counter() - t0,
            )
        is_main = jax.process_index() == 0
        start = 0 if latest is None else int(extra.get("loop_step", latest))
        writer = MetricsWriter(workdir, enabled=is_main, tensorboard=cfg.log.tensorboard, resume_step=start)
        base_image = ImageProcessorConfig.from_pretrained(ckpt_dir)
        return cls(
            cfg=cfg,
            workdir=workdir,
            mesh=mesh,
            model_cfg=model_cfg,
            tokenizer=QwenTokenizer.from_pretrained(ckpt_dir),
            image_cfg=base_image,
            graphdef=graphdef,
            state=state,
            shardings=shardings,
            optimizer=optimizer,
            schedule=st.make_schedule(ocfg),
            frozen=frozen,
            checkpointer=checkpointer,
            writer=writer,
            samples=SampleLog(workdir, is_main, start),
            extra=extra,
            start_step=start,
            is_main=is_main,
            restored_step=latest,
        )

    def load_params(self, folder: str | os.PathLike) -> Any:
        """The parameters of the Hugging Face folder `folder`, placed like the train state's (e.g. a frozen
        reference policy)."""
        with sharding.use_mesh(self.mesh, "train"):
            model = hf_io.load_model(folder, mesh=self.mesh, rules="train", **_model_kwargs(self.cfg))
        leaves = jax.tree.leaves(nnx.split(model, nnx.Param, ...)[1])
        shardings = jax.tree.leaves(self.shardings.params)
        want = [(x.shape, x.dtype) for x in jax.tree.leaves(self.state.params)]
        if [(x.shape, x.dtype) for x in leaves] != want:
            raise ValueError(f"the parameters of {folder} differ in shape or dtype from the train state's")
        # The state's own tree (a restored state's Variables carry other metadata than a loaded model's),
        # so the jitted steps see one structure and compile once.
        placed = [jax.device_put(x, s) for x, s in zip(leaves, shardings)]
        return jax.tree.unflatten(jax.tree.structure(self.state.params), placed)

    def processor(self, min_pixels: int, max_pixels: int) -> ImageProcessorConfig:
        """The checkpoint's processor (patch sizes, normalisation) with the given resize bounds."""
        return dataclasses.replace(self.image_cfg, min_pixels=min_pixels, max_pixels=max_pixels)

    def progress(self, total: int, desc: str):
        return progress(total, desc, initial=self.start_step, enabled=self.is_main and self.cfg.log.progress)

    def save(self, step: int, extra: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Checkpoints the state as optimizer step `step` with `extra` (iterator, RNG, replay state) and the
        NumPy `arrays` (the replay buffer's samples)."""
        if step in self.checkpointer.all_steps():
            # A resumed run re-reaching its restored step has nothing new to save; GRPO steps skipped since
            # that save are not saved over it (an interrupted save would lose the step) but rerun exactly.
            return
        self.checkpointer.save(step, self.state, extra, arrays=arrays, force=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step % self.cfg.log.every == 0:
            self.writer.write(step, metrics)
        if self.cfg.log.plots_every and step % self.cfg.log.plots_every == 0:
            self.writer.plot()

    def export(self) -> pathlib.Path:
        """Writes the current policy as a Hugging Face folder `workdir/hf_export` (atomic replace)."""
        out = hf_io.export_hf(
            self.state.params,
            self.model_cfg,
            self.workdir / EXPORT_DIR,
            extra_files_from=self.cfg.model.checkpoint,
        )
        return pathlib.Path(out)

    def close(self) -> None:
        """Waits for the last checkpoint, renders the plots and closes the writers."""
        self.checkpointer.close()
        self.writer.plot()
        self.writer.close()
