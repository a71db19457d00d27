"""The server's model side: Backend (a Policy + tokenizer + weight loading), weight-folder checks, JaxBackend.

The HTTP layer (serve/http.py) talks only to these and to serve/batching.py; JaxBackend wires in the
project's JAX sampler.
"""

import abc
import importlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.rollout.policy import Policy
from pixel_reasoner_jax.serve.spec import ModelSpec

# The CLI's default --backend: the project's JAX model.
DEFAULT_BACKEND = "pixel_reasoner_jax.serve.backend:jax_backend"

# ----------------------------------------------------------------------------------------- backend


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
        # The JAX stack loads only when this backend is built (scripted backends and the launcher skip it).
        from flax import nnx

        from pixel_reasoner_jax.models import hf_io
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
