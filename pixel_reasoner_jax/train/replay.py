"""Zero-advantage remedies: refill-by-repetition ("filter True") and Selective Sample Replay (SSR).

Host-side; samples are opaque JSON-able dicts owned by the caller (reference/pixel_reasoner.md §9.3).
"""

import collections
import copy
import json
from collections.abc import Sequence

import numpy as np

# Floor added to |advantage| so every stored sample keeps a non-zero chance (the original's 1e-4).
_PROB_FLOOR = 1e-4


def refill_informative(
    indices_informative: Sequence[int], target_size: int, rng: np.random.Generator
) -> list[int]:
    """The "filter True" rule: keep only informative samples and repeat them back to `target_size`.

    With K informative indices, the result is target_size // K full copies, each freshly shuffled, then the
    first target_size % K of one more shuffle (the original reshuffles before every copy). Every index
    appears either floor(target/K) or ceil(target/K) times.

    Args:
        indices_informative: batch indices of samples in non-uniform groups.
        target_size: the batch size to restore (the original size before dropping).
        rng: NumPy generator; the caller owns and checkpoints it.

    Returns:
        A list of `target_size` indices, or [] when there is no informative sample (the caller skips the step).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if isinstance(target_size, bool) or not isinstance(target_size, (int, np.integer)) or target_size < 0:
        raise ValueError(f"target_size must be an int >= 0, got {target_size!r}")
    idx = [int(i) for i in indices_informative]
    if len(set(idx)) != len(idx):
        raise ValueError(f"indices_informative must be distinct, got {idx}")
    if not idx:
        return []
    k = len(idx)
    out: list[int] = []
    for _ in range(target_size // k):
        out.extend(int(i) for i in rng.permutation(idx))
    rem = target_size % k
    if rem:
        out.extend(int(i) for i in rng.permutation(idx)[:rem])
    return out


class SelectiveReplayBuffer:
    """Selective Sample Replay: keep past informative samples and redraw them by |advantage|.

    A FIFO of at most `capacity` (sample, advantage) pairs. Draws are with replacement, with probability
    proportional to |advantage| + 1e-4. Unlike the original, indices are always taken against the list they
    were drawn from (the original reassigned `self.items` and then reused stale indices).
    """

    def __init__(self, capacity: int, seed: int):
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int (a resumable run needs a fixed seed), got {seed!r}")
        self.capacity = int(capacity)
        self._samples: collections.deque = collections.deque(maxlen=self.capacity)
        self._adv: collections.deque = collections.deque(maxlen=self.capacity)
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, samples: list, advantages) -> None:
        """Appends samples with their scalar advantages; the oldest are evicted beyond capacity."""
        if not isinstance(samples, list):
            raise TypeError(f"samples must be a list, got {type(samples).__name__}")
        adv = np.asarray(advantages, dtype=np.float64)
        if adv.shape != (len(samples),):
            raise ValueError(f"advantages must have shape ({len(samples)},) like samples, got {adv.shape}")
        if not np.all(np.isfinite(adv)):
            raise ValueError(f"advantages must be finite, got {adv.tolist()}")
        self._samples.extend(samples)
        self._adv.extend(float(a) for a in adv)

    def probabilities(self) -> np.ndarray:
        """The exact draw probabilities (|adv| + 1e-4) / sum, in storage order (oldest first)."""
        if not self._adv:
            raise ValueError("probabilities: the replay buffer is empty")
        w = np.abs(np.asarray(self._adv, dtype=np.float64)) + _PROB_FLOOR
        return w / w.sum()

    def _draw(self, n: int) -> np.ndarray:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if n == 0:
            return np.zeros((0,), np.int64)
        if not self._samples:
            raise ValueError(f"cannot draw {n} samples from an empty replay buffer")
        return self._rng.choice(len(self._samples), size=n, replace=True, p=self.probabilities())

    def sample(self, n: int) -> list:
        """Draws `n` stored samples with replacement, P(i) proportional to |adv_i| + 1e-4."""
        return [self._samples[i] for i in self._draw(n)]

    def sample_with_advantages(self, n: int) -> tuple[list, np.ndarray]:
        """Like `sample`, also returning the stored advantage of each drawn sample."""
        idx = self._draw(n)
        return [self._samples[i] for i in idx], np.asarray([self._adv[i] for i in idx], np.float64)

    def mix(self, fresh: list, fresh_adv, size: int) -> tuple[list, np.ndarray]:
        """Builds a training batch of `size` samples: up to half fresh, the rest replayed.

        Rule (after the original's SSR): the fresh informative samples are first added to the buffer, so they
        can be replayed now and later. Then n_fresh = min(len(fresh), size // 2) of them are taken without
        replacement, in random order, and the other size - n_fresh are drawn from the whole buffer with
        replacement by |advantage| + 1e-4. With enough fresh samples the batch is exactly half fresh, half
        replayed; with few, replay fills the gap.

        Args:
            fresh: this step's informative samples (from non-uniform groups).
            fresh_adv: their advantages (len(fresh),).
            size: the training batch size.

        Returns:
            (samples, advantages): `size` samples (fresh first) and their advantages, or ([], empty) when both
            `fresh` and the buffer are empty (the caller skips the step).
        """
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        self.add(fresh, fresh_adv)
        adv = np.asarray(fresh_adv, dtype=np.float64)
        if not self._samples or size == 0:
            return [], np.zeros((0,), np.float64)
        n_fresh = min(len(fresh), size // 2)
        pick = self._rng.permutation(len(fresh))[:n_fresh]
        replayed, replayed_adv = self.sample_with_advantages(size - n_fresh)
        samples = [fresh[i] for i in pick] + replayed
        return samples, np.concatenate([adv[pick], replayed_adv])

    def state_dict(self) -> dict:
        """JSON-serialisable state (samples, advantages, RNG) so a resumed run draws the same samples."""
        state = {
            "capacity": self.capacity,
            "samples": copy.deepcopy(list(self._samples)),
            "advantages": list(self._adv),
            "rng": copy.deepcopy(self._rng.bit_generator.state),
        }
        try:
            json.dumps(state)
        except TypeError as e:
            raise TypeError(f"replay samples must be JSON-serialisable dicts: {e}") from e
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores a `state_dict()` (also after a JSON round trip)."""
        missing = {"capacity", "samples", "advantages", "rng"} - set(state)
        if missing:
            raise KeyError(f"replay state is missing keys {sorted(missing)}")
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"replay state capacity {state['capacity']} != buffer capacity {self.capacity}")
        if len(state["samples"]) != len(state["advantages"]) or len(state["samples"]) > self.capacity:
            raise ValueError(
                f"replay state has {len(state['samples'])} samples and {len(state['advantages'])} advantages;"
                f" expected equal counts <= capacity {self.capacity}"
            )
        rng_state = state["rng"]
        if rng_state.get("bit_generator") != "PCG64":
            raise ValueError(f"replay rng state must be PCG64, got {rng_state.get('bit_generator')!r}")
        self._samples = collections.deque(copy.deepcopy(state["samples"]), maxlen=self.capacity)
        self._adv = collections.deque((float(a) for a in state["advantages"]), maxlen=self.capacity)
        self._rng.bit_generator.state = copy.deepcopy(rng_state)
