"""Tests for train/replay.py: the refill rule, SSR draw probabilities, mixing, and exact resume."""

import collections
import json

import numpy as np
import pytest

from pixel_reasoner_jax.train import replay as RP


def test_refill_counts_and_structure():
    # K = 3 informative, target 8: 8 // 3 = 2 full shuffled copies, then 8 % 3 = 2 more.
    informative = [3, 7, 9]
    out = RP.refill_informative(informative, 8, np.random.default_rng(0))
    assert len(out) == 8
    assert sorted(out[0:3]) == informative and sorted(out[3:6]) == informative
    assert len(set(out[6:8])) == 2 and set(out[6:8]) <= set(informative)
    counts = collections.Counter(out)
    assert sorted(counts.values()) == [2, 3, 3]


def test_refill_exact_multiple_and_deterministic():
    out = RP.refill_informative([0, 5], 6, np.random.default_rng(1))
    assert collections.Counter(out) == {0: 3, 5: 3}
    assert out == RP.refill_informative([0, 5], 6, np.random.default_rng(1))


def test_refill_empty_and_bad_input():
    assert RP.refill_informative([], 8, np.random.default_rng(0)) == []
    with pytest.raises(TypeError, match="Generator"):
        RP.refill_informative([1], 4, 0)
    with pytest.raises(ValueError, match="distinct"):
        RP.refill_informative([1, 1], 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="target_size"):
        RP.refill_informative([1], -1, np.random.default_rng(0))


def _buffer():
    buf = RP.SelectiveReplayBuffer(capacity=10, seed=0)
    buf.add([{"id": i} for i in range(4)], np.array([0.5, -1.5, 0.0, 2.0]))
    return buf


def test_exact_probabilities():
    # weights |a| + 1e-4 = [0.5001, 1.5001, 0.0001, 2.0001], total 4.0004.
    expected = np.array([0.5001, 1.5001, 0.0001, 2.0001]) / 4.0004
    np.testing.assert_allclose(_buffer().probabilities(), expected, rtol=1e-12)


def test_empirical_frequencies():
    buf = _buffer()
    n = 100_000
    ids = [s["id"] for s in buf.sample(n)]
    freq = np.bincount(ids, minlength=4) / n
    expected = np.array([0.5001, 1.5001, 0.0001, 2.0001]) / 4.0004
    # Binomial std <= sqrt(0.25 / 1e5) = 0.0016; 0.007 is over 4 sigma.
    np.testing.assert_allclose(freq, expected, atol=0.007)


def test_capacity_evicts_oldest():
    buf = RP.SelectiveReplayBuffer(capacity=3, seed=0)
    buf.add([{"id": i} for i in range(5)], np.arange(5.0))
    assert len(buf) == 3
    assert min(s["id"] for s in buf.sample(200)) >= 2
    assert buf.state_dict()["samples"] == [{"id": 2}, {"id": 3}, {"id": 4}]


def test_mix_half_fresh_half_replayed():
    buf = _buffer()
    fresh = [{"id": 100 + i} for i in range(6)]
    samples, adv = buf.mix(fresh, np.array([1.0, -1.0, 2.0, -2.0, 3.0, -3.0]), size=8)
    assert len(samples) == 8 and adv.shape == (8,)
    head = [s["id"] for s in samples[:4]]
    assert len(set(head)) == 4 and all(i >= 100 for i in head)  # 8 // 2 = 4 distinct fresh first
    # Each sample keeps its own advantage (fresh ids 100+k carry (-1)^k (k//2 + 1)).
    for s, a in zip(samples, adv):
        k = s["id"] - 100
        if k >= 0:
            assert a == (-1) ** k * (k // 2 + 1)
    assert len(buf) == 10  # fresh samples joined the buffer


def test_mix_few_fresh_replay_fills():
    buf = _buffer()
    samples, _ = buf.mix([{"id": 100}], np.array([1.0]), size=8)
    assert samples[0] == {"id": 100} and len(samples) == 8


def test_mix_first_step_and_empty():
    buf = RP.SelectiveReplayBuffer(capacity=10, seed=0)
    samples, adv = buf.mix([], np.zeros(0), size=8)
    assert samples == [] and adv.shape == (0,)
    samples, _ = buf.mix([{"id": 1}, {"id": 2}], np.array([1.0, -1.0]), size=4)
    assert len(samples) == 4 and {s["id"] for s in samples} <= {1, 2}


def test_state_round_trip_resumes_exactly():
    buf = _buffer()
    buf.sample(7)  # advance the RNG
    state = json.loads(json.dumps(buf.state_dict()))
    other = RP.SelectiveReplayBuffer(capacity=10, seed=123)
    other.load_state_dict(state)
    assert buf.sample(50) == other.sample(50)
    a = buf.mix([{"id": 9}], np.array([0.3]), size=6)
    b = other.mix([{"id": 9}], np.array([0.3]), size=6)
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_bad_input():
    buf = RP.SelectiveReplayBuffer(capacity=4, seed=0)
    with pytest.raises(ValueError, match="empty replay buffer"):
        buf.sample(1)
    with pytest.raises(ValueError, match="shape"):
        buf.add([{"id": 0}], np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="list"):
        buf.add(({"id": 0},), np.array([1.0]))
    with pytest.raises(ValueError, match="capacity"):
        RP.SelectiveReplayBuffer(capacity=0, seed=0)
    with pytest.raises(TypeError, match="seed"):
        RP.SelectiveReplayBuffer(capacity=4, seed=None)
    buf.add([{"obj": object()}], np.array([1.0]))
    with pytest.raises(TypeError, match="JSON"):
        buf.state_dict()
    with pytest.raises(ValueError, match="capacity"):
        buf.load_state_dict({"capacity": 5, "samples": [], "advantages": [], "rng": {}})
    with pytest.raises(KeyError, match="missing"):
        buf.load_state_dict({"capacity": 4})
