"""Tests of data/loader.py: exact resume from iterator state, seeded shuffles, epochs, process shards."""

import json

import pytest
from PIL import Image

from pixel_reasoner_jax.data import loader as L
from pixel_reasoner_jax.data.records import RLRecord, SFTRecord, load_rl_records


def _records(n):
    return [RLRecord(f"b-{i}", f"q{i}", [f"/x/{i}.png"], False, str(i), "b") for i in range(n)]


def _qids(xs):
    return [x.qid if isinstance(x, RLRecord) else x["record"].qid for x in xs]


@pytest.mark.parametrize("threads", [0, 2])
def test_resume_is_exact(threads):
    ds = L.rl_dataset(
        _records(23), seed=7, num_epochs=None, process_index=0, process_count=1, load_media=False
    )
    it = L.make_iterator(ds, num_threads=threads, prefetch_buffer_size=4 * threads)
    first = [next(it) for _ in range(5)]
    state = it.get_state()
    json.dumps(state)  # the state must be JSON-able to live in a checkpoint
    after = [next(it) for _ in range(30)]  # crosses an epoch boundary (23 records)
    fresh = L.make_iterator(ds, num_threads=threads, prefetch_buffer_size=4 * threads)
    fresh.set_state(state)
    assert _qids([next(fresh) for _ in range(30)]) == _qids(after)
    assert _qids(first) != _qids(after[:5])


def test_resume_with_media_decoding(tmp_path):
    rows = []
    for i in range(6):
        Image.new("RGB", (32 + i, 40), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(
            {"qid": f"t-{i}", "question": "q", "image": [f"{i}.png"], "is_video": False, "answer": "a"}
        )
    (tmp_path / "rl.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recs, _ = load_rl_records(tmp_path / "rl.jsonl")
    ds = L.rl_dataset(recs, seed=1, num_epochs=2, process_index=0, process_count=1)
    it = L.make_iterator(ds)
    _ = [next(it) for _ in range(5)]
    state = it.get_state()
    rest = list(it)
    fresh = L.make_iterator(ds)
    fresh.set_state(state)
    again = list(fresh)
    assert len(rest) == 7 and _qids(again) == _qids(rest)
    for x in again:  # decoded lazily by .map, and the right image for the record
        i = int(x["record"].qid.split("-")[1])
        assert x["images"][0].size == (32 + i, 40) and x["images"][0].getpixel((0, 0)) == (i * 40, 0, 0)


def test_shuffle_epochs_and_seeds():
    recs = _records(10)
    ds = L.rl_dataset(recs, seed=3, num_epochs=3, process_index=0, process_count=1, load_media=False)
    order = _qids(ds[i] for i in range(len(ds)))
    assert len(order) == 30
    epochs = [order[k * 10 : (k + 1) * 10] for k in range(3)]
    assert all(sorted(e) == sorted(r.qid for r in recs) for e in epochs)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    same = L.rl_dataset(recs, seed=3, num_epochs=3, process_index=0, process_count=1, load_media=False)
    assert _qids(same[i] for i in range(30)) == order
    other = L.rl_dataset(recs, seed=4, num_epochs=3, process_index=0, process_count=1, load_media=False)
    assert _qids(other[i] for i in range(30)) != order
    plain = L.rl_dataset(recs, seed=3, shuffle=False, process_index=0, process_count=1, load_media=False)
    assert _qids(plain[i] for i in range(len(plain))) == [r.qid for r in recs]


def test_process_shards_are_disjoint_equal_and_cover():
    recs = _records(11)
    shards = [
        _qids(L.rl_dataset(recs, seed=0, num_epochs=2, process_index=p, process_count=3, load_media=False))
        for p in range(3)
    ]
    assert {len(s) for s in shards} == {7}  # 22 -> 21: equal lengths so no process waits on another
    flat = [q for s in shards for q in s]
    full = _qids(L.rl_dataset(recs, seed=0, num_epochs=2, process_index=0, process_count=1, load_media=False))
    assert sorted(flat) == sorted(full[:21])
    assert [full[i] for i in range(1, 21, 3)] == shards[1]


def test_sft_dataset_loads_each_path_once(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    p = str(tmp_path / "a.png")
    msgs = [{"role": "user", "content": [{"type": "image", "image": p}, {"type": "text", "text": "q"}]}]
    rec = SFTRecord(
        "s-0", msgs + [{"role": "assistant", "content": [{"type": "text", "text": "a"}]}], [p, p], False
    )
    (x,) = list(L.sft_dataset([rec], seed=0, process_index=0, process_count=1))
    assert x["record"] is rec and list(x["media"]) == [p] and x["media"][p].size == (40, 40)


def test_defaults_come_from_jax():
    ds = L.rl_dataset(_records(5), seed=0, load_media=False)  # one process here: index 0 of 1
    assert sorted(_qids(ds)) == sorted(r.qid for r in _records(5))


def test_bad_arguments():
    with pytest.raises(ValueError, match="records is empty"):
        L.rl_dataset([], seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"process_index must lie in \[0, 2\)"):
        L.rl_dataset(_records(3), seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="num_epochs"):
        L.sft_dataset(_records(3), seed=0, num_epochs=0, process_index=0, process_count=1)
