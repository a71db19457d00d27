"""Materialised layouts for XLA CPU's fast matmul path, shared by the layers and the CPU kernels.

XLA CPU runs a product fastest when both operands are row-major in the order the product reads them. A
transpose written in JAX is usually folded back into the product that reads it (turning that product into
the slow, non-row-major form); these helpers put the transposed array in a buffer of its own behind an
optimization barrier, so the product reads it as laid out.
"""

import jax
import jax.numpy as jnp

__all__ = ["own", "swap_last"]


def own(x: jax.Array) -> jax.Array:
    """`x` in a buffer of its own layout: keeps XLA from folding a transpose back into the product that
    reads it."""
    return jax.lax.optimization_barrier(x)


def swap_last(x: jax.Array) -> jax.Array:
    """`x` with its last two axes exchanged, materialised (`own`); for a 2-D array, x.T."""
    return own(jnp.swapaxes(x, -1, -2))
