"""Host-side collectives of a multi-process run: barriers, full host copies of global arrays, and gathers of
Python objects (pickled bytes through jax's device collectives). Each is a no-op or local in one process.

Every function here is collective: all processes must call it, in the same order.
"""

import math
import pickle
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

# Bytes per process moved by one gather of a pickled payload: process_allgather replicates its result on
# every local device, so a bounded chunk bounds the device memory a large rollout batch takes in transit.
CHUNK_BYTES = 1 << 26


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_host(x) -> np.ndarray:
    """A full NumPy copy of `x` on this process; an array spread over several processes is gathered."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def allgather_object(obj: Any) -> list[Any]:
    """`obj` of every process, in process order (`[obj]` in one process).

    Pickle is the wire format: the bytes come only from this run's own processes, the same code on the
    same trusted hosts, never from a file, a server or the model.
    """
    n = jax.process_count()
    if n == 1:
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = multihost_utils.process_allgather(np.int64(data.size)).reshape(n)
    longest = int(sizes.max())
    # A power-of-two chunk up to CHUNK_BYTES: few distinct shapes, so few compiled gathers.
    chunk = min(CHUNK_BYTES, 1 << max(10, math.ceil(math.log2(max(longest, 1)))))
    padded = np.zeros(-(-longest // chunk) * chunk, np.uint8)
    padded[: data.size] = data
    parts = [multihost_utils.process_allgather(padded[i : i + chunk]) for i in range(0, padded.size, chunk)]
    rows = np.concatenate(parts, axis=1)  # (n, padded size)
    return [pickle.loads(rows[p, : sizes[p]].tobytes()) for p in range(n)]


def broadcast_object(obj: Any) -> Any:
    """Process 0's `obj` on every process."""
    return allgather_object(obj)[0]
