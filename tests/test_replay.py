"""Tests for train/replay.py: the refill rule, SSR draw probabilities, the original's SSR buffer rule, exact
resume, and the replay-sample codec."""

import collections
import dataclasses
import json

import numpy as np
import pytest

from pixel_reasoner_jax.processing.batch import Example
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


def test_mix_takes_fresh_first_up_to_size():
    buf = _buffer()
    fresh = [{"id": 100 + i} for i in range(6)]
    samples, adv, n_fresh = buf.mix(fresh, np.array([1.0, -1.0, 2.0, -2.0, 3.0, -3.0]), size=4)
    # 6 fresh >= size 4: 4 distinct fresh samples, nothing replayed (the original's SSR).
    assert n_fresh == 4 and len(samples) == 4 and len({s["id"] for s in samples}) == 4
    for s, a in zip(samples, adv):  # fresh id 100+k carries (-1)^k (k//2 + 1)
        k = s["id"] - 100
        assert k >= 0 and a == (-1) ** k * (k // 2 + 1)
    assert len(buf) == 10  # all fresh samples joined the buffer, trained now or not


def test_mix_shortfall_takes_the_whole_buffer_then_draws():
    buf = _buffer()  # 4 stored, advantages [0.5, -1.5, 0.0, 2.0]
    samples, adv, n_fresh = buf.mix([{"id": 100}], np.array([1.0]), size=8)
    assert n_fresh == 1 and samples[0] == {"id": 100} and len(samples) == 8
    # Shortfall 7 exceeds the 5 stored (fresh included): the whole buffer in storage order, then 2 draws.
    assert [s["id"] for s in samples[1:6]] == [0, 1, 2, 3, 100]
    np.testing.assert_array_equal(adv[:6], [1.0, 0.5, -1.5, 0.0, 2.0, 1.0])
    stored = {0: 0.5, 1: -1.5, 2: 0.0, 3: 2.0, 100: 1.0}
    assert all(stored[s["id"]] == a for s, a in zip(samples[6:], adv[6:]))  # replayed keep their advantage


def test_mix_shortfall_equal_to_buffer_draws_by_advantage():
    buf = RP.SelectiveReplayBuffer(capacity=10, seed=0)
    buf.add([{"id": 0}, {"id": 1}], np.array([0.0, 5.0]))
    # Shortfall 2 == buffer length: no whole copy, 2 draws; P(id 0) = 1e-4 / 5.0002.
    counts = collections.Counter(s["id"] for _ in range(200) for s in buf.mix([], np.zeros(0), size=2)[0])
    assert counts[1] >= 398 and sum(counts.values()) == 400


def test_mix_without_fresh_replays_and_empty_skips():
    buf = RP.SelectiveReplayBuffer(capacity=10, seed=0)
    samples, adv, n_fresh = buf.mix([], np.zeros(0), size=8)
    assert samples == [] and adv.shape == (0,) and n_fresh == 0  # nothing anywhere: the step is skipped
    buf.add([{"id": 1}, {"id": 2}], np.array([1.0, -1.0]))
    samples, _, n_fresh = buf.mix([], np.zeros(0), size=4)  # the original divides by zero here
    assert n_fresh == 0 and [s["id"] for s in samples[:2]] == [1, 2] and len(samples) == 4


def test_state_round_trip_resumes_exactly():
    buf = _buffer()
    buf.sample(7)  # advance the RNG
    state = json.loads(json.dumps(buf.state_dict()))
    other = RP.SelectiveReplayBuffer(capacity=10, seed=123)
    other.load_state_dict(state)
    assert buf.sample(50) == other.sample(50)
    a = buf.mix([{"id": 9}], np.array([0.3]), size=6)
    b = other.mix([{"id": 9}], np.array([0.3]), size=6)
    assert a[0] == b[0] and a[2] == b[2]
    np.testing.assert_array_equal(a[1], b[1])


def _rollout_example(rng, t=40) -> Example:
    """A rollout-like Example: 12 prompt tokens, a 4-patch image, then 10 sampled tokens (mask 1)."""
    mask = np.zeros(t, np.int8)
    mask[-10:] = 1
    return Example(
        input_ids=rng.integers(0, 151_000, t).astype(np.int32),
        loss_mask=mask,
        logprobs=np.where(mask == 1, -rng.random(t), 0.0).astype(np.float32),
        positions=rng.integers(0, 9, (3, t)).astype(np.int32),
        pixel_values=rng.normal(size=(4, 1176)).astype(np.float32),
        grid_thw=np.array([[1, 2, 2]], np.int64),
        is_video=np.array([False]),
        second_per_grid_ts=np.zeros((0,), np.float32),
        vision_spans=np.array([[2, 3]], np.int64),
        qid="q0",
        temperatures=np.where(mask == 1, 0.9, 1.0).astype(np.float32),
    )


def test_samples_survive_a_json_checkpoint_bit_exactly():
    rng = np.random.default_rng(0)
    ex = _rollout_example(rng)
    old = -rng.random(10).astype(np.float32)
    buf = RP.SelectiveReplayBuffer(4, seed=1)
    buf.add([RP.encode_sample(ex, old)], [0.5])
    state = json.loads(json.dumps(buf.state_dict()))  # what the checkpoint's JSON extra holds
    restored = RP.SelectiveReplayBuffer(4, seed=2)
    restored.load_state_dict(state)
    got, got_old = RP.decode_sample(restored.sample(1)[0])
    assert got.qid == "q0" and got_old.dtype == np.float32
    np.testing.assert_array_equal(got_old, old)
    for field in dataclasses.fields(Example):
        if field.name != "qid":
            a, b = getattr(ex, field.name), getattr(got, field.name)
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), field.name


def test_sample_weight_is_not_above_the_dense_example():
    # Before old log-probs were stored, a replay sample was the Example alone with dense sampler log-probs;
    # storing both log-probs on the trained tokens only must not cost more (10 trained of 40 here).
    rng = np.random.default_rng(1)
    ex = _rollout_example(rng)
    dense = {
        "qid": ex.qid,
        **{f.name: RP._pack(getattr(ex, f.name)) for f in dataclasses.fields(Example)[:-1]},
    }
    new = RP.encode_sample(ex, -rng.random(10).astype(np.float32))
    assert len(json.dumps(new)) <= len(json.dumps(dense))


def test_sample_codec_rejects_what_a_rollout_cannot_be():
    rng = np.random.default_rng(2)
    ex = _rollout_example(rng)
    bad = dataclasses.replace(ex, logprobs=np.full(40, -0.5, np.float32))
    with pytest.raises(ValueError, match="only on trained tokens"):
        RP.encode_sample(bad, np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="n <= 9 trained"):  # the first token is never a target
        RP.encode_sample(dataclasses.replace(ex, loss_mask=np.r_[np.ones(10), np.zeros(30)].astype(np.int8),
                                             logprobs=np.r_[-np.ones(10), np.zeros(30)].astype(np.float32)),
                         np.zeros(10, np.float32))  # fmt: skip
    with pytest.raises(ValueError, match="float32"):
        RP.encode_sample(ex, np.zeros(10, np.float64))


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
