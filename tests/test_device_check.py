"""benchmarks/device_check.py's parts that need no accelerator: the batch it feeds the plan's programs, the
plan beside a measurement and its table, and the random train state it measures with."""

import jax
import numpy as np
import optax
from flax import nnx

from benchmarks import device_check as dc
from configs import grpo as grpo_config
from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.config import from_config_dict
from pixel_reasoner_jax.models.layers import Linear
from pixel_reasoner_jax.plan import programs
from pixel_reasoner_jax.train import state as st

GIB = 2**30


def test_micro_arrays_are_the_plan_batch_with_real_image_pads():
    cfg = from_config_dict(grpo_config.get_config("tiny"))
    mcfg = programs.model_config(cfg)
    shapes = programs.Shapes(n_micro=2, batch=3, seq=128, patches=256, loss_positions=128)
    max_px = 64 * programs.PIXELS_PER_PATCH
    micro = dc.micro_arrays(mcfg, shapes, max_px)
    structs = programs.micro_structs(mcfg, shapes, max_px)
    got = jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), micro)
    assert got == jax.tree.map(lambda x: (x.shape, np.dtype(x.dtype)), structs)
    # Every sample holds as many image pads as its vision rows merge into, none of them trained.
    merged = int(programs.vision_layout(mcfg, 256, max_px, prompt=False).num_merged)
    pads = micro["input_ids"] == mcfg.image_token_id
    assert merged > 0 and (pads.sum(-1) == merged).all()
    assert (micro["loss_mask"][pads] == 0).all() and (micro["loss_mask"][~pads] == 1).all()
    np.testing.assert_array_equal(micro["targets"][..., :-1], micro["input_ids"][..., 1:])
    assert (micro["input_ids"][~pads] < mcfg.text.vocab_size).all()
    assert micro["pixel_values"].std() > 0.5  # random pixels, not zeros


def _plan(**programs_):
    return {"topology": "h200-1", "jax": "0.10.2", "programs": programs_}


def test_plan_beside_a_step_counts_the_state_its_programs_leave_out():
    step = {"what": "step", "mode": "sft", "variant": "3b", "device": "NVIDIA H200", "step_s": 2.0,
            "shapes": {"n_micro": 2, "batch": 1, "seq": 8192, "patches": 4096}, "mfu": 0.144,
            "memory": {"peak_bytes_in_use": 64 * GIB}}  # fmt: skip
    plan = _plan(
        grads={"peak_bytes": 40 * GIB, "unused_state_bytes": 24 * GIB, "flops": 4e14, "fits": True},
        update={"peak_bytes": 48 * GIB, "unused_state_bytes": 0, "flops": 0.0, "fits": True},
        step={"peak_bytes": 64 * GIB, "flops": 4e14, "fits": True},
    )
    out = dc.with_plan(dict(step), plan)
    assert out["plan"]["programs"]["grads"]["device_bytes"] == 64 * GIB
    assert out["peak_measured_over_planned"] == 1.0 and out["compiled_flops_per_s"] == 2e14
    row = dc.table([out]).splitlines()[1]
    assert "sft:3b step" in row and "14.4%" in row and row.split()[-2:] == ["64.0", "1.00"]


def test_plan_beside_generate_takes_the_larger_sampler_program():
    decode = {"what": "decode", "mode": "grpo", "variant": "7b", "device": "NVIDIA H200", "rows": 64,
              "prompt_tokens": 2032, "new_tokens": 512, "decode_s": 10.0, "decode_tokens_per_s": 3276.8,
              "memory": {"peak_bytes_in_use": 44 * GIB}}  # fmt: skip
    plan = _plan(prefill={"peak_bytes": 40 * GIB}, decode={"peak_bytes": 20 * GIB}, grads={"peak_bytes": 99})
    out = dc.with_plan(dict(decode), plan)
    assert set(out["plan"]["programs"]) == {"prefill", "decode"}
    assert out["peak_measured_over_planned"] == 1.1 and "compiled_flops_per_s" not in out
    assert dc.table([out]).splitlines()[1].split()[-4:] == ["3277", "44.0", "40.0", "1.10"]


class _TwoLayers(nnx.Module):
    """A model small enough to compile in a second, with the real layers' logical axis names."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = Linear((16,), (32,), names=("embed", "mlp"), bias_names=("mlp",), rngs=rngs)
        self.down = Linear((32,), (16,), names=("mlp", "embed"), rngs=rngs)


def test_random_train_state_is_laid_out_as_the_abstract_one():
    mesh = sharding.make_mesh(1, 4, 2)
    optimizer = optax.adamw(1e-3)
    model_fn = lambda: _TwoLayers(nnx.Rngs(0))  # noqa: E731
    _, abstract, shardings = st.abstract_train_state(model_fn, optimizer, mesh)
    state = st.random_train_state(model_fn, optimizer, shardings, mesh)
    same = jax.tree.map(
        lambda a, x: (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding), abstract, state
    )
    assert all(jax.tree.leaves(same))
    kernel = state.params["up"]["kernel"]
    assert tuple(kernel.sharding.spec) == ("fsdp", "tensor")  # laid out over the mesh, not on one device
    assert float(np.std(np.asarray(kernel))) > 0  # initialised, not zeros
    mu = jax.tree.leaves(state.opt_state[0].mu)
    assert mu and all(not np.asarray(m).any() for m in mu)  # a fresh optimizer's moments
