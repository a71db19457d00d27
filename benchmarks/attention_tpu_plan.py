"""Ahead-of-time TPU compile of a small decoder's forward + backward at a long sequence for each attention
kernel (splash, blocked, dense); prints XLA's per-device memory plan. Needs `jax[tpu]` (libtpu), no TPU.

Run in an environment of its own (libtpu in the test environment makes every `import jax` probe for a TPU):

    python -m venv --system-site-packages /tmp/venv-tpu && /tmp/venv-tpu/bin/pip install "jax[tpu]==0.10.2"
    /tmp/venv-tpu/bin/python benchmarks/attention_tpu_plan.py [--tokens 8192] [--topology v5p:2x2x1]

Measured (2-core CPU host, jax / jaxlib 0.10.2, libtpu 0.0.42.1, topology v5p:2x2x1, per device): a
decoder of 2 layers, 8 heads / 2 kv heads of 128, width 1024, bf16 weights and activations, remat "full",
batch 1 on one chip, value_and_grad of the mean square of the final hidden states. XLA temp memory:
    T = 1024: splash 35.4 MiB | blocked 97.4 MiB
    T = 4096: splash 196.6 MiB | blocked 1376.8 MiB
    T = 8192: splash 390.4 MiB | blocked 5455.0 MiB | dense 3475.8 MiB (arguments 50.1 MiB for all three)
Splash lowers to three Mosaic kernels (splash_mha_fwd, _dq, _dkv); with --devices 4 (batch 4 over fsdp,
the kernel in shard_map) it plans 329.4 MiB temp per device at T = 8192. The blocked kernel alone (fwd+bwd,
B=1 T=4096 N=8 K=2 H=128, not in a layer scan) plans 29.7 MiB temp, linear in T, but inside the decoder's
layer scan its TPU plan grows quadratically (x4 from T = 4096 to 8192; 2117.2 MiB at 4096 with remat
"none") for a reason not yet found: on TPU use splash (what "auto" picks).
"""

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_HERE)]

MIB = 2**20


def decoder_config(layers: int, heads: int, kv_heads: int, head_dim: int):
    """A Qwen2-shaped text config: width heads * head_dim, MLP 2x wide, a small vocabulary (unused here)."""
    from pixel_reasoner_jax.models.config import TextConfig

    # M-RoPE sections summing to head_dim / 2 in the real 16:24:24 proportions.
    temporal = head_dim // 8
    spatial = head_dim // 2 - temporal
    return TextConfig(
        vocab_size=1024,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        mrope_section=(temporal, spatial // 2, spatial - spatial // 2),
    )


def plan(impl: str, cfg, tokens: int, batch: int, devices, remat: str):
    """Compiled memory analysis of value_and_grad(mean square of the decoder output) for `impl`."""
    # Imported here, after main() has set libtpu's environment variables.
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pixel_reasoner_jax.models.text import Qwen2Decoder
    from pixel_reasoner_jax.sharding import make_mesh, state_shardings, use_mesh

    mesh = make_mesh(data=1, fsdp=len(devices), tensor=1, devices=devices)
    with use_mesh(mesh, "train"):
        model = nnx.eval_shape(
            lambda: Qwen2Decoder(
                cfg,
                dtype=jnp.bfloat16,
                param_dtype=jnp.bfloat16,
                remat=remat,
                attention=impl,
                rngs=nnx.Rngs(0),
            )
        )
        graphdef, state = nnx.split(model)
        shard = state_shardings(state, mesh, "train")
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shard)
        batch_sharded = NamedSharding(mesh, P(("data", "fsdp")))
        d = cfg.hidden_size
        embeds = jax.ShapeDtypeStruct((batch, tokens, d), jnp.bfloat16, sharding=batch_sharded)
        positions = jax.ShapeDtypeStruct(
            (3, batch, tokens), jnp.int32, sharding=NamedSharding(mesh, P(None, ("data", "fsdp")))
        )
        mask = jax.ShapeDtypeStruct((batch, tokens), jnp.int32, sharding=batch_sharded)

        def loss(state, embeds, positions, mask):
            hidden, _ = nnx.merge(graphdef, state)(embeds, positions, mask)
            return jnp.mean(jnp.square(hidden.astype(jnp.float32)))

        t0 = time.perf_counter()
        compiled = jax.jit(jax.value_and_grad(loss)).lower(params, embeds, positions, mask).compile()
        seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    hlo = compiled.as_text()
    kernels = sorted({t for t in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv") if t in hlo})
    return m, seconds, kernels


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--impls", default="splash,blocked,dense")
    parser.add_argument(
        "--devices", type=int, default=1, help="chips of the topology to shard the batch over"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's probe for a real TPU
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

    from jax.experimental import topologies  # after the environment variables above: JAX reads them once

    topo = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
    devices = topo.devices[: args.devices]
    cfg = decoder_config(args.layers, args.heads, args.kv_heads, args.head_dim)
    lines = []
    for impl in args.impls.split(","):
        m, seconds, kernels = plan(impl, cfg, args.tokens, args.devices, devices, args.remat)
        line = (
            f"{impl:8s} T={args.tokens} N={args.heads} K={args.kv_heads} H={args.head_dim} "
            f"L={args.layers} remat={args.remat} devices={args.devices}: temp {m.temp_size_in_bytes / MIB:.1f} MiB, "
            f"arguments {m.argument_size_in_bytes / MIB:.1f} MiB, output {m.output_size_in_bytes / MIB:.1f} MiB "
            f"(compile {seconds:.0f} s{', kernels ' + ' '.join(kernels) if kernels else ''})"
        )
        print(line, flush=True)
        lines.append(line)
    return lines


if __name__ == "__main__":
    main()
