"""Greedy generation throughput: the in-process JaxSampler vs transformers' generate, same weights and inputs.

A small Qwen2.5-VL (text 256 wide, 4 layers, vision depth 2, the real 152k vocabulary), a batch of prompts
each holding one image, N new tokens without early stops. Prints tokens/s of both and the speedup.

    python benchmarks/sampler.py [--new-tokens 32] [--batch 8] [--threads N]
"""

import argparse
import copy
import os
import sys
import time

# Runnable as a script from anywhere: the benchmarks folder (common, model_step) and the repository.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
from common import median, pin_threads, ratio_line, time_calls  # noqa: E402

VOCAB = 151936


def sampler_config():
    """Text 256 wide, 4 layers, 8 heads / 2 kv heads of 32, untied head; vision 2 blocks x 128."""
    from pixel_reasoner_jax.models.config import ModelConfig, TextConfig, VisionConfig

    return ModelConfig(
        TextConfig(
            vocab_size=VOCAB,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            mrope_section=(4, 6, 6),  # head_dim / 2 = 16 in the real 16:24:24 proportions
            tie_word_embeddings=False,
        ),
        VisionConfig(
            depth=2,
            hidden_size=128,
            num_heads=4,
            intermediate_size=512,
            out_hidden_size=256,
            fullatt_block_indexes=(1,),
        ),
    ).validate()


def make_requests(cfg, batch: int, new_tokens: int, image_side: int, text_tokens: int, seed: int = 0):
    """`batch` prompts of one length: random text, one image (ONE pad), more text; greedy, no stop ids."""
    import numpy as np
    from PIL import Image

    from pixel_reasoner_jax.rollout.policy import GenerationRequest, SamplingParams

    rng = np.random.default_rng(seed)
    half = text_tokens // 2
    out = []
    for _ in range(batch):
        text = rng.integers(100, 150000, text_tokens).tolist()
        ids = (
            *text[:half],
            cfg.vision_start_token_id,
            cfg.image_token_id,
            cfg.vision_end_token_id,
            *text[half:],
        )
        img = Image.fromarray(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8))
        out.append(GenerationRequest(ids, (img,), SamplingParams(new_tokens, temperature=0.0)))
    return out


def hf_inputs(requests, cfg, image_cfg):
    """transformers kwargs of the same expanded ids and pixels (prompts share one length: no padding)."""
    import numpy as np
    import torch

    from pixel_reasoner_jax.rollout.sampler_inputs import expand_request

    ex = [expand_request(r, i, cfg, image_cfg) for i, r in enumerate(requests)]
    ids = torch.tensor(np.stack([e.input_ids for e in ex]).astype(np.int64))
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=(ids == cfg.image_token_id).long(),
        pixel_values=torch.tensor(np.concatenate([e.pixel_values for e in ex])),
        image_grid_thw=torch.tensor(np.concatenate([e.grid_thw for e in ex])),
    )


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--batch", type=int, default=8, help="prompts per call (one image each)")
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    parser.add_argument("--image-side", type=int, default=224, help="image side in pixels (multiple of 28)")
    # 62 text + 64 image + 2 vision marks = 128 prompt tokens: exactly a (power-of-two) sequence bucket.
    parser.add_argument("--text-tokens", type=int, default=62, help="text tokens around the image")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per framework (after one warmup)")
    args = parser.parse_args(argv)
    threads = pin_threads(args.threads)

    import torch
    from flax import nnx
    from model_step import build_models, num_params

    from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
    from pixel_reasoner_jax.rollout.sampler import JaxSampler

    cfg = sampler_config()
    t0 = time.perf_counter()
    model, hf = build_models(cfg)
    hf.eval()
    image_cfg = ImageProcessorConfig()
    requests = make_requests(cfg, args.batch, args.new_tokens, args.image_side, args.text_tokens)
    sampler = JaxSampler(model, cfg, image_cfg, max_batch=args.batch, decode_bucket=args.new_tokens)
    kw = hf_inputs(requests, cfg, image_cfg)
    prompt_len = kw["input_ids"].shape[1]
    print(
        f"model: {num_params(nnx.state(model, nnx.Param)) / 1e6:.1f}M parameters; batch {args.batch} x "
        f"({prompt_len} prompt tokens incl. one {args.image_side}px image) + {args.new_tokens} new tokens; "
        f"{threads} thread(s); setup {time.perf_counter() - t0:.1f}s"
    )
    n_new = args.batch * args.new_tokens

    t0 = time.perf_counter()
    results = sampler.generate(requests)
    print(f"jax: first call (compiles) {time.perf_counter() - t0:.1f}s; compiled {sampler.compile_counts}")
    jax_s = median(time_calls(lambda: sampler.generate(requests), warmup=0, repeats=args.repeats))

    gen_cfg = copy.deepcopy(hf.generation_config)
    gen_cfg.eos_token_id = None  # the full budget, as the sampler without stop ids
    gen_cfg.max_new_tokens = gen_cfg.min_new_tokens = args.new_tokens
    gen_cfg.do_sample = False

    def hf_generate():
        with torch.no_grad():
            return hf.generate(**kw, generation_config=gen_cfg)

    hf_out = hf_generate()
    hf_s = median(time_calls(hf_generate, warmup=0, repeats=args.repeats))
    hf_new = hf_out[:, prompt_len:].tolist()
    same = sum(list(r.output_ids) == h for r, h in zip(results, hf_new))
    print(f"greedy outputs identical to transformers: {same}/{args.batch} rows")
    print(f"jax {jax_s:.3f}s per call, transformers {hf_s:.3f}s per call (median of {args.repeats})")
    line = ratio_line(
        f"greedy generate, {args.batch} x {args.new_tokens} new tokens",
        n_new / jax_s,
        n_new / hf_s,
        "tokens/s",
        higher_is_better=True,
    )
    print(line)
    return line


if __name__ == "__main__":
    main()
