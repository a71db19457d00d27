"""Qwen2.5-VL architecture configs: frozen dataclasses read from and written to HF `config.json`.

Reads both the Hub's flat layout (`rope_scaling`, text fields at top level) and the nested layout that
transformers 5 writes (`text_config.rope_parameters`). Class defaults of transformers are NOT the
checkpoints' values (reference/qwen25vl.md §1.2), so every field is read explicitly or fails.
"""

import dataclasses
import json
import os
from typing import Any

MODEL_TYPE = "qwen2_5_vl"


class ConfigFormatError(ValueError):
    """A config.json that is not a Qwen2.5-VL config, or misses a required field."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Vision tower (HF `vision_config`)."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    in_channels: int = 3
    tokens_per_second: float = 2
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length C of one flattened patch row: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen2 decoder with multimodal rotary (HF `text_config` / flat top-level fields)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, int, int]
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole Qwen2.5-VL architecture plus the special token ids the model itself uses."""

    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645

    def validate(self) -> "ModelConfig":
        t, v = self.text, self.vision
        checks = [
            (
                t.hidden_size % t.num_attention_heads == 0,
                "text.hidden_size must divide by num_attention_heads",
            ),
            (
                t.num_attention_heads % t.num_key_value_heads == 0,
                "text.num_attention_heads must divide by num_key_value_heads",
            ),
            (
                sum(t.mrope_section) * 2 == t.head_dim,
                f"text.mrope_section must sum to head_dim/2 = {t.head_dim // 2}",
            ),
            (v.hidden_size % v.num_heads == 0, "vision.hidden_size must divide by vision.num_heads"),
            (v.head_dim % 4 == 0, "vision head_dim must divide by 4 (2-D rotary halves)"),
            (
                all(0 <= i < v.depth for i in v.fullatt_block_indexes),
                "vision.fullatt_block_indexes out of range",
            ),
            (
                v.window_size % (v.spatial_merge_size * v.patch_size) == 0,
                "vision.window_size must be a multiple of 28",
            ),
            (
                t.vocab_size > max(self.image_token_id, self.video_token_id),
                "text.vocab_size must cover the token ids",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigFormatError(f"invalid Qwen2.5-VL config: {msg} (got {self})")
        return self

    # ---------------------------------------------------------------- HF config.json I/O

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Builds from a config.json dict, flat (Hub) or nested (transformers 5)."""
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigFormatError(f"unknown model_type {model_type!r}: expected {MODEL_TYPE!r}")
        text_d = dict(d.get("text_config") or {})
        # Flat layout: text fields live at the top level; nested fields win where both exist.
        for key, value in d.items():
            if key not in ("text_config", "vision_config"):
                text_d.setdefault(key, value)
        vision_d = d.get("vision_config")
        if not isinstance(vision_d, dict):
            raise ConfigFormatError("config.json has no vision_config object")
        rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ConfigFormatError("config.json has no mrope_section in rope_scaling / rope_parameters")
        theta = rope.get("rope_theta", text_d.get("rope_theta"))

        def need(src: dict, key: str, where: str):
            if key not in src or src[key] is None:
                raise ConfigFormatError(f"config.json is missing {where}{key}")
            return src[key]

        tie = d.get("tie_word_embeddings", text_d.get("tie_word_embeddings"))
        text = TextConfig(
            vocab_size=int(need(text_d, "vocab_size", "")),
            hidden_size=int(need(text_d, "hidden_size", "")),
            intermediate_size=int(need(text_d, "intermediate_size", "")),
            num_hidden_layers=int(need(text_d, "num_hidden_layers", "")),
            num_attention_heads=int(need(text_d, "num_attention_heads", "")),
            num_key_value_heads=int(need(text_d, "num_key_value_heads", "")),
            mrope_section=tuple(int(x) for x in rope["mrope_section"]),
            rope_theta=float(theta if theta is not None else need(text_d, "rope_theta", "")),
            rms_norm_eps=float(need(text_d, "rms_norm_eps", "")),
            tie_word_embeddings=bool(tie) if tie is not None else False,
            max_position_embeddings=int(text_d.get("max_position_embeddings", 128000)),
            hidden_act=str(text_d.get("hidden_act", "silu")),
        )
        v_rope = vision_d.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=int(need(vision_d, "depth", "vision_config.")),
            hidden_size=int(need(vision_d, "hidden_size", "vision_config.")),
            num_heads=int(need(vision_d, "num_heads", "vision_config.")),
            intermediate_size=int(need(vision_d, "intermediate_size", "vision_config.")),
            out_hidden_size=int(need(vision_d, "out_hidden_size", "vision_config.")),
            fullatt_block_indexes=tuple(
                int(x) for x in need(vision_d, "fullatt_block_indexes", "vision_config.")
            ),
            patch_size=int(vision_d.get("patch_size", vision_d.get("spatial_patch_size", 14))),
            temporal_patch_size=int(vision_d.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vision_d.get("spatial_merge_size", 2)),
            window_size=int(need(vision_d, "window_size", "vision_config.")),
            in_channels=int(vision_d.get("in_channels", vision_d.get("in_chans", 3))),
            # Checkpoints say 2; the transformers class default (4) is wrong for them, so require it.
            tokens_per_second=need(vision_d, "tokens_per_second", "vision_config."),
            hidden_act=str(vision_d.get("hidden_act", "silu")),
            rope_theta=float(v_rope.get("rope_theta", 10000.0)),
        )
        ids = {
            k: int(d[k])
            for k in (
                "image_token_id",
                "video_token_id",
                "vision_start_token_id",
                "vision_end_token_id",
                "bos_token_id",
                "eos_token_id",
            )
            if isinstance(d.get(k), int)
        }
        return cls(text=text, vision=vision, **ids).validate()

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hub's flat config.json layout (what the released checkpoints and SGLang read)."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": MODEL_TYPE,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": 151654,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "max_window_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "sliding_window": 32768,
            "use_sliding_window": False,
            "tie_word_embeddings": t.tie_word_embeddings,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": t.vocab_size,
            "vision_config": {
                "depth": v.depth,
                "hidden_act": v.hidden_act,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "spatial_patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": v.tokens_per_second,
            },
        }

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | os.PathLike) -> "ModelConfig":
        path = os.path.join(os.fspath(ckpt_dir), "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in checkpoint folder {os.fspath(ckpt_dir)!r}")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigFormatError(f"{path} is not valid JSON: {e}") from e
        return cls.from_hf_dict(d)

    def save(self, ckpt_dir: str | os.PathLike) -> None:
        with open(os.path.join(os.fspath(ckpt_dir), "config.json"), "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)


def _vision(out_hidden: int, intermediate: int = 3420) -> VisionConfig:
    return VisionConfig(
        depth=32,
        hidden_size=1280,
        num_heads=16,
        intermediate_size=intermediate,
        out_hidden_size=out_hidden,
        fullatt_block_indexes=(7, 15, 23, 31),
    )


def _text(vocab, hidden, inter, layers, heads, kv, tie=False) -> TextConfig:
    return TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        mrope_section=(16, 24, 24),
        tie_word_embeddings=tie,
    )


# Real sizes (reference/qwen25vl.md §1.2). 72B values are second-hand (unverified there).
PRESETS: dict[str, ModelConfig] = {
    "3b": ModelConfig(_text(151936, 2048, 11008, 36, 16, 2, tie=True), _vision(2048)),
    "7b": ModelConfig(_text(152064, 3584, 18944, 28, 28, 4), _vision(3584)),
    "32b": ModelConfig(_text(152064, 5120, 27648, 64, 40, 8), _vision(5120, 3456)),
    "72b": ModelConfig(_text(152064, 8192, 29568, 80, 64, 8), _vision(8192, 3456)),
    # Tiny: real token ids (vocab covers 151664), two vision blocks (0 windowed, 1 full attention).
    "tiny": ModelConfig(
        TextConfig(
            vocab_size=151936,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=(2, 3, 3),
        ),
        VisionConfig(
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            out_hidden_size=64,
            fullatt_block_indexes=(1,),
        ),
    ),
}
