"""ModelSpec: what the server needs to know about the served model besides its Policy.

Read from a checkpoint's config.json, generation_config.json and preprocessor_config.json.
"""

import dataclasses
import json
import os
from pathlib import Path

from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig


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
