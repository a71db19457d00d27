"""Multi-process GRPO rollouts: which prompts of a rollout batch this process samples, and the union of all
processes' trajectories in one-process order, so rewards, filtering and the SPMD step agree everywhere.

The RL stream is dealt round-robin (data/loader.py: position i of the global stream goes to process i % n),
so with k = prompts_per_rollout / n prompts per process, the rollout batch r holds global positions
r*P .. r*P+P-1: process p's j-th prompt of it is prompt j*n + p of the batch. A prompt's G episodes stay on
its process (group advantages need whole groups), episode ids carry the batch-wide prompt index (their
sampling seeds then match a one-process run), and `gather_rollout` restores the one-process order.

Why gather trajectories to every process rather than feed each process its shard of the step's batch
(jax.make_array_from_process_local_data): the step replicates vision rows over the mesh (steps.shard_batch),
so every host needs every trained sample's pixels anyway; the micro-batch buckets and the refill / replay
draw depend on the whole batch; and a trajectory holds its images as 8-bit pixels at model size, 8x fewer
bytes than the float32 patches (temporal patch 2) of the step inputs built from it. Everything after the
gather (rewards, advantages, zero-advantage filter and refill, replay, metrics, samples.jsonl) is the
one-process code, run identically on every process.
"""

import jax

from pixel_reasoner_jax import distributed
from pixel_reasoner_jax.config import ConfigError, RunConfig
from pixel_reasoner_jax.rollout.trajectory import Trajectory


def check(cfg: RunConfig) -> None:
    """Raises ConfigError when the rollout batch's prompts do not split evenly over the processes."""
    n, p = jax.process_count(), cfg.grpo.prompts_per_rollout
    if p % n:
        raise ConfigError(
            "grpo.prompts_per_rollout",
            f"must be a multiple of the {n} processes (each rolls out an equal share of the prompts), got {p}",
        )


def local_prompts(prompts_per_rollout: int) -> int:
    """Prompts of each rollout batch this process samples."""
    return prompts_per_rollout // jax.process_count()


def batch_prompt_index(j: int) -> int:
    """The index in the whole rollout batch of this process's j-th prompt."""
    return j * jax.process_count() + jax.process_index()


def gather_rollout(local: list[Trajectory], group_size: int) -> list[Trajectory]:
    """Every process's trajectories (this process's: `local`, groups of `group_size` in prompt order) in
    the order one process would have produced: group of batch prompt q = j*n + p after group q - 1."""
    shares = distributed.allgather_object(local)
    n = len(shares)
    k = len(local) // group_size
    if any(len(s) != k * group_size for s in shares):
        raise ValueError(
            f"processes rolled out {[len(s) for s in shares]} trajectories, expected {k * group_size} each"
        )
    return [t for j in range(k) for p in range(n) for t in shares[p][j * group_size : (j + 1) * group_size]]
