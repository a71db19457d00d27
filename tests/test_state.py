"""Optimizer schedule and freezing, sharded TrainState creation and update, exact gradient accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.train import state as st


class _Vision(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Param(
            jax.random.normal(rngs.params(), (8, 16)) * 0.3, out_sharding=("vit_embed", "vit_mlp")
        )


class _Toy(nnx.Module):
    """Embedding -> tanh MLP -> vision-named projection; every parameter gets a gradient."""

    def __init__(self, rngs):
        self.embed = nnx.Param(
            jax.random.normal(rngs.params(), (32, 16)) * 0.5, out_sharding=("vocab", "embed")
        )
        self.mlp = nnx.Param(jax.random.normal(rngs.params(), (16, 8)) * 0.3, out_sharding=("embed", "mlp"))
        self.bias = nnx.Param(jnp.zeros((8,)), out_sharding=("mlp",))
        self.visual = _Vision(rngs)

    def __call__(self, ids):
        h = jnp.tanh(self.embed[...][ids] @ self.mlp[...] + self.bias[...])
        return h @ self.visual.proj[...]


def _toy(seed=0):
    with nnx.use_eager_sharding(False):
        return _Toy(nnx.Rngs(seed))


def _cfg(**kw):
    base = dict(lr=1e-3, total_steps=100, warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.5)
    return st.OptimConfig(**(base | kw))


@pytest.mark.parametrize(
    "kw,steps,want",
    [
        # warmup W = ceil(0.1 * 100) = 10: lr * s / W, then peak at W
        ({}, [0, 5, 10], [0.0, 5e-4, 1e-3]),
        # cosine midpoint (s = 55): lr * (0.5 + 0.5 * 0.5); end and beyond: min = 0.5 * lr
        ({}, [55, 100, 150], [7.5e-4, 5e-4, 5e-4]),
        # quarter of the decay: lr * (0.5 + 0.5 * (1 + cos(pi / 4)) / 2)
        ({}, [32.5], [1e-3 * (0.5 + 0.25 * (1 + math.cos(math.pi / 4)))]),
        ({"schedule": "linear", "min_lr_ratio": 0.0}, [10, 55, 100], [1e-3, 5e-4, 0.0]),
        ({"schedule": "constant"}, [3, 10, 99, 500], [3e-4, 1e-3, 1e-3, 1e-3]),
        ({"warmup_ratio": 0.0, "min_lr_ratio": 0.0}, [0, 50, 100], [1e-3, 5e-4, 0.0]),
        # ceil(0.03 * 101) = 4 warmup steps (OpenRLHF / HF round the warmup up)
        ({"warmup_ratio": 0.03, "total_steps": 101}, [1, 4], [2.5e-4, 1e-3]),
        ({"warmup_steps": 20}, [10, 20], [5e-4, 1e-3]),
        # a constant prefix of 20 updates at 1e-2, then the warmup (ceil(0.1 * 80) = 8) and the cosine over
        # the 80 updates after it: peak at 20 + 8, midpoint at 20 + 44, floor at 100
        (
            {"prefix_steps": 20, "prefix_lr": 1e-2},
            [0, 19, 20, 24, 28, 64, 100],
            [1e-2, 1e-2, 0.0, 5e-4, 1e-3, 7.5e-4, 5e-4],
        ),
        # a cosine prefix: from 1e-2 at update 0 to lr (1e-3) at update 20, halfway at 10; then as above
        (
            {"prefix_steps": 20, "prefix_lr": 1e-2, "prefix_schedule": "cosine"},
            [0, 10, 19, 20, 28],
            [1e-2, 5.5e-3, 1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi * 19 / 20)), 0.0, 1e-3],
        ),
        # prefix_lr 0: no prefix, whatever prefix_steps says
        ({"prefix_steps": 20}, [0, 5, 10], [0.0, 5e-4, 1e-3]),
    ],
)
def test_schedule_values(kw, steps, want):
    sched = st.make_schedule(_cfg(**kw))
    got = [float(sched(jnp.float32(s))) for s in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_optimizer_applies_schedule_per_update():
    """Adam on a constant unit gradient moves each step by exactly lr(count): the schedule's wiring."""
    # b1 = b2 = 0: the moments are the gradient itself, so no float32 bias-correction rounding.
    cfg = _cfg(total_steps=12, warmup_steps=4, eps=1e-12, grad_clip=0.0, b1=0.0, b2=0.0)
    opt = st.make_optimizer(cfg)
    params = {"w": jnp.zeros((2, 2))}
    state = opt.init(params)
    sched = st.make_schedule(cfg)
    grads = {"w": jnp.ones((2, 2))}
    for count in range(14):
        updates, state = opt.update(grads, state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]), -float(sched(count)), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"lr": 0.0}, "lr"),
        ({"total_steps": 0}, "total_steps"),
        ({"schedule": "cos"}, "schedule"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"warmup_steps": 101}, "warmup_steps"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"b2": 1.0}, "b2"),
        ({"prefix_lr": -1.0}, "prefix_lr"),
        ({"prefix_steps": 100, "prefix_lr": 1e-2}, "prefix_steps"),
        ({"prefix_schedule": "linear"}, "prefix_schedule"),
    ],
)
def test_optim_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=f"OptimConfig.{match}"):
        _cfg(**kw)


def test_frozen_params_unchanged_without_moments_and_outside_clip():
    model = _toy()
    _, params = nnx.split(model, nnx.Param)
    frozen = st.freeze_prefixes(st.VISION_TOWER)
    opt = st.make_optimizer(_cfg(warmup_steps=0, weight_decay=0.1, grad_clip=1.0), frozen)
    opt_state = opt.init(params)
    # No Adam moment arrays for the frozen tower: only the 3 trainable arrays appear in mu and nu.
    mu, nu = (optax.tree_utils.tree_get(opt_state, k) for k in ("mu", "nu"))
    assert len(jax.tree.leaves(mu)) == 3 and len(jax.tree.leaves(nu)) == 3
    assert isinstance(mu["visual"]["proj"], optax.MaskedNode)

    grads = jax.tree.map(jnp.ones_like, params)
    huge = jax.tree.map(jnp.ones_like, params)
    huge["visual"]["proj"] = huge["visual"]["proj"].replace(jnp.full((8, 16), 1e6))
    upd_a, _ = opt.update(grads, opt_state, params)
    upd_b, _ = opt.update(huge, opt_state, params)
    # The frozen gradient neither moves its parameter nor enters the trainable clipping norm.
    for a, b in zip(jax.tree.leaves(upd_a), jax.tree.leaves(upd_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(
        float(st.global_norm(huge, frozen)), math.sqrt(32 * 16 + 16 * 8 + 8), rtol=1e-6
    )

    before = jax.tree.map(np.asarray, params)
    p, s = params, opt_state
    for _ in range(3):
        u, s = opt.update(grads, s, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_array_equal(np.asarray(p["visual"]["proj"][...]), before["visual"]["proj"].get_value())
    for name in ("embed", "mlp", "bias"):
        assert not np.array_equal(np.asarray(p[name][...]), before[name].get_value()), name


def test_frozen_predicate_must_match_something():
    _, params = nnx.split(_toy(), nnx.Param)
    opt = st.make_optimizer(_cfg(), st.freeze_prefixes("vision_tower"))
    with pytest.raises(ValueError, match="matched no parameter.*visual/proj"):
        opt.init(params)
    with pytest.raises(ValueError, match="prefixes"):
        st.freeze_prefixes("")


def test_weight_decay_skips_vectors():
    """With a zero gradient, AdamW moves only matrices (decay); the 1-D bias stays put."""
    _, params = nnx.split(_toy(), nnx.Param)
    params["bias"] = params["bias"].replace(jnp.ones((8,)))
    opt = st.make_optimizer(_cfg(warmup_steps=0, weight_decay=0.1, grad_clip=0.0))
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, _ = opt.update(zeros, opt.init(params), params)
    np.testing.assert_array_equal(np.asarray(upd["bias"][...]), 0.0)
    np.testing.assert_allclose(
        np.asarray(upd["mlp"][...]), -1e-3 * 0.1 * np.asarray(params["mlp"][...]), rtol=1e-6
    )


def test_create_train_state_shards_params_and_moments():
    mesh = sharding.make_mesh(2, 2, 2)
    opt = st.make_optimizer(_cfg(warmup_steps=0), st.freeze_prefixes(st.VISION_TOWER))
    model = _toy()
    values = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    graphdef, state, shardings = st.create_train_state(model, opt, mesh, "train", seed=7)
    assert state.params["embed"][...].sharding.spec == P("tensor", "fsdp")
    assert state.params["mlp"][...].sharding.spec == P("fsdp", "tensor")
    assert state.params["visual"]["proj"][...].sharding.spec == P("fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(values), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for moments in (optax.tree_utils.tree_get(state.opt_state, k) for k in ("mu", "nu")):
        assert moments["embed"][...].sharding.spec == P("tensor", "fsdp")
        assert moments["mlp"][...].sharding.spec == P("fsdp", "tensor")
        assert moments["bias"][...].sharding.spec == P("tensor")
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(jax.random.key(7)))
    for leaf, sh in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert leaf.sharding == sh

    def step(s, ids, y):
        def loss(p):
            pred = nnx.merge(graphdef, p, s.buffers)(ids)
            return jnp.sum((pred - y) ** 2)

        grads = jax.grad(loss)(s.params)
        new = st.apply_gradients(s, grads, opt)
        return (
            new,
            st.global_norm(grads, st.freeze_prefixes(st.VISION_TOWER)),
            st.update_norm(s.params, new.params),
        )

    ids = jnp.arange(8).reshape(2, 4)
    y = jnp.ones((2, 4, 16))
    jstep = jax.jit(step, in_shardings=(shardings, None, None), out_shardings=(shardings, None, None))
    with sharding.use_mesh(mesh, "train"):
        new, gnorm, unorm = jstep(state, ids, y)
    assert int(new.step) == 1
    assert float(gnorm) > 0 and float(unorm) > 0
    for leaf, sh in zip(jax.tree.leaves(new), jax.tree.leaves(shardings)):
        assert leaf.sharding == sh
    np.testing.assert_array_equal(
        np.asarray(new.params["visual"]["proj"][...]), values["visual"]["proj"].get_value()
    )
    # update_norm is the norm of the parameter change.
    diff = [
        np.asarray(b, np.float64) - np.asarray(a, np.float64)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params))
    ]
    np.testing.assert_allclose(float(unorm), math.sqrt(sum(float(np.sum(d**2)) for d in diff)), rtol=1e-5)


def test_reset_adam_moments_restarts_adam_and_keeps_the_schedule():
    """After the reset the next update is a fresh Adam's first one (-lr(count) * sign(g), bias-corrected)
    at the schedule's current count; moments keep their shardings and frozen parameters stay momentless."""
    mesh = sharding.make_mesh(2, 2, 2)
    cfg = _cfg(total_steps=20, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, eps=1e-12)
    opt = st.make_optimizer(cfg, st.freeze_prefixes(st.VISION_TOWER))
    graphdef, state, shardings = st.create_train_state(_toy(), opt, mesh, "train", seed=0)
    ids = jnp.arange(8).reshape(2, 4)

    def grads_of(s, y):
        return jax.grad(lambda p: jnp.sum((nnx.merge(graphdef, p, s.buffers)(ids) - y) ** 2))(s.params)

    with sharding.use_mesh(mesh, "train"):
        for y in (1.0, -2.0, 0.5):
            state = st.apply_gradients(state, grads_of(state, y), opt)
        before = {k: jax.tree.leaves(optax.tree_utils.tree_get(state.opt_state, k)) for k in ("mu", "nu")}
        seen = {k: [(float(jnp.max(jnp.abs(a))), a.sharding) for a in v] for k, v in before.items()}
        reset = st.reset_adam_moments(state)
        assert int(reset.step) == 3
        for k in ("mu", "nu"):
            for a, (peak, sharding_a), b in zip(
                before[k], seen[k], jax.tree.leaves(optax.tree_utils.tree_get(reset.opt_state, k))
            ):
                assert peak > 0 and not np.any(np.asarray(b))
                assert b.sharding == sharding_a
                assert a.is_deleted()  # donated: the zeros took the old moments' buffers
        adam = [
            x
            for x in jax.tree.leaves(reset.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(x, optax.ScaleByAdamState)
        ]
        assert len(adam) == 1 and int(adam[0].count) == 0
        g = grads_of(reset, 3.0)
        new = st.apply_gradients(reset, g, opt)
    lr = float(st.make_schedule(cfg)(3))
    for name in ("embed", "mlp", "bias"):
        got = np.asarray(new.params[name][...]) - np.asarray(reset.params[name][...])
        np.testing.assert_allclose(got, -lr * np.sign(np.asarray(g[name][...])), rtol=1e-4, atol=1e-9)
    np.testing.assert_array_equal(
        np.asarray(new.params["visual"]["proj"][...]), np.asarray(reset.params["visual"]["proj"][...])
    )


def test_split_rng_advances_key():
    _, state, _ = st.create_train_state(
        _toy(), st.make_optimizer(_cfg()), sharding.make_mesh(1, 8, 1), seed=3
    )
    s1, k1 = st.split_rng(state)
    s2, k2 = st.split_rng(s1, num=2)
    assert k1.shape == (1,) and k2.shape == (2,)
    datas = [jax.random.key_data(k) for k in (state.rng, s1.rng, s2.rng, k1[0], k2[0], k2[1])]
    assert len({np.asarray(d).tobytes() for d in datas}) == 6


# ---------------------------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------------------------


def _token_loss(graphdef):
    def loss_fn(params, mb):
        pred = nnx.merge(graphdef, params)(mb["ids"])
        err = jnp.sum((pred - mb["y"]) ** 2, axis=-1)
        valid = mb["mask"] > 0
        return jnp.sum(jnp.where(valid, err, 0.0)), jnp.sum(valid, dtype=jnp.float32), {"n": jnp.sum(valid)}

    return loss_fn


def _batch(rng, b, t):
    return {
        "ids": rng.integers(0, 32, (b, t)).astype(np.int32),
        "y": rng.normal(size=(b, t, 16)).astype(np.float32),
        "mask": np.zeros((b, t), np.int32),
    }


def test_accumulate_uneven_micro_batches_equals_big_batch():
    graphdef, params = nnx.split(_toy(), nnx.Param)
    loss_fn = _token_loss(graphdef)
    rng = np.random.default_rng(0)
    big = _batch(rng, 8, 6)
    # 4 micro-batches of 2 rows with very different numbers of trained tokens: 1, 12, 5, 9.
    lengths = [[1, 0], [6, 6], [2, 3], [4, 5]]
    for i, (a, b) in enumerate(lengths):
        big["mask"][2 * i, :a] = 1
        big["mask"][2 * i + 1, :b] = 1
    n_tokens = big["mask"].sum()

    def big_loss(p):
        s, d, _ = loss_fn(p, big)
        return s / d

    want_loss, want = jax.jit(jax.value_and_grad(big_loss))(params)
    micro = jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), big)
    got = jax.jit(lambda p, m: st.accumulate(loss_fn, p, m))(params, micro)
    as_list = [jax.tree.map(lambda x, i=i: x[i], micro) for i in range(4)]
    got_list = jax.jit(lambda p, m: st.accumulate(loss_fn, p, m))(params, as_list)
    # A mean of per-micro-batch means differs: the check below would fail for it.
    mean_of_means = jax.tree.map(
        lambda *g: sum(g) / 4,
        *[jax.grad(lambda p, mb=mb: (lambda s, d, _: s / d)(*loss_fn(p, mb)))(params) for mb in as_list],
    )
    assert not np.allclose(np.asarray(mean_of_means["mlp"][...]), np.asarray(want["mlp"][...]), rtol=1e-3)
    for res in (got, got_list):
        np.testing.assert_allclose(float(res.loss), float(want_loss), rtol=1e-6)
        assert float(res.denom) == n_tokens and int(res.aux["n"]) == n_tokens
        for a, b in zip(jax.tree.leaves(res.grads), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_accumulate_list_of_different_shapes_and_empty_denominator():
    graphdef, params = nnx.split(_toy(), nnx.Param)
    loss_fn = _token_loss(graphdef)
    rng = np.random.default_rng(1)
    a, b = _batch(rng, 2, 3), _batch(rng, 3, 5)
    a["mask"][:] = 1
    b["mask"][:, :2] = 1
    res = st.accumulate(loss_fn, params, [a, b])
    whole = {
        k: np.concatenate([np.pad(a[k], [(0, 0), (0, 2)] + [(0, 0)] * (a[k].ndim - 2)), b[k]]) for k in a
    }
    want = jax.grad(lambda p: (lambda s, d, _: s / d)(*loss_fn(p, whole)))(params)
    for x, y in zip(jax.tree.leaves(res.grads), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    a["mask"][:] = 0
    b["mask"][:] = 0
    res = st.accumulate(loss_fn, params, [a, b])
    assert float(res.denom) == 0 and float(res.loss) == 0
    for g in jax.tree.leaves(res.grads):
        np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_accumulate_rejects_bad_micro_batches():
    graphdef, params = nnx.split(_toy(), nnx.Param)
    with pytest.raises(ValueError, match="empty sequence"):
        st.accumulate(_token_loss(graphdef), params, [])
    rng = np.random.default_rng(2)
    bad = _batch(rng, 4, 3)
    bad["y"] = bad["y"][:3]
    with pytest.raises(ValueError, match="leading axis"):
        st.accumulate(_token_loss(graphdef), params, bad)


def test_accumulate_keeps_gradient_sum_sharded_like_params():
    mesh = sharding.make_mesh(2, 2, 2)
    opt = st.make_optimizer(_cfg())
    graphdef, state, shardings = st.create_train_state(_toy(), opt, mesh)
    rng = np.random.default_rng(3)
    micro = jax.tree.map(lambda x: x.reshape(2, 4, *x.shape[1:]), _batch(rng, 8, 4))
    micro["mask"][:] = 1

    def grads_of(p, m):
        return st.accumulate(_token_loss(graphdef), p, m, grad_shardings=shardings.params).grads

    f = jax.jit(grads_of, out_shardings=shardings.params)
    with sharding.use_mesh(mesh, "train"):
        sharded = f(state.params, micro)
    plain = st.accumulate(_token_loss(graphdef), jax.device_get(state.params), micro).grads
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_tree_shardings_with_leaf_level_mask_and_eager_model():
    """A user optax.masked with leaf-level masks leaves Param(MaskedNode) nodes: they stay leafless."""
    mesh = sharding.make_mesh(2, 2, 2)
    with sharding.use_mesh(mesh, "train"):
        model = _Toy(nnx.Rngs(0))  # eager sharding: params are created already placed
    opt = optax.masked(optax.adam(1e-3), lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    graphdef, state, shardings = st.create_train_state(model, opt, mesh)
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    assert isinstance(mu["bias"].get_value(), optax.MaskedNode)
    assert mu["mlp"][...].sharding.spec == P("fsdp", "tensor")
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    _, abstract, abstract_shardings = st.abstract_train_state(lambda: _Toy(nnx.Rngs(0)), opt, mesh)
    assert jax.tree.leaves(abstract_shardings) == jax.tree.leaves(shardings)
    assert [(a.shape, a.dtype) for a in jax.tree.leaves(abstract)] == [
        (x.shape, x.dtype) for x in jax.tree.leaves(state)
    ]
