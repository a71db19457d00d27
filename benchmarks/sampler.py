"""Generation throughput: the in-process JaxSampler vs transformers' generate, same weights and inputs.

A small Qwen2.5-VL (text 256 wide, 4 layers, vision depth 2, the real 152k vocabulary). Two cases, each
ending in a ratio line:
- plain: a batch of prompts each holding one image, N greedy new tokens without early stops;
- grpo: GRPO-shaped multi-turn episodes: P prompts with an image, G seeded samples of each (temperature 1),
  several turns per episode, each turn one generate call over every episode followed by a tool answer that
  holds a crop of the image (so later turns carry two and more images). Token budgets are fixed (no stop
  ids), so both frameworks do the same work whatever they sample.

    python benchmarks/sampler.py [--case plain|grpo|both] [--new-tokens 32] [--batch 8] [--threads N]
"""

import argparse
import copy
import os
import sys
import time

# Runnable as a script from anywhere: the benchmarks folder (common, model_step) and the repository.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
from common import add_host_malloc_arg, median, pin_threads, ratio_line, time_calls  # noqa: E402

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


def make_requests(
    cfg, batch: int, new_tokens: int, image_side: int, text_tokens: int, seed: int = 0, sampling=None
):
    """`batch` prompts of one length: random text, one image (ONE pad), more text; greedy (or `sampling`,
    a SamplingParams), no stop ids."""
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
        params = sampling or SamplingParams(new_tokens, temperature=0.0)
        out.append(GenerationRequest(ids, (img,), params, seed=len(out) if sampling else None))
    return out


def tool_answer(cfg, image, episode: int, turn: int, crop_side: int, text_tokens: int):
    """(ids, media) of one tool answer: text, a crop of `image` (ONE pad), text; fixed by (episode, turn)."""
    import numpy as np

    rng = np.random.default_rng((episode, turn))
    text = rng.integers(100, 150000, text_tokens).tolist()
    half = text_tokens // 2
    ids = [*text[:half], cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, *text[half:]]
    return ids, [image.crop((0, 0, crop_side, crop_side))]


def run_episodes(generate, prompts, group: int, turns: int, new_tokens: int, cfg, crop_side: int):
    """G episodes per prompt for `turns` generate calls; `generate(requests)` returns new ids per request.

    Each sample of a prompt holds its own copy of the image (as separately loaded episodes do).
    """
    from pixel_reasoner_jax.rollout.policy import GenerationRequest, SamplingParams

    convs = [(list(p.input_ids), [m.copy() for m in p.media]) for p in prompts for _ in range(group)]
    sampling = SamplingParams(new_tokens, temperature=1.0)
    for t in range(turns):
        requests = [
            GenerationRequest(tuple(ids), tuple(media), sampling, seed=1000 * e + t)
            for e, (ids, media) in enumerate(convs)
        ]
        for e, ((ids, media), new) in enumerate(zip(convs, generate(requests))):
            ids += new
            if t < turns - 1:
                more_ids, more_media = tool_answer(cfg, media[0], e, t, crop_side, 20)
                ids += more_ids
                media += more_media
    return convs


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


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("plain", "grpo", "both"), default="both")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (per turn)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per call in the plain case")
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    parser.add_argument("--image-side", type=int, default=224, help="image side in pixels (multiple of 28)")
    # 62 text + 64 image + 2 vision marks = 128 prompt tokens: exactly a (power-of-two) sequence bucket.
    parser.add_argument("--text-tokens", type=int, default=62, help="text tokens around the image")
    parser.add_argument("--prompts", type=int, default=2, help="grpo: prompts (P)")
    parser.add_argument("--group", type=int, default=4, help="grpo: samples per prompt (G)")
    parser.add_argument("--turns", type=int, default=3, help="grpo: generate calls per episode")
    parser.add_argument("--crop-side", type=int, default=112, help="grpo: side of each tool answer's crop")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per framework (after one warmup)")
    add_host_malloc_arg(parser)
    args = parser.parse_args(argv)
    threads = pin_threads(args.threads, args.host_malloc)

    from flax import nnx
    from model_step import build_models, num_params

    from pixel_reasoner_jax.processing.vision import ImageProcessorConfig

    cfg = sampler_config()
    t0 = time.perf_counter()
    model, hf = build_models(cfg)
    hf.eval()
    image_cfg = ImageProcessorConfig()
    print(
        f"model: {num_params(nnx.state(model, nnx.Param)) / 1e6:.1f}M parameters; {threads} thread(s); "
        f"setup {time.perf_counter() - t0:.1f}s"
    )
    lines = []
    if args.case in ("plain", "both"):
        lines.append(plain_case(args, cfg, image_cfg, model, hf))
    if args.case in ("grpo", "both"):
        lines.append(grpo_case(args, cfg, image_cfg, model, hf))
    print("\n".join(lines))
    return lines


def hf_generation_config(hf, new_tokens: int, sample: bool):
    """The full budget (no eos, as requests without stop ids); greedy, or plain temperature-1 sampling."""
    gen_cfg = copy.deepcopy(hf.generation_config)
    gen_cfg.eos_token_id = None
    gen_cfg.max_new_tokens = gen_cfg.min_new_tokens = new_tokens
    gen_cfg.do_sample = sample
    gen_cfg.temperature, gen_cfg.top_p, gen_cfg.top_k = 1.0, 1.0, 0
    return gen_cfg


def plain_case(args, cfg, image_cfg, model, hf) -> str:
    import torch

    from pixel_reasoner_jax.rollout.sampler import JaxSampler

    requests = make_requests(cfg, args.batch, args.new_tokens, args.image_side, args.text_tokens)
    sampler = JaxSampler(model, cfg, image_cfg, max_batch=args.batch, decode_bucket=args.new_tokens)
    kw = hf_inputs(requests, cfg, image_cfg)
    prompt_len = kw["input_ids"].shape[1]
    print(
        f"plain: batch {args.batch} x ({prompt_len} prompt tokens incl. one {args.image_side}px image) + "
        f"{args.new_tokens} new tokens"
    )
    n_new = args.batch * args.new_tokens

    t0 = time.perf_counter()
    results = sampler.generate(requests)
    print(f"jax: first call (compiles) {time.perf_counter() - t0:.1f}s; compiled {sampler.compile_counts}")
    jax_s = median(time_calls(lambda: sampler.generate(requests), warmup=0, repeats=args.repeats))
    gen_cfg = hf_generation_config(hf, args.new_tokens, sample=False)

    def hf_generate():
        with torch.no_grad():
            return hf.generate(**kw, generation_config=gen_cfg)

    hf_out = hf_generate()
    hf_s = median(time_calls(hf_generate, warmup=0, repeats=args.repeats))
    hf_new = hf_out[:, prompt_len:].tolist()
    same = sum(list(r.output_ids) == h for r, h in zip(results, hf_new))
    print(f"greedy outputs identical to transformers: {same}/{args.batch} rows")
    print(f"jax {jax_s:.3f}s per call, transformers {hf_s:.3f}s per call (median of {args.repeats})")
    return ratio_line(
        f"greedy generate, {args.batch} x {args.new_tokens} new tokens",
        n_new / jax_s,
        n_new / hf_s,
        "tokens/s",
        higher_is_better=True,
    )


def grpo_case(args, cfg, image_cfg, model, hf) -> str:
    import torch

    from pixel_reasoner_jax.rollout.sampler import JaxSampler

    p, g, turns, n = args.prompts, args.group, args.turns, args.new_tokens
    prompts = make_requests(cfg, p, n, args.image_side, args.text_tokens, seed=1)
    sampler = JaxSampler(model, cfg, image_cfg, max_batch=p * g, decode_bucket=n)

    def jax_generate(requests):
        return [r.output_ids for r in sampler.generate(requests)]

    gen_cfg = hf_generation_config(hf, n, sample=True)

    def hf_generate(requests):
        kw = hf_inputs(requests, cfg, image_cfg)  # every conversation has one length: no padding
        with torch.no_grad():
            out = hf.generate(**kw, generation_config=gen_cfg)
        return out[:, kw["input_ids"].shape[1] :].tolist()

    def episodes(generate):
        return lambda: run_episodes(generate, prompts, g, turns, n, cfg, args.crop_side)

    t0 = time.perf_counter()
    convs = episodes(jax_generate)()
    last = len(expand_ids(convs[0], cfg, image_cfg))
    print(
        f"grpo: {p} prompts x G={g} samples, {turns} turns of {n} sampled tokens (tool answers with a "
        f"{args.crop_side}px crop); final conversations {last} tokens, {len(convs[0][1])} images"
    )
    before = sampler.stats
    print(f"jax: first run (compiles) {time.perf_counter() - t0:.1f}s; compiled {sampler.compile_counts}")
    jax_s = median(time_calls(episodes(jax_generate), warmup=0, repeats=args.repeats))
    used = {k: (v - before[k]) // args.repeats for k, v in sampler.stats.items()}
    print(f"jax per run: {used}")
    hf_s = median(time_calls(episodes(hf_generate), warmup=1, repeats=args.repeats))
    print(f"jax {jax_s:.3f}s per run, transformers {hf_s:.3f}s per run (median of {args.repeats})")
    n_new = p * g * turns * n
    return ratio_line(
        f"grpo episodes, {p}x{g} samples x {turns} turns x {n} sampled tokens",
        n_new / jax_s,
        n_new / hf_s,
        "tokens/s",
        higher_is_better=True,
    )


def expand_ids(conv, cfg, image_cfg):
    from pixel_reasoner_jax.rollout.policy import GenerationRequest, SamplingParams
    from pixel_reasoner_jax.rollout.sampler_inputs import expand_request

    req = GenerationRequest(tuple(conv[0]), tuple(conv[1]), SamplingParams(1))
    return expand_request(req, 0, cfg, image_cfg).input_ids


if __name__ == "__main__":
    main()
