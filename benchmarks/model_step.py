"""Forward + backward of a small Qwen2.5-VL-shaped model: JAX (jit) vs transformers / PyTorch, same weights.

Also owns the benchmark model (config, our model exported to an HF torch model, one image + text inputs)
that benchmarks/train_step.py reuses.

    python benchmarks/model_step.py [--steps 2] [--threads N] [--layers 12]
"""

import argparse
import os
import sys
import tempfile
import time

# Runnable as a script from anywhere: the benchmarks folder (common) and the repository (the package).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
from common import (  # noqa: E402
    add_host_malloc_arg,
    add_model_args,
    add_timing_args,
    median,
    pin_threads,
    ratio_line,
    spread,
    time_interleaved,
)

VOCAB = 151936  # the real Qwen2.5-VL vocabulary: the output projection is a large share of the work


def bench_config(layers: int = 12, vision_depth: int = 4):
    """Text 768 wide, 12 heads / 2 kv heads of 64, MLP 2048, untied head (as the real 7B); vision 384 wide."""
    from pixel_reasoner_jax.models.config import ModelConfig, TextConfig, VisionConfig

    return ModelConfig(
        TextConfig(
            vocab_size=VOCAB,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=layers,
            num_attention_heads=12,
            num_key_value_heads=2,
            # Sums to head_dim / 2 = 32 in the real 16:24:24 proportions.
            mrope_section=(8, 12, 12),
            tie_word_embeddings=False,
        ),
        VisionConfig(
            depth=vision_depth,
            hidden_size=384,
            num_heads=6,
            intermediate_size=1536,
            out_hidden_size=768,
            fullatt_block_indexes=(vision_depth - 1,),
        ),
    ).validate()


def num_params(params) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree.leaves(params))


def build_models(
    cfg,
    seed: int = 0,
    torch_attn: str = "sdpa",
    attention: str = "auto",
    layer_loop: str = "scan",
    weight_grad: str = "auto",
):
    """(our Qwen25VL, the same weights in transformers' Qwen2_5_VLForConditionalGeneration), float32.

    The torch weights go through our export (`hf_io.export_hf`) and transformers' own loader.
    """
    import jax
    import torch
    from flax import nnx
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pixel_reasoner_jax.models import hf_io
    from pixel_reasoner_jax.models.qwen25vl import Qwen25VL
    from pixel_reasoner_jax.sharding import make_mesh, use_mesh

    with use_mesh(make_mesh(devices=jax.devices()[:1])):
        model = Qwen25VL(
            cfg, attention=attention, layer_loop=layer_loop, weight_grad=weight_grad, rngs=nnx.Rngs(seed)
        )
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        folder = hf_io.export_hf(model, cfg, os.path.join(tmp, "ckpt"))
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=torch_attn
        )
    return model, hf.train()


def make_inputs(
    cfg,
    *,
    batch: int = 1,
    text_tokens: int = 512,
    image_side: int = 448,
    seed: int = 0,
    logprob_chunk: int,
    bucket_steps: int,
):
    """One `image_side`^2 image per row between `text_tokens` random text tokens; the text trained, with
    `loss_index` at the trainer's buckets (`logprob_chunk`, `bucket_steps`: train/steps.loss_bucket).

    Returns (ours: dict of NumPy arrays for `Qwen25VL`, hf: dict of torch tensors, loss mask (B, T)).
    """
    import numpy as np
    import torch

    from pixel_reasoner_jax.models.vision import prepare_vision, stack_vision
    from pixel_reasoner_jax.processing.rope import get_rope_index
    from pixel_reasoner_jax.train.steps import loss_index

    rng = np.random.default_rng(seed)
    v = cfg.vision
    g = image_side // v.patch_size
    grid = np.array([1, g, g], np.int64)
    n_pad = g * g // v.spatial_merge_size**2
    half = text_tokens // 2
    rows = []
    for _ in range(batch):
        text = rng.integers(100, 150000, text_tokens)
        rows.append(
            [
                *text[:half],
                cfg.vision_start_token_id,
                *[cfg.image_token_id] * n_pad,
                cfg.vision_end_token_id,
                *text[half:],
            ]
        )
    ids = np.array(rows, np.int64)
    grids = np.repeat(grid[None], batch, 0)
    mask = np.ones_like(ids)
    pos, _ = get_rope_index(
        ids,
        mask,
        grids,
        spatial_merge_size=v.spatial_merge_size,
        tokens_per_second=v.tokens_per_second,
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
    )
    pix = rng.standard_normal((batch, g * g, v.patch_dim)).astype(np.float32)  # per-sample rows
    targets = np.concatenate([ids[:, 1:], np.zeros((batch, 1), np.int64)], 1)
    # Prediction alignment: column t trains token t + 1; the last column and vision pads are not trained.
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:, :-1] = (ids[:, 1:] != cfg.image_token_id).astype(np.float32)
    ours = dict(
        ids=ids.astype(np.int32),
        pos=pos,
        mask=mask.astype(np.int32),
        pix=pix,
        vi=stack_vision([prepare_vision(grid[None], v)] * batch),
        targets=targets.astype(np.int32),
        loss_mask=loss_mask,
    )
    ours["loss_index"], ours["loss_valid"] = loss_index(loss_mask, logprob_chunk, bucket_steps)
    tt = np.where(ids == cfg.image_token_id, 1, 0)
    hf = dict(
        input_ids=torch.tensor(ids),
        attention_mask=torch.tensor(mask),
        mm_token_type_ids=torch.tensor(tt),
        pixel_values=torch.tensor(pix.reshape(-1, v.patch_dim)),
        image_grid_thw=torch.tensor(grids),
    )
    return ours, hf, loss_mask


def jax_loss_fn(graphdef, chunk: int):
    """(params, ours) -> (nll_sum, token_count) through our hidden_states + token_logprobs + sft_loss."""
    from flax import nnx

    from pixel_reasoner_jax.models.qwen25vl import indexed_token_logprobs
    from pixel_reasoner_jax.train.losses import sft_loss

    def loss(params, x):
        m = nnx.merge(graphdef, params)
        hidden, _ = m.hidden_states(x["ids"], x["pos"], x["mask"], x["pix"], x["vi"])
        # As the trainer does (train/steps.py): only trained positions reach the vocabulary projection.
        lp, _ = indexed_token_logprobs(m, hidden, x["targets"], x["loss_index"], x["loss_valid"], chunk=chunk)
        return sft_loss(lp, x["loss_mask"])

    return loss


def torch_loss(hf, kw, loss_mask):
    """The same token-mean NLL from transformers' full logits (log_softmax, gather, mask)."""
    import torch

    logits = hf(**kw).logits
    lp = torch.log_softmax(logits.float(), -1)
    targets = torch.cat([kw["input_ids"][:, 1:], torch.zeros_like(kw["input_ids"][:, :1])], 1)
    tok_lp = lp.gather(-1, targets[..., None])[..., 0]
    m = torch.as_tensor(loss_mask)
    return -(tok_lp * m).sum() / m.sum()


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_args(parser)
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers")
    parser.add_argument("--vision-depth", type=int, default=4, help="vision blocks")
    parser.add_argument("--text-tokens", type=int, default=512, help="text tokens around the image")
    parser.add_argument(
        "--attention",
        default="auto",
        help="our attention kernel, one of models.layers.ATTENTION_IMPLS (auto: what model.attention's "
        "default runs on this backend: rows on CPU)",
    )
    parser.add_argument(
        "--torch-attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention"
    )
    add_model_args(parser)
    add_host_malloc_arg(parser)
    args = parser.parse_args(argv)
    threads = pin_threads(args.threads, args.host_malloc)

    import jax
    import torch
    from flax import nnx

    cfg = bench_config(args.layers, args.vision_depth)
    t0 = time.perf_counter()
    model, hf = build_models(
        cfg,
        torch_attn=args.torch_attn,
        attention=args.attention,
        layer_loop=args.layer_loop,
        weight_grad=args.weight_grad,
    )
    graphdef, params = nnx.split(model)
    n = num_params(params)
    ours, hf_kw, loss_mask = make_inputs(
        cfg,
        text_tokens=args.text_tokens,
        logprob_chunk=args.logprob_chunk,
        bucket_steps=args.logprob_bucket_steps,
    )
    t_len = ours["ids"].shape[1]
    print(
        f"model: {n / 1e6:.1f}M parameters ({args.layers} layers x 768, vision {args.vision_depth} x 384, "
        f"vocab {VOCAB}); 1 image 448x448 + {args.text_tokens} text tokens = {t_len} tokens, "
        f"{int(loss_mask.sum())} trained, {ours['loss_index'].shape[1]} projected onto the vocabulary "
        "(ours; torch projects all); "
        f"{threads} threads; built in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )

    loss = jax_loss_fn(graphdef, args.logprob_chunk)

    @jax.jit
    def step(p, x):
        def mean_loss(q):
            s, c = loss(q, x)
            return s / c

        return jax.value_and_grad(mean_loss)(p)

    x = jax.device_put(ours)
    t0 = time.perf_counter()
    compiled = step.lower(params, x).compile()
    print(f"jax compile {time.perf_counter() - t0:.1f}s", flush=True)

    def jax_step():
        jax.block_until_ready(compiled(params, x))

    def torch_step():
        hf.zero_grad(set_to_none=True)
        torch_loss(hf, hf_kw, loss_mask).backward()

    jl = float(compiled(params, x)[0])
    with torch.no_grad():
        tl = float(torch_loss(hf, hf_kw, loss_mask))
    print(f"loss: jax {jl:.5f} | torch {tl:.5f}", flush=True)
    if abs(jl - tl) > 1e-3 * max(1.0, abs(tl)):
        raise RuntimeError(f"the two frameworks disagree on the loss: jax {jl} vs torch {tl}")
    # The loss check above ran the compiled step once and torch's forward; both then warm up with
    # `--warmup` alternated steps (common.time_interleaved: the shared heap settles) before the timed ones.
    t_jax, t_torch = time_interleaved(jax_step, torch_step, repeats=args.steps, warmup=args.warmup)
    ms_jax, ms_torch = 1e3 * median(t_jax), 1e3 * median(t_torch)
    print(f"jax   forward+backward: {ms_jax:.1f} ms/step (range {spread(t_jax, 1e3)})", flush=True)
    print(f"torch forward+backward: {ms_torch:.1f} ms/step (range {spread(t_torch, 1e3)})", flush=True)
    line = ratio_line("model fwd+bwd ms/step", ms_jax, ms_torch, "ms", higher_is_better=False)
    print(line)
    return line


if __name__ == "__main__":
    main()
