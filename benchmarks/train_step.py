"""SFT step tokens/s: our jitted `make_train_fns(...).sft_step` vs transformers + torch.optim.AdamW.

Same weights (our export), same batch (2 sequences x 512 tokens, one image each), same AdamW settings and
gradient clipping, same process and threads; prints tokens/s of both and the ratio line.

    python benchmarks/train_step.py [--steps 2] [--threads N] [--layers 4]
"""

import argparse
import os
import sys
import time

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


def examples_from(ours, cfg):
    """Trainer `Example`s (token alignment) of the rows of `model_step.make_inputs`: text trained, pads not."""
    import numpy as np

    from pixel_reasoner_jax.processing.batch import Example

    ids = ours["ids"]
    g = int(round(ours["pix"].shape[1] ** 0.5))
    out = []
    for i in range(ids.shape[0]):
        row = ids[i]
        is_pad = row == cfg.image_token_id
        pads = np.flatnonzero(is_pad)
        mask = (~is_pad).astype(np.int8)
        mask[0] = 0  # the first token is never predicted
        out.append(
            Example(
                input_ids=row.astype(np.int32),
                loss_mask=mask,
                logprobs=np.zeros(row.shape, np.float32),
                positions=ours["pos"][:, i],
                pixel_values=ours["pix"][i],
                grid_thw=np.array([[1, g, g]], np.int64),
                is_video=np.zeros(1, bool),
                second_per_grid_ts=np.zeros(0, np.float32),
                vision_spans=np.array([[pads[0], pads[-1] + 1]], np.int64),
                qid=f"bench-{i}",
            )
        )
    return out


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_args(parser)
    parser.add_argument("--threads", type=int, default=None, help="threads for both (default: all cores)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--vision-depth", type=int, default=4, help="vision blocks")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence, image included")
    parser.add_argument("--image-side", type=int, default=224, help="image side in pixels (multiple of 28)")
    parser.add_argument(
        "--attention", default="auto", help="our attention kernel, one of models.layers.ATTENTION_IMPLS"
    )
    parser.add_argument(
        "--torch-attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention"
    )
    add_model_args(parser)
    add_host_malloc_arg(parser)
    args = parser.parse_args(argv)
    threads = pin_threads(args.threads, args.host_malloc)

    import jax
    import numpy as np
    import torch
    from model_step import bench_config, build_models, make_inputs, num_params, torch_loss

    from pixel_reasoner_jax.sharding import make_mesh
    from pixel_reasoner_jax.train import state as st
    from pixel_reasoner_jax.train.steps import make_train_fns, micro_batches, stack

    cfg = bench_config(args.layers, args.vision_depth)
    n_pad = (args.image_side // cfg.vision.patch_size) ** 2 // cfg.vision.spatial_merge_size**2
    text_tokens = args.seq_len - n_pad - 2
    if text_tokens < 2:
        raise ValueError(f"--seq-len {args.seq_len} leaves no text around the {n_pad + 2} image tokens")
    t0 = time.perf_counter()
    model, hf = build_models(
        cfg,
        torch_attn=args.torch_attn,
        attention=args.attention,
        layer_loop=args.layer_loop,
        weight_grad=args.weight_grad,
    )
    ours, hf_kw, loss_mask = make_inputs(
        cfg,
        batch=args.batch,
        text_tokens=text_tokens,
        image_side=args.image_side,
        logprob_chunk=args.logprob_chunk,
        bucket_steps=args.logprob_bucket_steps,
    )
    tokens = int(ours["mask"].sum())
    ocfg = st.OptimConfig(lr=1e-5, total_steps=1000, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    optimizer = st.make_optimizer(ocfg)
    mesh = make_mesh(devices=jax.devices()[:1])
    graphdef, state, shardings = st.create_train_state(model, optimizer, mesh)
    n = num_params(state.params)
    del model
    fns = make_train_fns(graphdef, optimizer, shardings, mesh, logprob_chunk=args.logprob_chunk)
    micro = stack(
        micro_batches(
            examples_from(ours, cfg),
            1,
            pad_id=0,
            vision_cfg=cfg.vision,
            seq_buckets=(args.seq_len,),
            patch_buckets=None,
        ),
        logprob_chunk=args.logprob_chunk,
        bucket_steps=args.logprob_bucket_steps,
    )
    print(
        f"model: {n / 1e6:.1f}M parameters ({args.layers} layers x 768, vision {args.vision_depth} x 384); "
        f"batch {args.batch} x {args.seq_len} tokens ({n_pad} image tokens each); AdamW + clip 1.0; "
        f"{threads} threads; built in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )

    torch_opt = torch.optim.AdamW(
        hf.parameters(), lr=ocfg.lr, betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps, weight_decay=0.0
    )
    t0 = time.perf_counter()
    state, metrics = fns.sft_step(state, micro)
    jl = float(metrics["loss"])
    print(f"jax compile + first step {time.perf_counter() - t0:.1f}s", flush=True)

    def torch_step():
        torch_opt.zero_grad(set_to_none=True)
        loss = torch_loss(hf, hf_kw, loss_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), ocfg.grad_clip)
        torch_opt.step()
        return float(loss.detach())

    tl = torch_step()  # warmup, and the first-step loss on the same weights
    print(f"first-step loss: jax {jl:.5f} | torch {tl:.5f}", flush=True)
    if not np.isclose(jl, tl, rtol=1e-3):
        raise RuntimeError(f"the two frameworks disagree on the first-step loss: jax {jl} vs torch {tl}")

    def jax_step():
        nonlocal state
        state, m = fns.sft_step(state, micro)
        jax.block_until_ready((state, m))

    t_jax, t_torch = time_interleaved(jax_step, torch_step, repeats=args.steps, warmup=args.warmup)
    jax_s, torch_s = median(t_jax), median(t_torch)
    print(
        f"jax   SFT step: {1e3 * jax_s:.0f} ms (range {spread(t_jax, 1e3)}), {tokens / jax_s:.1f} tokens/s",
        flush=True,
    )
    print(
        f"torch SFT step: {1e3 * torch_s:.0f} ms (range {spread(t_torch, 1e3)}), {tokens / torch_s:.1f} tokens/s",
        flush=True,
    )
    line = ratio_line(
        "SFT step tokens/s", tokens / jax_s, tokens / torch_s, "tokens/s", higher_is_better=True
    )
    print(line)
    return line


if __name__ == "__main__":
    main()
