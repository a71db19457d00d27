"""Chunked token log-probs / entropy: equal to the unchunked computation, and never hold B x T x V."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixel_reasoner_jax.models.config import PRESETS
from pixel_reasoner_jax.models.qwen25vl import Qwen25VL, token_logprobs

CFG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def parts():
    with nnx.use_eager_sharding(False):
        model = Qwen25VL(CFG, rngs=nnx.Rngs(0))
    return nnx.split(model)


def _reference(model, hidden, targets, temperature):
    logits = model.logits(hidden) / temperature
    logp = jax.nn.log_softmax(logits, -1)
    lp = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return lp, -jnp.sum(jnp.exp(logp) * logp, -1)


@pytest.mark.parametrize("chunk,temperature", [(16, 1.0), (24, 0.7), (1000, 1.3)])
def test_chunked_equals_unchunked(parts, chunk, temperature):
    graphdef, params = parts
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 50, CFG.text.hidden_size)), jnp.float32)  # 50: ragged last chunk
    targets = jnp.asarray(rng.integers(0, CFG.text.vocab_size, (2, 50)), jnp.int32)

    def both(p, h):
        m = nnx.merge(graphdef, p)
        return token_logprobs(m, h, targets, temperature=temperature, chunk=chunk), _reference(m, h, targets, temperature)

    (lp, ent), (lp_ref, ent_ref) = jax.jit(both)(params, hidden)
    assert lp.shape == ent.shape == (2, 50) and lp.dtype == jnp.float32
    np.testing.assert_allclose(lp, lp_ref, atol=1e-5, rtol=0)
    # Entropy is a 152k-term float32 sum of magnitude log(V) = 11.9, whose reduction order differs between
    # the two programs: allow 1e-6 relative on top of the 1e-5 absolute (ulp(12) is 1e-6).
    np.testing.assert_allclose(ent, ent_ref, atol=1e-5, rtol=1e-6)

    # Gradients (through the rematerialised chunks) agree as well.
    w = jnp.asarray(rng.standard_normal((2, 50)), jnp.float32)

    def loss(p, h, fn):
        m = nnx.merge(graphdef, p)
        a, b = fn(m, h)
        return jnp.sum(w * a) + jnp.sum(w * b)

    chunked = lambda m, h: token_logprobs(m, h, targets, temperature=temperature, chunk=chunk)
    ref = lambda m, h: _reference(m, h, targets, temperature)
    g1 = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, hidden, chunked)
    g2 = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, hidden, ref)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_backward_never_materialises_full_logits(parts):
    """Compiled temp memory of value-and-grad: the unchunked version needs >= B*T*V float32 scratch; the
    chunked one needs a few (B, chunk, V) buffers, well under half of that."""
    graphdef, params = parts
    b, t, chunk = 2, 256, 32
    full_bytes = b * t * CFG.text.vocab_size * 4
    hidden = jnp.ones((b, t, CFG.text.hidden_size), jnp.float32)
    targets = jnp.zeros((b, t), jnp.int32)

    def temp_bytes(c):
        def f(p, h):
            lp, ent = token_logprobs(nnx.merge(graphdef, p), h, targets, chunk=c)
            return lp.sum() + ent.sum()

        return jax.jit(jax.grad(f, argnums=(0, 1))).lower(params, hidden).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(t) >= full_bytes
    assert temp_bytes(chunk) < 0.6 * full_bytes


def test_bad_temperature(parts):
    graphdef, params = parts
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(nnx.merge(graphdef, params), jnp.ones((1, 2, 64)), jnp.zeros((1, 2), jnp.int32), temperature=0.0)
