"""The ahead-of-time planner: topology names, FLOP counting over scanned layers, and a cpu:8 plan of the
tiny SFT recipe (text-only batches) whose argument sizes match a hand count of the train state."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jex_core
from jax.sharding import PartitionSpec as P

from configs import grpo as grpo_config
from configs import sft as sft_config
from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.config import from_config_dict
from pixel_reasoner_jax.models import layers
from pixel_reasoner_jax.models.config import PRESETS
from pixel_reasoner_jax.models.qwen25vl import Qwen25VL
from pixel_reasoner_jax.plan import __main__ as cli
from pixel_reasoner_jax.plan import flops as fl
from pixel_reasoner_jax.plan import programs
from pixel_reasoner_jax.plan import topology as tp
from pixel_reasoner_jax.processing.batch import pack_vision
from pixel_reasoner_jax.rollout.sampler_inputs import prompt_min_windows


@pytest.mark.parametrize(
    "name, platform, devices, target, memory",
    [
        ("v4-8", "tpu", 4, "v4:2x2x1", 32 * 2**30),
        ("v5e-4", "tpu", 4, "v5e:2x2", 16 * 2**30),
        ("v5litepod-16", "tpu", 16, "v5e:4x4", 16 * 2**30),
        ("v5p-8", "tpu", 4, "v5p:2x2x1", 95 * 2**30),
        ("v5p-16", "tpu", 8, "v5p:2x2x2", 95 * 2**30),
        ("V6E-32", "tpu", 32, "v6e:4x8", 32 * 2**30),
        ("h100-8", "gpu", 8, "1x1x8", 84942979072),
        ("h100-16", "gpu", 16, "1x2x8", 84942979072),
        ("h200-4", "gpu", 4, "1x1x4", 151397597184),
    ],
)
def test_parse_topology_forms(name, platform, devices, target, memory):
    t = tp.parse_topology(name)
    assert (t.platform, t.num_devices, t.topology, t.memory_per_chip) == (platform, devices, target, memory)
    assert t.headroom == tp.HEADROOM[platform]


def test_parse_topology_cpu_and_errors():
    t = tp.parse_topology("cpu:8")
    assert (t.platform, t.num_devices, t.topology) == ("cpu", 8, "")
    for bad, says in [
        ("v5p-6", "v5p-6"),  # 3 chips: no such slice
        ("v5p-9", "TensorCores"),
        ("v6e-12", "v6e-12"),
        ("h100-12", "whole 8-GPU nodes"),
        ("a100-8", "'a100'"),
        ("tpu", "'tpu'"),
        ("cpu:0", "cpu:0"),
        ("", "non-empty"),
    ]:
        with pytest.raises(tp.TopologyError, match=says):
            tp.parse_topology(bad)


def test_cudnn_attention_primitive_names_are_the_ones_jax_defines():
    """Remat "dots_attention" and the FLOP counter find cuDNN attention by primitive name; a rename in JAX
    would make both miss the kernel without an error (the policy would turn into "dots")."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # reason: where JAX binds them, no GPU

    defined = {v.name for v in vars(cudnn).values() if isinstance(v, jex_core.Primitive)}
    assert set(layers.CUDNN_ATTENTION_FWD + layers.CUDNN_ATTENTION_BWD) <= defined, sorted(defined)


def test_offloaded_bytes_count_against_the_host_budget():
    """Residuals that remat "offload_*" keeps on the host are read from XLA's host memory space and must fit
    half of the device's share of host RAM (an 8-GPU H100 node: 1,872 GB); device bytes keep their budget."""
    h100 = programs.Target(tp.parse_topology("h100-8"), [None] * 8)
    assert h100.host_budget == int(1872 * 10**9 // 8 * tp.HOST_OFFLOAD_SHARE)
    assert programs.Target(tp.parse_topology("v5p-16"), [None] * 8).host_budget == 448 * 10**9 // 8
    assert h100.fits(h100.budget, h100.host_budget) and not h100.fits(h100.budget, h100.host_budget + 1)
    assert not h100.fits(h100.budget + 1, 0)
    cpu = programs.Target(tp.parse_topology("cpu:8"), [None] * 8)
    assert cpu.host_budget == 0 and cpu.fits(cpu.budget, 2**40)  # a CPU counts host bytes in its total

    sizes = dict(argument=100, output=40, alias=30, temp=500)
    analysis = {f"{k}_size_in_bytes": v for k, v in sizes.items()}
    analysis.update({f"host_{k}_size_in_bytes": v // 10 for k, v in sizes.items()}, peak_memory_in_bytes=700)

    class Compiled:
        def memory_analysis(self):
            return type("Analysis", (), analysis)()

    got = programs.memory(Compiled(), "gpu")
    assert got["peak_bytes"] == 700 and got["temp_bytes"] == 500
    assert got["host_bytes"] == 10 + 4 - 3 + 50


def _abstract(model_fn):
    with sharding.use_mesh(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        return nnx.eval_shape(model_fn)


def _layer_flops(cfg, b, t):
    """Analytic forward matmul FLOPs of one decoder layer with dense attention (full T x T scores)."""
    x = cfg.text
    d, n, k, h, i = (
        x.hidden_size,
        x.num_attention_heads,
        x.num_key_value_heads,
        x.head_dim,
        x.intermediate_size,
    )
    proj = d * n * h + 2 * d * k * h + n * h * d + 3 * d * i
    return 2 * b * t * proj + 2 * 2 * b * n * t * t * h


def test_flops_extrapolate_over_scanned_layers():
    # XLA counts a scan body once; the jaxpr count multiplies it by the trip count, so adding a layer adds
    # exactly one layer's analytic FLOPs, and every layer counts (not just the first).
    b, t = 2, 32

    def count(layers):
        cfg = dataclasses.replace(
            PRESETS["tiny"], text=dataclasses.replace(PRESETS["tiny"].text, num_hidden_layers=layers)
        )
        model = _abstract(lambda: Qwen25VL(cfg, attention="dense", rngs=nnx.Rngs(0)))
        gdef, state = nnx.split(model)
        ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
        pos = jax.ShapeDtypeStruct((3, b, t), jnp.int32)

        def fwd(state, ids, pos):
            return nnx.merge(gdef, state).hidden_states(ids, pos, jnp.ones(ids.shape, jnp.int32))[0]

        return fl.jaxpr_flops(jax.make_jaxpr(fwd)(state, ids, pos)), cfg

    c1, cfg = count(1)
    c2, _ = count(2)
    c4, _ = count(4)
    assert c2 - c1 == _layer_flops(cfg, b, t)
    assert c4 == c1 + 3 * (c2 - c1)
    # A one-layer decoder without vision inputs is that layer alone (embeddings are gathers, no FLOPs).
    assert c1 == _layer_flops(cfg, b, t)


def test_flops_while_and_cond():
    def f(x, w):
        x = jax.lax.cond(x.sum() > 0, lambda: x @ w @ w, lambda: x @ w)
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1] @ w), (0, x))[1]

    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    w = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    one = 2 * 4 * 8 * 8
    assert fl.jaxpr_flops(jax.make_jaxpr(f)(x, w), while_trips=3) == 2 * one + 3 * one


def test_flops_pallas_kernel_counts_its_body_per_grid_cell():
    from jax.experimental import pallas as pl  # reason: only this test builds a Pallas kernel

    def kernel(x_ref, w_ref, o_ref):
        o_ref[...] = x_ref[...] @ w_ref[...]

    def f(x, w):
        return pl.pallas_call(
            kernel,
            grid=(2, 3),
            in_specs=[pl.BlockSpec((8, 16), lambda i, j: (i, 0)), pl.BlockSpec((16, 8), lambda i, j: (0, j))],
            out_specs=pl.BlockSpec((8, 8), lambda i, j: (i, j)),
            out_shape=jax.ShapeDtypeStruct((16, 24), jnp.float32),
            interpret=True,
        )(x, w)

    x = jax.ShapeDtypeStruct((16, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((16, 24), jnp.float32)
    assert fl.jaxpr_flops(jax.make_jaxpr(f)(x, w)) == 2 * 16 * 16 * 24  # the whole (16, 24) product


def test_flops_splash_counts_the_tiles_its_mask_runs():
    # Splash's forward (QK, PV), dKV (4 products) and dQ (3) kernels over 4 x 4 tiles of 256: all 16 run
    # under a full mask, the 10 on and below the diagonal under a causal one (tables read off the trace).
    from pixel_reasoner_jax.models.splash import splash_attention  # reason: Pallas TPU import, this test only

    q = jax.ShapeDtypeStruct((2, 1024, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
    product = 2 * 2 * 4 * 1024 * 1024 * 128
    for causal, share in ((False, 1.0), (True, 10 / 16)):

        def loss(q, k, v, s, causal=causal):
            return splash_attention(q, k, v, s, s, causal=causal, block=256).astype(jnp.float32).sum()

        traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg)
        assert fl.jaxpr_flops(traced.jaxpr) == pytest.approx(9 * share * product, rel=1e-3)


def test_flops_cudnn_attention_counts_the_causal_triangle_under_its_causal_mask_type():
    # cuDNN's fused attention cannot be traced without a GPU: a stand-in primitive with its name and its
    # mask_type parameter. 2 products forward over (T, S) = (1024, 1024): all 8 x 8 tiles of 128 under a
    # dense mask, the 36 on and below the diagonal under CAUSAL / PADDING_CAUSAL (`is_causal`).
    from jax._src.cudnn.fused_attention_stablehlo import MaskType  # reason: the enum JAX binds, no GPU

    prim = jex_core.Primitive(fl._CUDNN_FWD[1])
    prim.def_abstract_eval(lambda q, k, v, **params: q)
    q = jax.ShapeDtypeStruct((2, 1024, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16)
    product = 2 * 2 * 4 * 1024 * 1024 * 128
    for mask_type, share in (
        (MaskType.NO_MASK, 1.0),
        (MaskType.CAUSAL, 36 / 64),
        (MaskType.PADDING_CAUSAL, 36 / 64),
    ):
        traced = jax.make_jaxpr(lambda q, k, v, m=mask_type: prim.bind(q, k, v, mask_type=m))(q, kv, kv)
        assert fl.jaxpr_flops(traced) == pytest.approx(2 * share * product, rel=1e-9)


def test_prefill_patches_is_the_sampler_worst_call():
    # 128 prompts of at most 512 patches fit the 65,536-row limit together and pad to the smallest bucket;
    # one prompt of the largest bucket goes alone (its call padded to one row per shard).
    buckets = (4096, 8192, 16384, 32768, 65536)
    assert programs.prefill_patches(buckets, rows=128, shards=8) == 4096
    assert programs.prefill_patches(buckets, rows=8, shards=8) == 65536
    assert programs.prefill_patches(buckets, rows=16, shards=8) == 32768
    assert programs.prefill_patches(buckets, rows=128, shards=1) == 4096


def test_flops_scan_over_constant_flags_counts_the_branch_each_layer_takes():
    # The vision tower's layer scan: a cond on a per-layer constant flag (full vs windowed attention)
    # counts the branch each layer runs, under grad too (not the larger branch for every layer).
    def f(x, w):
        def layer(x, full):
            return jax.lax.cond(full, lambda: x @ w @ w, lambda: x @ w), None

        return jax.lax.scan(layer, x, jnp.asarray((False, True, False)))[0].sum()

    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    w = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    one = 2 * 4 * 8 * 8
    assert fl.jaxpr_flops(jax.make_jaxpr(f)(x, w)) == 4 * one
    # Backward: the full layer's two products each give dX and dW (4), a windowed layer's one gives 2.
    assert fl.jaxpr_flops(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w)) == 4 * one + (4 + 2 + 2) * one


def test_flops_shard_map_body_counts_once_per_device():
    # Splash runs in shard_map: its body's shapes are one device's, the count stays global.
    mesh = jax.make_mesh((8,), ("fsdp",), devices=jax.devices()[:8])
    x = jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=jax.NamedSharding(mesh, P("fsdp")))
    w = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=jax.NamedSharding(mesh, P()))
    f = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("fsdp"), P()), out_specs=P("fsdp"))
    assert fl.jaxpr_flops(jax.make_jaxpr(f)(x, w)) == 2 * 16 * 8 * 8


def test_largest_image_is_what_episodes_and_sft_hold():
    # GRPO: query images at most data.image_max_pixels (2000 * 784: 8,000 patches), not the model view's
    # 5120 * 784 cap, which only shrinks larger ones; SFT: its processor's cap.
    grpo = grpo_config.get_config("7b")
    assert programs.largest_image_pixels(from_config_dict(grpo)) == 2000 * 28 * 28
    assert programs.largest_image_pixels(from_config_dict(sft_config.get_config("7b"))) == 5120 * 28 * 28
    grpo.rollout.model_max_pixels = 1000 * 28 * 28
    assert programs.largest_image_pixels(from_config_dict(grpo)) == 1000 * 28 * 28


def test_vision_structs_fill_the_patch_bucket():
    # Square images as large as the pixel cap allows (64 patches: 8 x 8), the last one taking the rows
    # left over (1000 = 15 x 64 + 40): the vision tower runs exactly the bucket's rows, per sample, in the
    # layout pack_vision gives real samples (the sampler's with its window floor and one full-attention slot).
    cfg = PRESETS["tiny"]
    for bucket in (1024, 1000):
        for floor in (False, True):
            pv, vi = programs.vision_structs(cfg, 3, bucket, 64 * programs.PIXELS_PER_PATCH, prompt=floor)
            assert pv.shape == (3, bucket, cfg.vision.patch_dim) and pv.dtype == jnp.float32
            grids = np.array([(1, 8, 8)] * 15 + ([(1, 2, 20)] if bucket == 1000 else [(1, 8, 8)]))
            real_pv, real_vi = pack_vision(
                [np.zeros((bucket, cfg.vision.patch_dim), np.float32)] * 3, [grids] * 3, cfg.vision,
                patch_buckets=(bucket,), min_windows=prompt_min_windows(cfg.vision, bucket) if floor else 1,
                one_slot=floor,
            )  # fmt: skip
            assert pv.shape == real_pv.shape
            got = jax.tree.map(lambda x: (x.shape, x.dtype), vi)
            assert got == jax.tree.map(lambda x: (x.shape, x.dtype), real_vi)


@pytest.fixture(scope="module")
def tiny_plan():
    c = sft_config.get_config("tiny")
    # Small text-only batches keep the compile short (the vision tower's programs drop out; its weights stay
    # in the train state, which is what the hand count checks); the mesh is FSDP over the 8 devices
    # (tests/conftest.py); dense attention is the smallest program.
    c.data.max_seq_len = 64
    c.data.seq_buckets = (64,)
    c.sft.batch_size = 8
    c.sft.micro_batches = 1
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.model.attention = "dense"
    # Optimisation level 0 compiles 2-3x faster on CPU; buffer arguments and outputs are the same.
    fast = {"xla_backend_optimization_level": 0}
    return cli.make_plan(
        from_config_dict(c), tp.parse_topology("cpu:8"), log=lambda s: None, compiler_options=fast,
        text_only=True,
    )  # fmt: skip


def test_cpu_plan_of_tiny_sft(tiny_plan):
    p = json.loads(json.dumps(tiny_plan))  # JSON-ready
    assert p["topology"] == "cpu:8" and p["devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert p["memory_per_device_bytes"] > 0 and p["shapes"]["patches"] == 0
    for name in ("grads", "update"):
        prog = p["programs"][name]
        for key in ("argument_bytes", "output_bytes", "peak_bytes", "total_bytes"):
            assert prog[key] > 0, (name, key, prog[key])
        assert prog["fits"] is True and prog["total_bytes"] == prog["peak_bytes"] + prog["resident_bytes"]
    assert p["programs"]["grads"]["temp_bytes"] > 0
    assert p["programs"]["update"]["flops"] == 0  # the optimizer update has no matmul
    # 6·N·T with N the decoder's matmul weights and T the step's 8 x 64 tokens, per device; the compiled
    # count adds attention and the forward the backward repeats for the log-probs, never less.
    assert p["programs"]["grads"]["model_flops"] == 6 * p["params"]["text_matmul"] * 8 * 64 / 8
    assert p["programs"]["grads"]["flops"] > p["programs"]["grads"]["model_flops"] > 0
    assert p["programs"]["grads"]["vision_flops"] == 0
    assert p["fits"] is True and p["attention"] == "dense"
    # The step's peak: the larger of the two programs' totals (their own peaks and the state they leave out).
    assert p["programs"]["step"]["peak_bytes"] == max(
        p["programs"][k]["peak_bytes"] + p["programs"][k]["unused_state_bytes"] for k in ("grads", "update")
    )
    assert "step" in cli.table(tiny_plan)


def test_cpu_plan_fits_against_the_budget(tiny_plan):
    # A program fits when its total (its peak + what the other phase keeps resident) is within the memory
    # less the headroom; the plan fits when every program does.
    budget = tiny_plan["budget_per_device_bytes"]
    assert budget == int(tiny_plan["memory_per_device_bytes"] * (1 - tiny_plan["headroom"]))
    for name, prog in tiny_plan["programs"].items():
        assert prog["fits"] is (prog["total_bytes"] <= budget), name
    assert tiny_plan["fits"] is all(p["fits"] for p in tiny_plan["programs"].values())


def test_cpu_plan_arguments_match_hand_count(tiny_plan):
    # Hand count of the update program's arguments: float32 params (4 B), Adam mu and nu (8 B) for the
    # trainable ones (SFT freezes the vision tower: no moments there), the float32 gradient accumulator
    # (4 B) of the trainable ones, split over the 8 FSDP devices. Small leaves (norm scales, biases) and
    # dimensions that do not divide by 8 stay replicated, so allow a few KiB over the even split; the
    # scalars (step, Adam count, PRNG key, loss totals) are bytes.
    cfg = PRESETS["tiny"]
    model = _abstract(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0)))
    params = nnx.split(model, nnx.Param, ...)[1]
    total = fl.count_params(params)
    vision = total - fl.count_params(params, skip=("visual",))
    assert tiny_plan["params"]["total"] == total
    # jit drops unused arguments: the frozen parameters' gradients never reach the update program.
    hand = (4 * total + 8 * (total - vision) + 4 * (total - vision)) / 8
    args = tiny_plan["programs"]["update"]["argument_bytes"]
    assert hand <= args <= hand + 64 * 1024, (args, hand)
    # The gradient program of a text-only batch takes the decoder's parameters and the batch shard only
    # (jit drops the unused Adam moments and the vision tower's weights): 8 rows x 64 tokens of int32 /
    # float32 / bool columns are a few KiB per device.
    text = 4 * (total - vision) / 8
    assert text < tiny_plan["programs"]["grads"]["argument_bytes"] < text + 2**20
    # What it leaves out stays allocated all the while, beside its own peak: Adam's moments and the vision
    # tower's weights (the update program takes the whole state).
    left_out = (8 * (total - vision) + 4 * vision) / 8
    grads = tiny_plan["programs"]["grads"]
    assert left_out <= grads["unused_state_bytes"] <= left_out + 64 * 1024, (
        grads["unused_state_bytes"],
        left_out,
    )
    assert grads["resident_bytes"] == grads["unused_state_bytes"]  # no sampler in SFT
    assert tiny_plan["programs"]["update"]["unused_state_bytes"] == 0


def test_plans_table_keys_keep_the_cpu_device_count():
    from benchmarks.plans import split_key

    assert split_key("grpo:7b:cpu:8") == ("grpo", "7b", "cpu:8")
    assert split_key("sft:3b:cpu:8:dots") == ("sft", "3b", "cpu:8")
    assert split_key("grpo:7b:h100-8:chunk12288") == ("grpo", "7b", "h100-8")
    assert split_key("sft:3b:v5p-8") == ("sft", "3b", "v5p-8")


def test_recount_adds_the_left_out_state_to_an_older_plan():
    # An older plan's JSON (no host columns, no unused state): the optimizer state goes into the gradient
    # and log-prob programs' totals, the step is rebuilt from them, and the verdicts follow the budget.
    gib = 2**30
    plan = {
        "platform": "gpu",
        "budget_per_device_bytes": 60 * gib,
        "sampler_weight_bytes_per_device": 8 * gib,
        "programs": {
            "grads": {"peak_bytes": 44 * gib, "resident_bytes": 8 * gib, "total_bytes": 52 * gib,
                      "flops": 3.0, "model_flops": 2.0, "fits": True},
            "update": {"peak_bytes": 15 * gib, "resident_bytes": 8 * gib, "total_bytes": 23 * gib,
                       "flops": 0.0, "model_flops": 0.0, "fits": True},
            "logprobs": {"peak_bytes": 12 * gib, "resident_bytes": 8 * gib, "total_bytes": 20 * gib,
                         "fits": True},
            "prefill": {"peak_bytes": 40 * gib, "resident_bytes": 12 * gib, "total_bytes": 52 * gib,
                        "fits": True},
        },
    }  # fmt: skip
    out = programs.recount_unused_state(plan, 8 * gib)
    g, lp, step = out["programs"]["grads"], out["programs"]["logprobs"], out["programs"]["step"]
    assert (g["total_bytes"], g["resident_bytes"], g["fits"]) == (60 * gib, 16 * gib, True)
    assert (lp["total_bytes"], lp["unused_state_bytes"]) == (28 * gib, 8 * gib)
    assert out["programs"]["update"]["total_bytes"] == 23 * gib  # takes the whole state already
    assert out["programs"]["prefill"]["total_bytes"] == 52 * gib  # the train state was counted there
    assert (step["total_bytes"], step["peak_bytes"], step["flops"]) == (60 * gib, 52 * gib, 3.0)
    assert out["fits"] is True and out["unused_state_recounted"] is True
    out = programs.recount_unused_state(
        json.loads(json.dumps(plan)) | {"budget_per_device_bytes": 59 * gib}, 0
    )
    assert out["fits"] is False and out["programs"]["step"]["fits"] is False
