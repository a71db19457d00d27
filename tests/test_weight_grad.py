"""How weight gradients are formed (models/layers.py WEIGHT_GRADS): "transposed" gives autodiff's values,
and on XLA's CPU backend it moves every weight-gradient product into the fast GEMM library's fusions."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixel_reasoner_jax.models.layers import Linear, resolve_weight_grad, set_weight_grad


def test_auto_is_transposed_on_cpu_only():
    assert resolve_weight_grad("auto", "cpu") == "transposed"
    assert resolve_weight_grad("auto", "gpu") == "xla"
    assert resolve_weight_grad("auto", "tpu") == "xla"
    assert resolve_weight_grad("auto") == "transposed"  # the tests run on CPU
    assert resolve_weight_grad("xla", "cpu") == "xla"
    assert resolve_weight_grad("transposed", "tpu") == "transposed"
    with pytest.raises(ValueError, match="weight_grad must be one of"):
        resolve_weight_grad("fast")


class _Block(nnx.Module):
    """The decoder's kernel shapes: one input axis to two output axes (q), two to one (o), with a bias."""

    def __init__(self, rngs):
        self.q = Linear(
            (16,), (4, 8), names=("embed", "heads", "head_dim"), bias_names=("heads", "head_dim"), rngs=rngs
        )
        self.o = Linear((4, 8), (16,), names=("heads", "head_dim", "embed"), rngs=rngs)
        self.up = Linear((16,), (40,), names=("embed", "mlp"), rngs=rngs)
        self.down = Linear((40,), (16,), names=("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        x = x + self.o(jnp.tanh(self.q(x)))
        return x + self.down(jax.nn.silu(self.up(x)))


def _grads(mode: str, x):
    with nnx.use_eager_sharding(False):
        block = _Block(nnx.Rngs(0))
    set_weight_grad(block, mode)
    graphdef, params = nnx.split(block)

    def loss(p, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))

    return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def test_transposed_equals_autodiff():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 16)), jnp.float32)
    f_xla, params = _grads("xla", x)
    f_t, params_t = _grads("transposed", x)
    (g_xla, gx_xla), (g_t, gx_t) = f_xla(params, x), f_t(params_t, x)
    np.testing.assert_allclose(gx_t, gx_xla, rtol=1e-6, atol=1e-7)
    flat_xla, flat_t = dict(nnx.to_flat_state(g_xla)), dict(nnx.to_flat_state(g_t))
    assert flat_xla.keys() == flat_t.keys() and len(flat_xla) == 5  # 4 kernels and a bias
    for path, g in flat_xla.items():
        np.testing.assert_allclose(flat_t[path][...], g[...], rtol=1e-6, atol=1e-7, err_msg=str(path))


def _dots_outside_ynn(hlo: str) -> int:
    """Dot ops of a compiled CPU module that no YNNPACK fusion runs (Eigen's path)."""
    ynn_bodies = set(re.findall(r'calls=(%[\w.\-]+)[^\n]*"kind":"__ynn_fusion"', hlo))
    count, current = 0, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?(%[\w.\-]+) ", line)
        if head:
            current = head.group(1)
        elif re.search(r"= \S+ dot\(", line) and current not in ynn_bodies:
            count += 1
    return count


def test_transposed_puts_every_weight_gradient_in_the_fast_gemm():
    """XLA CPU runs autodiff's x^T.g (the token axis contracted on both sides) in Eigen and row-major
    products in YNNPACK fusions: with "transposed" no product is left outside them. A JAX/XLA update that
    changes this makes the option useless (or unnecessary): this test is where that shows."""
    x = jnp.ones((1, 64, 16), jnp.float32)
    counts = {}
    for mode in ("xla", "transposed"):
        f, params = _grads(mode, x)
        counts[mode] = _dots_outside_ynn(f.lower(params, x).compile().as_text())
    # Autodiff's form leaves (at least) the 2-D kernels' gradients (up, down) to Eigen; XLA transposes an
    # operand of the 3-D ones (q, o) itself.
    assert counts["xla"] >= 2, counts
    assert counts["transposed"] == 0, counts
