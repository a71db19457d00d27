"""The in-process sampler's weight copy (`rollout.sampler_param_dtype`): new buffers in the sampler's dtype,
and with bf16 compute a bf16 copy gives the model's outputs bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixel_reasoner_jax.models import hf_io
from pixel_reasoner_jax.train.policies import sampler_copy


def test_sampler_copy_casts_floats_into_new_buffers():
    params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7, "n": jnp.arange(3, dtype=jnp.int32)}
    same = sampler_copy(params, "float32")
    half = sampler_copy(params, "bfloat16")
    assert same["w"].dtype == jnp.float32 and half["w"].dtype == jnp.bfloat16
    assert half["n"].dtype == jnp.int32  # only floating leaves change dtype
    np.testing.assert_array_equal(same["w"], params["w"])
    np.testing.assert_array_equal(half["w"], params["w"].astype(jnp.bfloat16))
    # New buffers every time: the train step donates the originals.
    for copy in (same, half):
        for k in params:
            assert copy[k] is not params[k]
            assert copy[k].unsafe_buffer_pointer() != params[k].unsafe_buffer_pointer()


def test_bf16_copy_matches_float32_weights_under_bf16_compute(tiny_ckpt):
    # Every layer casts its weights to the compute dtype before use, so a bf16 copy changes nothing the
    # sampler computes when model.dtype is bfloat16 (the 3B/7B recipes).
    model = hf_io.load_model(tiny_ckpt, dtype=jnp.bfloat16)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.array([[3, 17, 4242, 151000, 9, 0]], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (3, 1, 6))
    mask = jnp.array([[1, 1, 1, 1, 1, 0]], jnp.int32)

    @jax.jit
    def logits(p):
        return nnx.merge(graphdef, p, rest)(ids, pos, mask)

    half = sampler_copy(params, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(logits(half), logits(params))
