"""GRPO's prompt shares per process and the gathered rollout order, in one process with the process count
and the gather faked: the union of the shares is the one-process rollout batch, group for group."""

import dataclasses

import jax
import pytest

from pixel_reasoner_jax import distributed
from pixel_reasoner_jax.config import ConfigError
from pixel_reasoner_jax.data import loader
from pixel_reasoner_jax.train import multihost

N, P, G = 3, 6, 2  # processes, prompts per rollout, samples per prompt


def _rollouts(process_index: int, rollouts: int) -> list[list[tuple]]:
    """Per rollout, what process `process_index` samples: (record, batch prompt index, sample) per episode."""
    ds = loader.rl_dataset(list(range(20)), 7, num_epochs=None, load_media=False,
                           process_index=process_index, process_count=N)  # fmt: skip
    it = loader.make_iterator(ds)
    out = []
    for _ in range(rollouts):
        items = [next(it) for _ in range(multihost.local_prompts(P))]
        out.append(
            [(rec, multihost.batch_prompt_index(k), j) for k, rec in enumerate(items) for j in range(G)]
        )
    return out


def test_the_gathered_shares_are_the_one_process_rollout_batch(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: N)
    shares = []
    for p in range(N):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        shares.append(_rollouts(p, rollouts=4))
    one = loader.make_iterator(loader.rl_dataset(list(range(20)), 7, num_epochs=None, load_media=False,
                                                 process_index=0, process_count=1))  # fmt: skip
    for r in range(4):
        monkeypatch.setattr(distributed, "allgather_object", lambda local, r=r: [s[r] for s in shares])
        got = multihost.gather_rollout(shares[0][r], G)
        want = [next(one) for _ in range(P)]
        # Same records in the same order, each prompt's G samples together, and episode ids (hence seeds)
        # numbered by the prompt's place in the whole batch.
        assert got == [(rec, q, j) for q, rec in enumerate(want) for j in range(G)]


def test_prompts_must_divide_over_the_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    cfg = dataclasses.make_dataclass("Cfg", ["grpo"])(
        dataclasses.make_dataclass("G", ["prompts_per_rollout"])(6)
    )
    with pytest.raises(ConfigError, match="grpo.prompts_per_rollout"):
        multihost.check(cfg)
    multihost.check(dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, prompts_per_rollout=8)))


def test_gather_rejects_unequal_shares(monkeypatch):
    monkeypatch.setattr(distributed, "allgather_object", lambda local: [local, local[:2]])
    with pytest.raises(ValueError, match="expected 4 each"):
        multihost.gather_rollout(["a", "b", "c", "d"], 2)
