"""The server's model side: Backend (a Policy + tokenizer + weight loading), weight-folder checks, batching.

The HTTP layer (rollout/server.py) talks only to these; JaxBackend wires in the project's JAX sampler.
"""

import abc
import collections
import concurrent.futures
import dataclasses
import importlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.policy import FINISH_ABORT, GenerationRequest, GenerationResult, Policy

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- backend


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the server needs to know about the served model besides its Policy.

    Attributes:
      model_path: folder the current weights came from (updated by /update_weights_from_disk).
      context_length: prompt (expanded) + new tokens must stay below it.
      image: resize bounds and patch sizes; images are resized into them as SGLang does.
      image_token_id, video_token_id: the single pads of the request form.
      eos_token_ids: always stop ids unless a request sets ignore_eos.
      served_model_name, tokenizer_path: echoed by /get_model_info.
    """

    model_path: str
    context_length: int
    image: ImageProcessorConfig = ImageProcessorConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    eos_token_ids: tuple[int, ...] = (151645, 151643)
    served_model_name: str = ""
    tokenizer_path: str = ""

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | os.PathLike, context_length: int | None = None) -> "ModelSpec":
        """Token ids and context from config.json, eos ids from generation_config.json, image bounds from
        preprocessor_config.json (Hub defaults when the file is absent)."""
        from pixel_reasoner_jax.models.config import ModelConfig

        ckpt = os.fspath(ckpt_dir)
        cfg = ModelConfig.from_pretrained(ckpt)
        eos = [cfg.eos_token_id]
        gen_path = Path(ckpt) / "generation_config.json"
        if gen_path.is_file():
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
            eos += gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        try:
            image = ImageProcessorConfig.from_pretrained(ckpt)
        except FileNotFoundError:
            image = ImageProcessorConfig()
        return cls(
            model_path=ckpt,
            context_length=int(context_length or cfg.text.max_position_embeddings),
            image=image,
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos)),
            served_model_name=os.path.basename(ckpt.rstrip("/")),
            tokenizer_path=ckpt,
        )


class Backend(abc.ABC):
    """The model behind the server: a Policy, its tokenizer, and a way to load new weights from disk."""

    @property
    @abc.abstractmethod
    def spec(self) -> ModelSpec:
        """Static facts about the model (see ModelSpec)."""

    @property
    @abc.abstractmethod
    def policy(self) -> Policy:
        """Generates; its weight_version labels every response."""

    @property
    def tokenizer(self):
        """An object with `decode(ids, skip_special_tokens=...)` and `encode(text)`, or None (no `text`)."""
        return None

    @abc.abstractmethod
    def load(self, model_path: str, version: str) -> None:
        """Loads the HF folder completely, validates it, then swaps it in and sets the policy's version.

        Must leave the old weights serving if it raises. The server has already checked that the folder is
        complete (config.json, safetensors, index) before calling this.
        """

    def flush_cache(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Drops any prefix cache; the default backend has none."""


BackendFactory = Callable[[str, str], Backend]


class WeightsFolderError(ValueError):
    """A weights folder that is missing, still being written, or incomplete."""


def check_weights_folder(path: str) -> None:
    """Cheap completeness checks run before any weight is read.

    Rejects: a missing folder, a temporary name (`.tmp` in it: a writer has not renamed it yet), no
    config.json or an unparsable one, no *.safetensors, an index naming files that are absent, and a
    safetensors file shorter than its own header says (still being written).

    Raises:
      WeightsFolderError: naming the folder and what is wrong.
    """
    p = Path(path)
    if not p.is_dir():
        raise WeightsFolderError(f"model_path {path!r} is not a directory")
    if ".tmp" in p.name:
        raise WeightsFolderError(
            f"model_path {path!r} has a temporary name (still being written); rename it first"
        )
    config = p / "config.json"
    if not config.is_file():
        raise WeightsFolderError(
            f"model_path {path!r} has no config.json (incomplete or still being written)"
        )
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsFolderError(f"{config} is not valid JSON: {e}") from e
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsFolderError(f"{index} is not a safetensors index with a weight_map: {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (p / f).is_file()]
        if missing:
            raise WeightsFolderError(f"{index} names files that are absent: {missing}")
    else:
        files = sorted(f.name for f in p.glob("*.safetensors"))
    if not files:
        raise WeightsFolderError(f"model_path {path!r} has no *.safetensors files")
    for name in files:
        _check_safetensors_complete(p / name)


def _check_safetensors_complete(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsFolderError(f"{path} is {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise WeightsFolderError(f"{path} is truncated: header says {n} header bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsFolderError(f"{path} has a corrupt safetensors header: {e}") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsFolderError(f"{path} is truncated: tensors need {8 + n + end} bytes, file has {size}")


# ----------------------------------------------------------------------------------------- batching


PAUSE_MODES = ("abort", "retract", "in_place")


class DuplicateRequestError(ValueError):
    """A request reuses the rid of one still queued or running (SGLang answers 400)."""


@dataclasses.dataclass(eq=False)
class Job:
    """One sample in the queue; `future` resolves to its GenerationResult."""

    request: GenerationRequest
    rid: str
    prompt_tokens: int
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    abort_message: str | None = None
    retracted: bool = False  # paused with mode "retract" while running: queued again, result discarded


class BatchWorker:
    """Collects concurrent jobs into batches (up to max_batch, within a short wait) for one policy call.

    Each job has its own future, so concurrent HTTP requests never see each other's results. A batch runs
    under `model_lock`, which weight updates also take: an update waits for the running batch, and batches
    wait for the update.
    """

    def __init__(self, get_policy: Callable[[], Policy], max_batch: int, wait_s: float, model_lock):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._get_policy = get_policy
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.model_lock = model_lock
        self._cv = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._paused = False
        self._stopped = False
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._loop, name="batch-worker", daemon=True)
        self._thread.start()

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queues the jobs; raises DuplicateRequestError when a rid is already queued or running."""
        with self._cv:
            active = {j.rid for j in self._queue} | {j.rid for j in self._running}
            rids = [j.rid for j in jobs]
            dup = sorted({r for r in rids if r in active or rids.count(r) > 1})
            if dup:
                raise DuplicateRequestError(f"Duplicate request ID detected: {dup[0]}")
            if self._stopped:
                for j in jobs:
                    self._abort(j, "server is shutting down")
                return
            self._queue.extend(jobs)
            self._cv.notify_all()

    def busy(self) -> bool:
        with self._cv:
            return bool(self._queue or self._running)

    def abort(self, message: str, rids: set[str] | None = None) -> int:
        """Aborts queued jobs now and marks running ones (their results are discarded); None = all."""
        with self._cv:
            hit = [j for j in self._queue if rids is None or j.rid in rids]
            for j in hit:
                self._queue.remove(j)
                self._abort(j, message)
            running = [j for j in self._running if rids is None or j.rid in rids]
            for j in running:
                j.abort_message = message
            return len(hit) + len(running)

    def pause(self, mode: str = "abort") -> int:
        """Stops taking batches. SGLang's modes (reference/sglang.md §12): "abort" aborts queued and
        running requests; "retract" puts running requests back at the head of the queue (their current
        batch's results are discarded, they run again after /continue_generation); "in_place" lets the
        running batch finish and holds the queue. Returns how many requests were aborted or retracted."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode must be one of {PAUSE_MODES}, got {mode!r}")
        with self._cv:
            self._paused = True
            if mode == "retract":
                for j in self._running:
                    j.retracted = True
                return len(self._running)
        return self.abort("aborted by /pause_generation") if mode == "abort" else 0

    def active_rids(self) -> set[str]:
        """Rids of queued and running requests (SGLang rejects a new request that reuses one)."""
        with self._cv:
            return {j.rid for j in self._queue} | {j.rid for j in self._running}

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def stop(self, timeout: float = 30.0) -> None:
        """Aborts queued jobs, lets the running batch finish, and ends the thread."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self.abort("server is shutting down")
        self._thread.join(timeout)

    def _abort(self, job: Job, message: str) -> None:
        job.abort_message = message
        if not job.future.done():
            job.future.set_result(
                GenerationResult(
                    (), (), FINISH_ABORT, None, self._get_policy().weight_version, job.prompt_tokens
                )
            )

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (self._paused or not self._queue):
                    self._cv.wait()
                if self._stopped:
                    return
                # A short window lets requests that arrive together share one policy call.
                deadline = time.monotonic() + self.wait_s
                while len(self._queue) < self.max_batch and not self._stopped and not self._paused:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._stopped or self._paused or not self._queue:
                    continue
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                self._running = batch
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        try:
            with self.model_lock:
                live = [j for j in batch if j.abort_message is None]
                results = self._get_policy().generate([j.request for j in live]) if live else []
                if len(results) != len(live):
                    raise RuntimeError(f"policy returned {len(results)} results for {len(live)} requests")
                self.batch_sizes.append(len(live))
        except Exception as e:  # noqa: BLE001 - reported to each waiting request, logged here
            logger.exception("policy.generate failed on a batch of %d", len(batch))
            with self._cv:
                self._running = []
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        with self._cv:
            self._running = []
            by_job = dict(zip(live, results))
            retracted = [j for j in batch if j.retracted and j.abort_message is None]
            for j in reversed(retracted):
                j.retracted = False
                self._queue.appendleft(j)
            for j in batch:
                if j.abort_message is not None:
                    self._abort(j, j.abort_message)
                elif j not in retracted:
                    j.future.set_result(by_job[j])


# ------------------------------------------------------------------------------------- JAX backend


class JaxBackend(Backend):
    """The project's JAX model behind the server: JaxSampler (rollout/sampler.py) + hf_io loading."""

    def __init__(
        self,
        checkpoint: str,
        weight_version: str = "0",
        *,
        context_length: int | None = None,
        **sampler_kwargs,
    ):
        from flax import nnx

        from pixel_reasoner_jax.models import hf_io
        from pixel_reasoner_jax.models.config import ModelConfig
        from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
        from pixel_reasoner_jax.rollout.sampler import JaxSampler

        self._hf_io = hf_io
        self._spec = ModelSpec.from_checkpoint(checkpoint, context_length)
        self._cfg = ModelConfig.from_pretrained(checkpoint)
        model = hf_io.load_model(checkpoint)
        self._sampler = JaxSampler(model, self._cfg, self._spec.image, **sampler_kwargs)
        if self._sampler.weight_version != weight_version:
            self._sampler.update_weights(nnx.state(model, nnx.Param), weight_version)
        self._tokenizer = QwenTokenizer.from_pretrained(checkpoint)

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def policy(self) -> Policy:
        return self._sampler

    @property
    def tokenizer(self):
        return self._tokenizer

    def load(self, model_path: str, version: str) -> None:
        from pixel_reasoner_jax.models.config import ModelConfig

        cfg = ModelConfig.from_pretrained(model_path)
        if cfg != self._cfg:
            raise ValueError(f"{model_path} holds a different architecture than the served model")
        # Reads and shape-checks every tensor before the sampler sees any of them.
        params = self._hf_io.load_hf_params(model_path, cfg)
        self._sampler.update_weights(params, version)


def jax_backend(checkpoint: str, weight_version: str = "0") -> Backend:
    """Default backend factory of the CLI."""
    return JaxBackend(checkpoint, weight_version)


def resolve_factory(spec: str) -> BackendFactory:
    """`package.module:callable` -> the callable (the CLI's --backend)."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"--backend must look like 'package.module:factory', got {spec!r}")
    return getattr(importlib.import_module(mod), attr)
