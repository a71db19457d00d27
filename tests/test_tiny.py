"""The tiny checkpoint folder: every file loads in transformers offline, weights are complete and seeded."""

import dataclasses
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from pixel_reasoner_jax.models import tiny
from pixel_reasoner_jax.models.config import PRESETS, ModelConfig
from pixel_reasoner_jax.processing import tokenizer as tk
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig

ASSET_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "preprocessor_config.json",
    "generation_config.json",
}


def test_assets_load_offline(tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig

    out = tiny.write_tiny_assets(tmp_path)
    assert {p.name for p in out.iterdir()} == ASSET_FILES
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    ours = tk.QwenTokenizer.from_pretrained(out)
    text = "<|im_start|>user\nHow many? 数 <tool_call><|im_end|>"
    assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text)
    proc = AutoImageProcessor.from_pretrained(str(out))
    assert (proc.size["shortest_edge"], proc.size["longest_edge"]) == (56 * 56, 448 * 448)
    assert ImageProcessorConfig.from_pretrained(out) == ImageProcessorConfig(
        min_pixels=3136, max_pixels=200704
    )
    gen = GenerationConfig.from_pretrained(str(out))
    assert gen.eos_token_id == [151645, 151643] and gen.pad_token_id == 151643
    assert json.loads((out / "chat_template.json").read_text())["chat_template"] == tk.CHAT_TEMPLATE


def test_checkpoint_loads_in_transformers(tiny_ckpt):
    import torch
    from transformers import AutoModelForImageTextToText

    assert ASSET_FILES | {"config.json", "model.safetensors"} <= {p.name for p in tiny_ckpt.iterdir()}
    assert ModelConfig.from_pretrained(tiny_ckpt) == PRESETS["tiny"]
    model, info = AutoModelForImageTextToText.from_pretrained(str(tiny_ckpt), output_loading_info=True)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    tensors = load_file(str(tiny_ckpt / "model.safetensors"))
    assert tensors["visual.patch_embed.proj.weight"].shape == (32, 3, 2, 14, 14)
    assert tensors["lm_head.weight"].shape == (151936, 64)
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    # The loaded torch weights are the file's (not a silent re-initialisation).
    np.testing.assert_array_equal(
        model.lm_head.weight.detach().numpy(), tensors["lm_head.weight"].astype(np.float32)
    )
    assert model.lm_head.weight.dtype == torch.float32


def test_cli_seeds(tmp_path, tiny_ckpt):
    same = tiny.main(["--out", str(tmp_path / "seed0"), "--seed", "0"])
    other = tiny.write_tiny_checkpoint(tmp_path / "seed1", seed=1)
    ref = load_file(str(tiny_ckpt / "model.safetensors"))
    again = load_file(str(same / "model.safetensors"))
    changed = load_file(str(other / "model.safetensors"))
    assert ref.keys() == again.keys() == changed.keys()
    for name in ref:
        np.testing.assert_array_equal(again[name], ref[name], err_msg=name)
    weights = [n for n in ref if n.endswith("proj.weight")]
    assert weights and all(not np.array_equal(changed[n], ref[n]) for n in weights)


def test_vocab_must_cover_the_tokenizer(tmp_path):
    cfg = PRESETS["tiny"]
    small = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, vocab_size=151660))
    with pytest.raises(ValueError, match="vocab_size 151660 does not cover the tokenizer's ids"):
        tiny.write_tiny_checkpoint(tmp_path / "x", config=small)


def test_fan_in_init_rescales_linear_weights_only(tmp_path, tiny_ckpt):
    """`--init fan_in`: the same seed's draws, linear weights scaled to std 1/sqrt(fan_in); the rest as is."""
    ref = load_file(str(tiny_ckpt / "model.safetensors"))
    out = tiny.main(["--out", str(tmp_path / "fan_in"), "--seed", "0", "--init", "fan_in"])
    got = load_file(str(out / "model.safetensors"))
    linear = [n for n, v in ref.items() if v.ndim == 2 and "embed_tokens" not in n and "lm_head" not in n]
    assert "model.layers.0.self_attn.q_proj.weight" in linear and "visual.merger.mlp.2.weight" in linear
    for name, value in ref.items():
        if name in linear:
            fan_in = value.shape[1]
            np.testing.assert_allclose(got[name], value / (0.02 * np.sqrt(fan_in)), rtol=1e-6, err_msg=name)
            assert abs(float(got[name].std()) * np.sqrt(fan_in) - 1.0) < 0.2, name
        else:
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    with pytest.raises(ValueError, match="init must be one of"):
        tiny.write_tiny_checkpoint(tmp_path / "x", init="xavier")
