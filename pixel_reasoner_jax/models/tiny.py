"""Writes a tiny random Qwen2.5-VL checkpoint folder in the Hugging Face layout (CPU tests, demos).

Weights come from our own model (export_hf, the one name table); tokenizer and processor are the real ones.
"""

import argparse
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from pixel_reasoner_jax.models.config import PRESETS, ModelConfig
from pixel_reasoner_jax.models.hf_io import export_hf, load_hf_params
from pixel_reasoner_jax.models.qwen25vl import Qwen25VL
from pixel_reasoner_jax.processing.tokenizer import ADDED_TOKENS, write_tokenizer_files
from pixel_reasoner_jax.processing.vision import write_processor_files
from pixel_reasoner_jax.sharding import make_mesh, use_mesh

# 56*56: the Hub value (4 visual tokens at least).
TINY_MIN_PIXELS = 56 * 56
# 448*448 = 256*784: at most 16x16 = 256 visual tokens per image, which keeps CPU rollouts with several
# crops per episode in the seconds range, yet is large enough that crops really change the token count.
TINY_MAX_PIXELS = 448 * 448

# Sizes a run can ask for (`model.tiny_size`): "tiny", the tests' model, and "narrow", half as wide with tied
# embeddings: on a CPU a small policy's step is mostly the 151936-word vocabulary projection, which this halves
# (the learning-trap runs of configs/trap.py). "narrow_deep" (the CPU job configs/grpo.py:tiny): as wide, but
# 4 layers, one key/value head per query head and a 128-wide MLP, which cost next to nothing beside that
# projection (~5% per SFT step). With "narrow"'s 2 layers and single 16-wide key/value head (every lookup, the
# asked quarter's words and the crop's colour alike, through one value stream per layer) the warm start's
# circuits came and went between seeds and steps; with "narrow_deep" 4 of 4 runs read 32 of 32 held-out crops
# after 200 warm-start steps and, with the decaying warm-start LR, 2 of 2 bound every box to the asked quarter
# (measured 2026-12-02).
_NARROW_TEXT = dataclasses.replace(
    PRESETS["tiny"].text,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=True,
)
_NARROW_VISION = dataclasses.replace(PRESETS["tiny"].vision, out_hidden_size=32)
SIZES: dict[str, ModelConfig] = {
    "tiny": PRESETS["tiny"],
    "narrow": dataclasses.replace(PRESETS["tiny"], text=_NARROW_TEXT, vision=_NARROW_VISION),
    "narrow_deep": dataclasses.replace(
        PRESETS["tiny"],
        text=dataclasses.replace(
            _NARROW_TEXT, num_hidden_layers=4, num_key_value_heads=2, intermediate_size=128
        ),
        vision=_NARROW_VISION,
    ),
}

# Parameter initialisations a generated checkpoint can have (`model.tiny_init`). "hf": every weight drawn from
# N(0, 0.02), the Hub configs' initializer_range. In a 3584-wide model that keeps a linear layer's gain near
# one (0.02 * sqrt(3584) = 1.2); in a 32-wide one it shrinks each layer's output ~10x, so what the vision
# tower sees reaches the answer position only very weakly. "fan_in": linear (2-D) weights rescaled to
# N(0, 1 / fan_in), the gain the big model has; embeddings, norms, biases and the patch convolution keep
# theirs. With it and the terse prompt the narrow model read the crop's colour after 150 SFT steps
# (measured 2026-12-02).
INITS = ("hf", "fan_in")
HF_INIT_STD = 0.02

GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}


def write_tiny_assets(
    out_dir: str | os.PathLike,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
) -> Path:
    """Writes every non-weight file of a checkpoint folder: tokenizer files, chat template,
    preprocessor_config.json and generation_config.json. Returns the folder."""
    out = write_tokenizer_files(out_dir)
    write_processor_files(out, min_pixels=min_pixels, max_pixels=max_pixels)
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    return out


def write_tiny_checkpoint(
    out_dir: str | os.PathLike, seed: int = 0, config: ModelConfig | None = None, init: str = "hf"
) -> Path:
    """Writes a random-init checkpoint folder loadable by transformers and by `hf_io.load_model`.

    Files: config.json, model.safetensors (Hub tensor names, float32), tokenizer.json,
    tokenizer_config.json, vocab.json, merges.txt, chat_template.json, preprocessor_config.json,
    generation_config.json. An existing folder at `out_dir` is replaced.

    Args:
      out_dir: destination folder.
      seed: parameter initialisation seed (same seed, same weights).
      config: architecture; defaults to PRESETS["tiny"].
      init: one of INITS.

    Raises:
      ValueError: the config's vocabulary does not cover the tokenizer's ids, or an unknown init.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    cfg = (config or PRESETS["tiny"]).validate()
    max_id = max(tid for tid, _, _ in ADDED_TOKENS)
    if cfg.text.vocab_size <= max_id:
        raise ValueError(
            f"config vocab_size {cfg.text.vocab_size} does not cover the tokenizer's ids (need > {max_id})"
        )
    with tempfile.TemporaryDirectory(prefix="tiny_assets_") as staging:
        write_tiny_assets(staging)
        # Parameters carry logical sharding names, so construction needs a mesh; the host build uses one
        # device (export gathers to NumPy anyway).
        with use_mesh(make_mesh(devices=jax.devices()[:1])):
            params = Qwen25VL(cfg, rngs=nnx.Rngs(seed))
        if init == "fan_in":
            # Rescaled in the Hub layout (where every linear weight is 2-D (out, in)) inside the staging
            # folder, then exported once more: the checkpoint folder still appears in one rename.
            drawn = export_hf(params, cfg, os.path.join(staging, "drawn"))
            _rescale_to_fan_in(Path(drawn) / "model.safetensors")
            params = load_hf_params(drawn, cfg)
        out = export_hf(params, cfg, out_dir, extra_files_from=staging)
    return Path(out)


def _rescale_to_fan_in(path: Path) -> None:
    """Multiplies every linear weight of a fresh N(0, 0.02) checkpoint (Hub layout: 2-D `(out, in)`) by
    1 / (0.02 * sqrt(in)), i.e. redraws it from N(0, 1 / in) with the same seed's pattern."""
    tensors = load_file(path)
    for name, value in tensors.items():
        if (
            value.ndim == 2
            and name.endswith(".weight")
            and "embed_tokens" not in name
            and "lm_head" not in name
        ):
            tensors[name] = (value / (HF_INIT_STD * np.sqrt(value.shape[1]))).astype(value.dtype)
    save_file(tensors, path, metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoint folder to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="parameter initialisation seed")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="architecture (SIZES)")
    parser.add_argument("--init", choices=INITS, default="hf", help="parameter initialisation (INITS)")
    args = parser.parse_args(argv)
    path = write_tiny_checkpoint(args.out, seed=args.seed, config=SIZES[args.size], init=args.init)
    print(path)
    return path


if __name__ == "__main__":
    main()
