"""Chunked token log-probs / entropy (models/logprobs.py and its model wrappers): equal to the unchunked
computation in values and gradients, and never hold B x T x V logits or a float32 (D, V) accumulator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixel_reasoner_jax.models.config import PRESETS
from pixel_reasoner_jax.models.logprobs import _stats, chunked_logprobs
from pixel_reasoner_jax.models.qwen25vl import Qwen25VL, indexed_token_logprobs, token_logprobs

CFG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def parts():
    with nnx.use_eager_sharding(False):
        model = Qwen25VL(CFG, rngs=nnx.Rngs(0))
    return nnx.split(model)


def _reference(model, hidden, targets, temperature):
    return _plain(hidden, model.lm_kernel(), targets, temperature)


def _plain(h, w, y, temperature):
    """The autodiff reference: full (B, T, V) log-softmax."""
    logp = jax.nn.log_softmax(jnp.einsum("BTD,DV->BTV", h, w) / temperature, -1)
    return jnp.take_along_axis(logp, y[..., None], -1)[..., 0], -jnp.sum(jnp.exp(logp) * logp, -1)


@pytest.mark.parametrize("chunk,temperature", [(16, 1.0), (24, 0.7), (1000, 1.3)])
def test_chunked_equals_unchunked(parts, chunk, temperature):
    graphdef, params = parts
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(
        rng.standard_normal((2, 50, CFG.text.hidden_size)), jnp.float32
    )  # 50: ragged last chunk
    targets = jnp.asarray(rng.integers(0, CFG.text.vocab_size, (2, 50)), jnp.int32)

    def both(p, h):
        m = nnx.merge(graphdef, p)
        return token_logprobs(m, h, targets, temperature=temperature, chunk=chunk), _reference(
            m, h, targets, temperature
        )

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

        return (
            jax.jit(jax.grad(f, argnums=(0, 1)))
            .lower(params, hidden)
            .compile()
            .memory_analysis()
            .temp_size_in_bytes
        )

    assert temp_bytes(t) >= full_bytes
    assert temp_bytes(chunk) < 0.6 * full_bytes


def test_bad_temperature(parts):
    graphdef, params = parts
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(
            nnx.merge(graphdef, params), jnp.ones((1, 2, 64)), jnp.zeros((1, 2), jnp.int32), temperature=0.0
        )


def _close(a, b):
    """1e-5 relative, with the absolute floor at 1e-5 of the array's largest entry: elements that nearly
    cancel (a gradient summing +p and -p terms) have no meaningful elementwise relative error."""
    b = np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(b).max())))


# V = 1000 with these chunks gives vocabulary tiles of 128 / 256 / 1000 columns: 1000 is no multiple of
# the first two, so the last backward tile is shifted left and overlaps its neighbour. `trained` names the
# outputs the loss differentiates: the other one is only read (a logged metric), so its cotangent reaches the
# backward rule as a symbolic zero and its term is left out there.
@pytest.mark.parametrize("trained", ["both", "lp", "ent"])
@pytest.mark.parametrize("chunk,temperature", [(4, 1.0), (7, 0.7), (64, 1.3)])
def test_kernel_equals_autodiff(chunk, temperature, trained):
    rng = np.random.default_rng(1)
    b, t, d, v = 2, 29, 16, 1000
    h = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    c_lp, c_ent = (jnp.asarray(rng.standard_normal((b, t)), jnp.float32) for _ in range(2))
    lp_on, ent_on = trained in ("both", "lp"), trained in ("both", "ent")

    def loss(fn):
        def f(h, w):
            lp, ent = fn(h, w)
            lp_g = lp if lp_on else jax.lax.stop_gradient(lp)
            ent_g = ent if ent_on else jax.lax.stop_gradient(ent)
            return jnp.sum(c_lp * lp_g) + jnp.sum(c_ent * ent_g), (lp, ent)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    ref = loss(lambda h, w: _plain(h, w, y, temperature))(h, w)
    # Both ways of forming d_W (models/layers.py WEIGHT_GRADS): autodiff's product, or h transposed once.
    for weight_grad in ("xla", "transposed"):
        ours = loss(
            lambda h, w, wg=weight_grad: chunked_logprobs(
                h, w, y, temperature=temperature, chunk=chunk, weight_grad=wg
            )
        )(h, w)
        for a, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
            _close(a, r)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in ours[1])  # the trained outputs reach h and W


def test_entropy_of_peaked_logits_stays_accurate():
    """The entropy is log s - E[z - m] / s: two terms of the logits' scale. With logits spread over tens
    (a confident model) it must still match the reference to float32 accuracy, and be 0 for a one-hot."""
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.standard_normal((1, 8, 16)) * 6, jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 500)), jnp.float32)
    y = jnp.zeros((1, 8), jnp.int32)
    lp, ent = jax.jit(lambda h, w: chunked_logprobs(h, w, y, chunk=8))(h, w)
    lp_ref, ent_ref = _plain(h, w, y, 1.0)
    assert float(jnp.abs(h @ w).max()) > 50
    _close(lp, lp_ref)
    np.testing.assert_allclose(ent, ent_ref, atol=2e-5, rtol=1e-5)
    one_hot = jnp.zeros((1, 1, 2), jnp.float32).at[0, 0, 0].set(1e4)
    ent_one = chunked_logprobs(one_hot, jnp.eye(2, 3, dtype=jnp.float32), jnp.zeros((1, 1), jnp.int32))[1]
    assert float(ent_one[0, 0]) == 0.0


def test_stats_over_the_real_vocabulary_match_float64():
    """Sums over 151,936 float32 terms (Qwen2's vocabulary): logsumexp and entropy within 1e-6 relative of
    a float64 reference (a scalar sequential float32 sum of this length is off by ~2e-5)."""
    rng = np.random.default_rng(4)
    z = (rng.standard_normal((4, 151_936)) * 3).astype(np.float32)
    z[:, :16] += 12.0  # a few confident tokens, as trained models have
    lse, ent = jax.jit(_stats)(jnp.asarray(z))
    z64 = z.astype(np.float64)
    lse64 = np.log(np.exp(z64 - z64.max(-1, keepdims=True)).sum(-1)) + z64.max(-1)
    p64 = np.exp(z64 - lse64[:, None])
    ent64 = -(p64 * np.log(p64)).sum(-1)
    np.testing.assert_allclose(lse, lse64, rtol=1e-6)
    np.testing.assert_allclose(ent, ent64, rtol=1e-6)


def test_indexed_equals_full_at_listed_positions(parts):
    """Listed valid positions carry token_logprobs' values; every other position reads 0 and gets no
    gradient (unused slots may point anywhere, even at a trained position)."""
    graphdef, params = parts
    rng = np.random.default_rng(2)
    b, t = 2, 12
    hidden = jnp.asarray(rng.standard_normal((b, t, CFG.text.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, CFG.text.vocab_size, (b, t)), jnp.int32)
    index = jnp.asarray([[1, 4, 5, 9, 4], [0, 11, 3, 3, 3]], jnp.int32)
    valid = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
    listed = np.zeros((b, t), bool)
    listed[0, [1, 4, 5, 9]] = listed[1, [0, 11, 3]] = True

    def both(p, h):
        m = nnx.merge(graphdef, p)
        full = token_logprobs(m, h, targets, temperature=0.8, chunk=4)
        idx = indexed_token_logprobs(m, h, targets, index, valid, temperature=0.8, chunk=2)
        return full, idx

    (lp, ent), (lp_i, ent_i) = jax.jit(both)(params, hidden)
    _close(np.where(listed, lp_i, 0), np.where(listed, lp, 0))
    _close(np.where(listed, ent_i, 0), np.where(listed, ent, 0))
    assert not np.any(np.asarray(lp_i)[~listed]) and not np.any(np.asarray(ent_i)[~listed])

    def loss(h):
        lp, ent = indexed_token_logprobs(nnx.merge(graphdef, params), h, targets, index, valid, chunk=3)
        return jnp.sum(lp) + jnp.sum(ent)

    g = np.asarray(jax.jit(jax.grad(loss))(hidden))
    assert not np.any(g[~listed]) and np.all(np.abs(g[listed]).sum(-1) > 0)


def test_backward_keeps_no_float32_vocab_accumulator():
    """A token-chunked backward pass accumulates d_W in a float32 (D, V) buffer; the vocabulary-tiled one
    writes each tile's columns once, so its scratch stays well under that size when D x V dominates."""
    b, t, d, v, chunk = 1, 64, 256, 32768, 8
    acc_bytes = d * v * 4

    def f(h, w, y):
        lp, ent = chunked_logprobs(h, w, y, chunk=chunk)
        return lp.sum() + ent.sum()

    args = (
        jax.ShapeDtypeStruct((b, t, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
    )
    temp = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < 0.5 * acc_bytes
