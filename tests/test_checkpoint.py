"""Orbax checkpoints: restore onto other meshes bit-exactly, JSON extras, retention, damaged steps, resume."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pixel_reasoner_jax import sharding
from pixel_reasoner_jax.train import checkpoint as ckpt
from pixel_reasoner_jax.train import state as st


class _Toy(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Param(
            jax.random.normal(rngs.params(), (32, 16)) * 0.5, out_sharding=("vocab", "embed")
        )
        self.mlp = nnx.Param(jax.random.normal(rngs.params(), (16, 8)) * 0.3, out_sharding=("embed", "mlp"))
        self.head = nnx.Param(jax.random.normal(rngs.params(), (8, 16)) * 0.3, out_sharding=("mlp", "embed"))

    def __call__(self, ids):
        return jnp.tanh(self.embed[...][ids] @ self.mlp[...]) @ self.head[...]


def _model():
    with nnx.use_eager_sharding(False):
        return _Toy(nnx.Rngs(0))


_CFG = st.OptimConfig(lr=1e-2, total_steps=20, warmup_steps=2, min_lr_ratio=0.5, b2=0.95)


def _optimizer():
    return st.make_optimizer(_CFG)


def _step_fn(graphdef, optimizer, shardings):
    """A jitted, donating train step: fresh noise from the state's key, 2 accumulated micro-batches."""

    def step(state, batch):
        state, keys = st.split_rng(state)
        batch = dict(batch, y=batch["y"] + 0.1 * jax.random.normal(keys[0], batch["y"].shape))

        def loss_fn(params, mb):
            err = jnp.sum((nnx.merge(graphdef, params, state.buffers)(mb["ids"]) - mb["y"]) ** 2, -1)
            return jnp.sum(err * mb["mask"]), jnp.sum(mb["mask"]), {}

        acc = st.accumulate(loss_fn, state.params, batch)
        return st.apply_gradients(state, acc.grads, optimizer), acc.loss

    return jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=0)


def _batch(i):
    rng = np.random.default_rng(100 + i)
    return {
        "ids": rng.integers(0, 32, (2, 4, 3)).astype(np.int32),
        "y": rng.normal(size=(2, 4, 3, 16)).astype(np.float32),
        "mask": (rng.random((2, 4, 3)) < 0.7).astype(np.float32),
    }


def _train(state, step, mesh, first, n):
    with sharding.use_mesh(mesh, "train"):
        for i in range(first, first + n):
            state, _ = step(state, _batch(i))
    return state


def _host(tree):
    """Leaves as NumPy (typed keys as their raw data), for bit-exact comparison."""

    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return [one(x) for x in jax.tree.leaves(tree)]


def _assert_identical(a, b):
    la, lb = _host(a), _host(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def trained():
    """A (2,2,2)-mesh state after 3 steps."""
    mesh = sharding.make_mesh(2, 2, 2)
    opt = _optimizer()
    graphdef, state, shardings = st.create_train_state(_model(), opt, mesh, seed=11)
    step = _step_fn(graphdef, opt, shardings)
    return mesh, graphdef, _train(state, step, mesh, 0, 3), shardings


EXTRA = {
    "data": {"next_index": 48},
    "replay": [[1, 0.5], [7, -1.25]],
    "metrics_cursor": 3,
    "config": {"lr": 1e-2},
}


@pytest.mark.parametrize("target", [(1, 8, 1), (1, 1, 1)])
def test_restore_onto_other_mesh_is_bit_identical(tmp_path, trained, target):
    _, _, state, _ = trained
    with ckpt.Checkpointer(tmp_path, max_to_keep=2) as c:
        assert c.save(3, state, EXTRA)
    devices = jax.devices()[: int(np.prod(target))]
    mesh = sharding.make_mesh(*target, devices=devices)
    _, abstract, shardings = st.abstract_train_state(_model, _optimizer(), mesh, seed=0)
    with ckpt.Checkpointer(tmp_path, max_to_keep=2) as c:
        assert c.latest_step() == 3
        restored, extra = c.restore(3, abstract)
    _assert_identical(state, restored)
    assert int(restored.step) == 3 and extra == EXTRA
    for leaf, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert leaf.sharding == sh and leaf.sharding.mesh == mesh
    if target == (1, 8, 1):
        assert restored.params["embed"][...].sharding.spec == P("tensor", "fsdp")
        assert len(restored.params["embed"][...].addressable_shards) == 8


def test_rng_key_round_trip(tmp_path, trained):
    mesh, _, state, shardings = trained
    assert jnp.issubdtype(state.rng.dtype, jax.dtypes.prng_key)
    with ckpt.Checkpointer(tmp_path) as c:
        c.save(3, state)
        restored, extra = c.restore(None, st.abstract_like(state, shardings))
    assert extra == {}
    assert restored.rng.dtype == state.rng.dtype
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
    draw = lambda s: np.asarray(jax.random.normal(st.split_rng(s)[1][0], (4,)))
    np.testing.assert_array_equal(draw(restored), draw(state))


def test_max_to_keep_and_save_every(tmp_path, trained):
    _, _, state, _ = trained
    with ckpt.Checkpointer(tmp_path, max_to_keep=2, save_every=2) as c:
        saved = [s for s in range(1, 8) if c.save(s, state, {"s": s})]
        assert saved == [2, 4, 6]
        assert c.save(7, state, {"s": 7}, force=True)
        c.wait()
        assert c.all_steps() == [6, 7]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["6", "7"]
        with pytest.raises(ValueError, match="step 7 is already saved"):
            c.save(7, state, force=True)
    with ckpt.Checkpointer(tmp_path, max_to_keep=2) as c:
        assert c.all_steps() == [6, 7]
        assert c.restore(6, st.abstract_like(state, trained[3]))[1] == {"s": 6}


def test_bad_arguments_raise(tmp_path, trained):
    mesh, _, state, shardings = trained
    with pytest.raises(ValueError, match="max_to_keep"):
        ckpt.Checkpointer(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match="save_every"):
        ckpt.Checkpointer(tmp_path, save_every=0)
    with ckpt.Checkpointer(tmp_path) as c:
        with pytest.raises(TypeError, match="extra\\['bad'\\] is not JSON"):
            c.save(1, state, {"ok": 1, "bad": object()})
        with pytest.raises(ValueError, match="step must be an int"):
            c.save(-1, state)
        with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
            c.restore(None, st.abstract_like(state, shardings))
        c.save(1, state)
        with pytest.raises(ValueError, match="step 5 is not a committed checkpoint.*\\[1\\]"):
            c.restore(5, st.abstract_like(state, shardings))
        # What nnx.eval_shape yields under a mesh: AbstractMesh shardings, which orbax cannot place.
        on_abstract = NamedSharding(mesh.abstract_mesh, P())
        for sh in (on_abstract, None):
            target = jax.tree.map(lambda x, sh=sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state)
            with pytest.raises(TypeError, match="concrete sharding"):
                c.restore(1, target)


def test_arrays_item_round_trip_and_is_optional(tmp_path, trained):
    _, _, state, shardings = trained
    arrays = {
        "ids": np.arange(7, dtype=np.int32),
        "none": np.zeros((0, 2), np.float32),
        "names": np.array(["a", "bc"]),
        "digests": np.array([b"f" * 64], "S64"),
    }
    with ckpt.Checkpointer(tmp_path, max_to_keep=5) as c:
        c.save(1, state, {"s": 1}, arrays=arrays)
        c.save(2, state, {"s": 2})  # no arrays: no item
        c.save(3, state, {"s": 3}, arrays={})  # empty: no item either
        for bad, err in (({"a/b": np.zeros(1)}, ValueError), ({"o": np.array([object()])}, TypeError)):
            with pytest.raises(err, match="arrays"):
                c.save(4, state, arrays=bad)
        with pytest.raises(TypeError, match="NumPy array"):
            c.save(4, state, arrays={"list": [1, 2]})
    assert sorted(p.name for p in (tmp_path / "1").iterdir() if p.is_dir()) == ["arrays", "extra", "state"]
    assert not (tmp_path / "2" / ckpt.ARRAYS).exists() and not (tmp_path / "3" / ckpt.ARRAYS).exists()
    with ckpt.Checkpointer(tmp_path) as c:
        assert c.all_steps() == [1, 2, 3]  # none quarantined
        got = c.arrays(1)
        assert got.keys() == arrays.keys()
        for k, v in arrays.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
        assert c.arrays(1, keys=("ids", "absent")).keys() == {"ids"} and c.arrays(2) == {}
        assert c.restore(1, st.abstract_like(state, shardings))[1] == {"s": 1}
        with pytest.raises(ValueError, match="step 9 is not a committed"):
            c.arrays(9)


@pytest.mark.parametrize("damage", ["commit_marker", "state_item", "arrays_item", "metadata"])
def test_damaged_latest_step_falls_back_to_previous(tmp_path, trained, damage):
    _, _, state, shardings = trained
    shifted = dataclasses.replace(state, params=jax.tree.map(lambda x: x + 1, state.params))
    with ckpt.Checkpointer(tmp_path, max_to_keep=5) as c:
        c.save(2, state, {"step": 2}, arrays={"step": np.array([2])})
        c.save(3, shifted, {"step": 3}, arrays={"step": np.array([3])})
    step3 = tmp_path / "3"
    if damage == "commit_marker":
        (step3 / "commit_success.txt").unlink()  # as a non-atomic filesystem leaves a cut-short save
    elif damage == "state_item":
        shutil.rmtree(step3 / "state")
    elif damage == "arrays_item":  # an optional item the step's metadata lists is required
        (step3 / ckpt.ARRAYS / ckpt.ARRAYS_FILE).unlink()
    else:
        (step3 / "_CHECKPOINT_METADATA").unlink()
    # A save killed before orbax's rename leaves a tmp folder: never a step.
    (tmp_path / "4.orbax-checkpoint-tmp-123").mkdir()
    with ckpt.Checkpointer(tmp_path, max_to_keep=5) as c:
        assert c.latest_step() == 2 and c.all_steps() == [2]
        restored, extra = c.restore(None, st.abstract_like(state, shardings))
        assert extra == {"step": 2} and c.arrays(2) == {"step": np.array([2])}
        _assert_identical(state, restored)
        with pytest.raises(ValueError, match="step 3 is not a committed checkpoint"):
            c.restore(3, st.abstract_like(state, shardings))
        # The step number is free again: resuming from 2 can save its own step 3.
        assert c.save(3, state, {"step": "3 again"})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[:2] == ["2", "3"] and names[2].startswith("3.damaged-") and len(names) == 3
    with ckpt.Checkpointer(tmp_path) as c:
        assert c.all_steps() == [2, 3]
        assert c.restore(None, st.abstract_like(state, shardings))[1] == {"step": "3 again"}


def test_resume_equals_uninterrupted_run(tmp_path):
    """3 steps, save, 3 more  ==  restore step 3 in a fresh setup, 3 more: bit-identical state and extra."""
    mesh = sharding.make_mesh(2, 2, 2)
    opt = _optimizer()
    graphdef, state, shardings = st.create_train_state(_model(), opt, mesh, seed=5)
    step = _step_fn(graphdef, opt, shardings)
    state = _train(state, step, mesh, 0, 3)
    with ckpt.Checkpointer(tmp_path) as c:
        c.save(int(state.step), state, {"data": {"next_index": 3}})
        # The step donates `state` right after the asynchronous save returned; the saved copy must hold.
        straight = _train(state, step, mesh, 3, 3)

    graphdef2, abstract, shardings2 = st.abstract_train_state(_model, _optimizer(), mesh, seed=999)
    with ckpt.Checkpointer(tmp_path) as c:
        restored, extra = c.restore(c.latest_step(), abstract)
    assert json.dumps(extra) == json.dumps({"data": {"next_index": 3}})
    step2 = _step_fn(graphdef2, _optimizer(), shardings2)
    resumed = _train(restored, step2, mesh, extra["data"]["next_index"], 3)
    assert int(resumed.step) == int(straight.step) == 6
    _assert_identical(straight, resumed)
