"""Tests for train/replay.py and train/replay_samples.py: the refill rule, SSR draw probabilities, the
original's SSR buffer rule, exact resume, replay samples without pixels rebuilt bit-exactly from the media
store, its garbage collection, and the checkpoint size of a full 7B buffer."""

import collections
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import grpo as grpo_config
from pixel_reasoner_jax.models.config import PRESETS
from pixel_reasoner_jax.processing.batch import Example, build_example
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.policy import Video
from pixel_reasoner_jax.train import replay as RP
from pixel_reasoner_jax.train import replay_samples as RS
from pixel_reasoner_jax.train.checkpoint import Checkpointer, read_arrays


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
    assert sorted({s["id"] for s in buf.sample(200)}) == [2, 3, 4]


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


def _fake_sample(qid: str, tokens: int = 6, trained: int = 3, digests=("0" * 64,)) -> RS.ReplaySample:
    """A ReplaySample without a store behind it (the buffer and its checkpoint never open media)."""
    return RS.ReplaySample(
        qid=qid,
        input_ids=np.arange(tokens, dtype=np.int32),
        trained_spans=np.array([[tokens - trained, tokens]] if trained else [], np.int32).reshape(-1, 2),
        logprobs=-np.linspace(0.1, 1.0, trained, dtype=np.float32),
        old_logprobs=-np.linspace(0.2, 1.1, trained, dtype=np.float32),
        media=((tuple(digests), None),),
        pixel_crc=7,
        temperatures=np.full(trained, 0.9, np.float32),
    )


def _npz_round_trip(arrays: dict, tmp_path) -> dict:
    """`arrays` as the checkpoint writes and reads them (one uncompressed npz)."""
    path = tmp_path / "arrays.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return read_arrays(path)


def test_state_round_trip_resumes_exactly(tmp_path):
    buf = RP.SelectiveReplayBuffer(capacity=10, seed=0)
    buf.add([_fake_sample(f"q{i}") for i in range(4)], np.array([0.5, -1.5, 0.0, 2.0]))
    buf.sample(7)  # advance the RNG
    meta, arrays = buf.state_dict()
    assert all(k.startswith(RP.ARRAYS_PREFIX) for k in arrays)
    other = RP.SelectiveReplayBuffer(capacity=10, seed=123)
    other.load_state_dict(json.loads(json.dumps(meta)), _npz_round_trip(arrays, tmp_path))
    assert [s.qid for s in buf.sample(50)] == [s.qid for s in other.sample(50)]
    a = buf.mix([_fake_sample("q9")], np.array([0.3]), size=6)
    b = other.mix([_fake_sample("q9")], np.array([0.3]), size=6)
    assert [s.qid for s in a[0]] == [s.qid for s in b[0]] and a[2] == b[2]
    np.testing.assert_array_equal(a[1], b[1])


def test_pack_round_trip_is_field_for_field(tmp_path):
    video = (("a" * 64, "b" * 64, "a" * 64), 2.5)
    samples = [
        _fake_sample("q0"),
        dataclasses.replace(_fake_sample("qid-1", tokens=9, trained=4), media=(video, (("c" * 64,), None))),
        dataclasses.replace(_fake_sample("", tokens=2, trained=0), media=()),
    ]  # fmt: skip
    got = RS.unpack_samples(_npz_round_trip(RS.pack_samples(samples), tmp_path))
    assert RS.unpack_samples(RS.pack_samples([])) == []
    packed = RS.pack_samples(samples)
    with pytest.raises(ValueError, match="token_counts must be counts >= 0 summing to len"):
        RS.unpack_samples({**packed, "token_counts": packed["token_counts"] + 1})
    with pytest.raises(ValueError, match="pixel_crc has shape"):
        RS.unpack_samples({**packed, "pixel_crc": packed["pixel_crc"][:1]})
    for s, g in zip(samples, got, strict=True):
        for f in dataclasses.fields(RS.ReplaySample):
            a, b = getattr(s, f.name), getattr(g, f.name)
            if isinstance(a, np.ndarray):
                assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), f.name
            else:
                assert a == b, f.name


# ---------------------------------------------------------------------------------- samples without pixels

_MODEL = PRESETS["tiny"]
_PROC = ImageProcessorConfig(min_pixels=56 * 56, max_pixels=448 * 448)
_START, _END, _IMG, _VID = 151652, 151653, 151655, 151656


def _rollout(rng) -> tuple[Example, list, np.ndarray]:
    """A rollout-like Example of two images (one RGBA, composited on white) and a 3-frame video whose third
    frame repeats the first, each item at its final size, with two trained turns; and its old log-probs."""
    rgb = Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (84, 56, 4), dtype=np.uint8), "RGBA")
    frames = [Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(2)]
    media = [rgb, Video(frames=(frames[0], frames[1], frames[0]), fps=2.0), rgba, rgb]
    text = lambda n: list(rng.integers(0, 150_000, n))  # noqa: E731
    ids = text(5) + [_START, _IMG, _END] + text(2) + [_START, _VID, _END] + text(6)
    ids += [_START, _IMG, _END, _START, _IMG, _END] + text(7)
    ids = np.array(ids, np.int32)
    mask = np.zeros(len(ids), np.int8)
    mask[16:19] = 1  # the first answer turn, after the video
    mask[-5:] = 1
    lp = np.where(mask == 1, -rng.random(len(ids)), 0.0).astype(np.float32)
    ex = build_example(ids, mask, lp, media, _PROC, _MODEL, "q-7")
    # Sampled at 0.9 (a turn after a tool result): the temperatures survive the round trip too.
    ex = dataclasses.replace(ex, temperatures=np.where(ex.loss_mask == 1, 0.9, 1.0).astype(np.float32))
    return ex, media, -rng.random(int(ex.loss_mask[1:].sum())).astype(np.float32)


def _assert_same_example(a: Example, b: Example) -> None:
    for field in dataclasses.fields(Example):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), field.name
        else:
            assert x == y, field.name


def test_sample_without_pixels_rebuilds_the_example_bit_exactly(tmp_path):
    ex, media, old = _rollout(np.random.default_rng(0))
    store = RS.MediaStore(tmp_path / RS.MEDIA_DIR)
    buf = RP.SelectiveReplayBuffer(4, seed=1)
    buf.add([RS.encode_sample(ex, old, media, store)], [0.5])
    # Distinct images only: the repeated image and the repeated video frame are stored once.
    assert len(store.digests()) == 4 == len(buf.media_refs())
    meta, arrays = buf.state_dict()
    assert not any(a.dtype.kind == "f" and a.size >= ex.num_patches for a in arrays.values())  # no pixels
    restored = RP.SelectiveReplayBuffer(4, seed=2)
    restored.load_state_dict(json.loads(json.dumps(meta)), _npz_round_trip(arrays, tmp_path))
    got, got_old = RS.decode_sample(restored.sample(1)[0], store, _PROC, _MODEL)
    assert ex.is_video.tolist() == [False, True, False, False] and ex.second_per_grid_ts.tolist() == [1.0]
    _assert_same_example(ex, got)
    assert got_old.dtype == np.float32 and np.array_equal(got_old, old)


def test_rebuilt_pixels_that_differ_fail_loudly(tmp_path):
    ex, media, old = _rollout(np.random.default_rng(1))
    store = RS.MediaStore(tmp_path)
    sample = RS.encode_sample(ex, old, media, store)
    other = dataclasses.replace(_PROC, image_mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="q-7.*differ"):
        RS.decode_sample(sample, store, other, _MODEL)
    digest = sample.media[2][0][0]  # the RGBA image, stored as the RGB the model saw
    arr = np.load(tmp_path / f"{digest}.npy")
    arr[0, 0] ^= 1
    np.save(tmp_path / f"{digest}.npy", arr)
    with pytest.raises(ValueError, match="differ"):
        RS.decode_sample(sample, store, _PROC, _MODEL)
    (tmp_path / f"{digest}.npy").unlink()
    with pytest.raises(FileNotFoundError, match=digest):
        RS.decode_sample(sample, store, _PROC, _MODEL)
    with pytest.raises(ValueError, match="64 lower-case hex"):  # a digest from a file never names a path
        store.get("../../etc/passwd")


def test_sample_codec_rejects_what_a_rollout_cannot_be(tmp_path):
    ex, media, _ = _rollout(np.random.default_rng(2))
    store = RS.MediaStore(tmp_path)
    n = int(ex.loss_mask[1:].sum())
    bad = dataclasses.replace(ex, logprobs=np.full(ex.length, -0.5, np.float32))
    with pytest.raises(ValueError, match="only on trained tokens"):
        RS.encode_sample(bad, np.zeros(n, np.float32), media, store)
    with pytest.raises(ValueError, match=f"n <= {n} trained"):
        RS.encode_sample(ex, np.zeros(n + 1, np.float32), media, store)
    with pytest.raises(ValueError, match="float32"):
        RS.encode_sample(ex, np.zeros(n, np.float64), media, store)
    with pytest.raises(ValueError, match="media kinds"):
        RS.encode_sample(ex, np.zeros(n, np.float32), media[::-1], store)
    start, end = ex.vision_spans[0]
    pad_trained = dataclasses.replace(ex, loss_mask=np.where(np.arange(ex.length) == start, 1, ex.loss_mask))
    with pytest.raises(ValueError, match="pads .* are trained"):
        RS.encode_sample(pad_trained, np.zeros(n, np.float32), media, store)
    assert not store.digests()  # nothing written for a rejected sample


def test_media_of_kept_checkpoints_and_the_live_buffer_survive_collection(tmp_path):
    store = RS.MediaStore(tmp_path / RS.MEDIA_DIR)
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(3)]
    store.root.mkdir(parents=True)
    for name in (".old.tmp", ".new.tmp"):  # temporary files of a write cut short, and of one in flight
        (store.root / name).write_bytes(b"x")
    os.utime(store.root / ".old.tmp", (time.time() - 7200,) * 2)
    state = {"w": jnp.ones(2)}
    buf = RP.SelectiveReplayBuffer(1, seed=0)  # capacity 1: each add evicts the previous sample
    digests = []
    with Checkpointer(tmp_path / "ckpt", max_to_keep=2, async_save=False) as ck:
        for step, image in enumerate(images, start=1):  # as the loop does: encode, then save, then collect
            digests.append(store.put(image))
            buf.add([_fake_sample(f"q{step}", digests=(digests[-1],))], [1.0])
            meta, arrays = buf.state_dict()
            ck.save(step, state, {"replay": meta}, arrays=arrays, force=True)
            RS.collect_media(store, buf.media_refs(), ck, RP.ARRAYS_PREFIX)
        a, b, c = digests
        # Steps 2 and 3 are kept (step 1 was rotated away with a); b survives through step 2 alone.
        assert ck.all_steps() == [2, 3] and store.digests() == {b, c}
        assert not (store.root / ".old.tmp").exists() and (store.root / ".new.tmp").exists()
        restored = RP.SelectiveReplayBuffer(1, seed=0)
        restored.load_state_dict(ck.restore(2, _abstract(state))[1]["replay"], ck.arrays(2))
        assert restored.media_refs() == {b}
        # An image written for a sample evicted before any save is garbage at the next collection.
        stray = store.put(Image.fromarray(np.zeros((28, 28, 3), np.uint8)))
        RS.collect_media(store, buf.media_refs(), ck, RP.ARRAYS_PREFIX)
        assert store.digests() == {b, c} and stray not in store.digests()


def _abstract(state):
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state)


def test_a_full_7b_buffer_checkpoints_well_under_a_gigabyte(tmp_path):
    # The 7B recipe's buffer: capacity 0 means the rollout batch, 512 prompts x G 8 = 4096 samples; rollouts
    # stop above 12,088 tokens. Worst case: every sample that long, with every token but the first trained.
    c = grpo_config.get_config("7b")
    capacity = c.grpo.replay_capacity or c.grpo.prompts_per_rollout * c.grpo.group_size
    tokens = c.rollout.max_total_tokens
    assert (capacity, tokens) == (4096, 12088)

    def npz_bytes(n: int) -> int:
        buf = RP.SelectiveReplayBuffer(capacity, seed=0)
        buf.add([_fake_sample(f"q{i:05d}", tokens, tokens - 1) for i in range(n)], np.ones(n))
        path = tmp_path / f"{n}.npz"
        with open(path, "wb") as f:
            np.savez(f, **buf.state_dict()[1])
        return path.stat().st_size

    per_sample = (npz_bytes(16) - npz_bytes(8)) // 8
    # The module docstring's arithmetic: 4 B per id, 4 + 4 B per trained token (sampler and old log-probs),
    # one [start, end) span 8 B, one temperature run 8 B, one image digest 64 B, item fps + frame count 16 B,
    # advantage 8 B, CRC 4 B, 6 per-sample counts x 8 B, a 6-character qid 24 B.
    assert per_sample == tokens * 4 + 2 * (tokens - 1) * 4 + 8 + 8 + 64 + 16 + 8 + 4 + 6 * 8 + 24
    full = npz_bytes(8) + (capacity - 8) * per_sample
    assert full < 0.6e9  # 0.595 GB, against ~150 GB for the float32 pixels of one image per sample


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
    with pytest.raises(TypeError, match="ReplaySample"):
        buf.state_dict()
    meta, arrays = RP.SelectiveReplayBuffer(capacity=4, seed=0).state_dict()
    with pytest.raises(ValueError, match="capacity"):
        buf.load_state_dict({**meta, "capacity": 5}, arrays)
    with pytest.raises(KeyError, match="missing"):
        buf.load_state_dict({"format": meta["format"], "capacity": 4}, arrays)
    # A checkpoint of the JSON codec (samples with their pixels inside the extra) is refused by name.
    with pytest.raises(ValueError, match="format None"):
        buf.load_state_dict({"capacity": 4, "samples": [], "advantages": [], "rng": meta["rng"]}, {})
