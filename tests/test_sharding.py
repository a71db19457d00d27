"""Mesh construction, rules tables, and the logical constraint helper on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pixel_reasoner_jax import sharding


@pytest.mark.parametrize("role", ["train", "rollout"])
def test_rules_name_every_logical_axis_once(role):
    sharding.check_rules(sharding.RULES[role])
    names = [n for n, _ in sharding.RULES[role]]
    assert sorted(names) == sorted(sharding.LOGICAL_AXES)


def test_check_rules_rejects_missing_and_unknown():
    rules = tuple(r for r in sharding.TRAIN_RULES if r[0] != "embed")
    with pytest.raises(ValueError, match="missing \\['embed'\\]"):
        sharding.check_rules(rules)
    with pytest.raises(ValueError, match="names no mesh axis"):
        sharding.check_rules(rules + (("embed", "model"),))


@pytest.mark.parametrize(
    "sizes,n,want",
    [
        ((1, -1, 1), 8, (1, 8, 1)),
        ((2, 2, 2), 8, (2, 2, 2)),
        ((2, -1, 2), 8, (2, 2, 2)),
        ((-1, 4, 1), 8, (2, 4, 1)),
    ],
)
def test_resolve_mesh_shape(sizes, n, want):
    assert sharding.resolve_mesh_shape(*sizes, n) == want


@pytest.mark.parametrize("sizes", [(3, -1, 1), (2, 2, 1), (-1, -1, 1), (0, 8, 1)])
def test_resolve_mesh_shape_errors(sizes):
    with pytest.raises(ValueError, match="mesh"):
        sharding.resolve_mesh_shape(*sizes, 8)


class _Toy(nnx.Module):
    def __init__(self, rngs):
        init = jax.random.normal(rngs.params(), (16, 8))
        self.w = nnx.Param(init, out_sharding=("embed", "mlp"))


def test_state_shardings_follow_rules():
    mesh = sharding.make_mesh(2, 2, 2)
    with nnx.use_eager_sharding(False):
        state = nnx.state(_Toy(nnx.Rngs(0)))
    train = sharding.state_shardings(state, mesh, "train")
    assert train["w"].get_value().spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    rollout = sharding.state_shardings(state, mesh, "rollout")
    assert rollout["w"].get_value().spec == jax.sharding.PartitionSpec(None, "tensor")
    assert sharding.check_divisible(state, {"data": 2, "fsdp": 3, "tensor": 2}) == [
        "w: dim 16 on ('fsdp',) (size 3)"
    ]


def test_constrain_places_activation_and_is_noop_on_one_device():
    x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
    mesh = sharding.make_mesh(2, 2, 2)
    with sharding.use_mesh(mesh, "train"):
        y = jax.jit(lambda a: sharding.constrain(a * 2, ("act_batch", "act_mlp")))(x)
    assert y.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with sharding.use_mesh(one, "train"):
        assert sharding.constrain(x, ("act_batch", "act_mlp")) is x
    with pytest.raises(ValueError, match="rank"):
        with sharding.use_mesh(mesh, "train"):
            sharding.constrain(x, ("act_batch",))


@pytest.mark.parametrize(
    "role, want",
    [("train", P("data", None, "fsdp")), ("rollout", P(("data", "fsdp")))],
)
def test_constrain_lookup_splits_batch_over_the_axes_the_width_leaves(role, want):
    x = jnp.ones((8, 3, 8), jnp.float32)
    with sharding.use_mesh(sharding.make_mesh(2, 4, 1), role):
        y = jax.jit(lambda a: sharding.constrain_lookup(a + 1))(x)
    assert y.sharding.spec == want
    with sharding.use_mesh(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]), role):
        assert sharding.constrain_lookup(x) is x
