"""Zero-advantage remedies: refill-by-repetition ("filter True") and Selective Sample Replay (SSR), with the
buffer's checkpoint state and the old log-probs of replayed samples per micro-batch row.

Host-side (reference/pixel_reasoner.md §9.3); the buffer's samples are `replay_samples.ReplaySample`s (no
pixels), checkpointed as flat NumPy arrays beside the JSON extra.
"""

import collections
import copy
from collections.abc import Sequence

import numpy as np

from pixel_reasoner_jax.train import replay_samples

# Key prefix of the buffer's arrays in a checkpoint's `arrays` item.
ARRAYS_PREFIX = "replay."
# Version of `state_dict`'s layout; the first (samples inside the JSON extra, with pixels) had none.
_STATE_FORMAT = 2

# Floor added to |advantage| so every stored sample keeps a non-zero chance (the original's 1e-4).
_PROB_FLOOR = 1e-4


def _check_count(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{name} must be an int >= 0, got {n!r}")


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
    _check_count("target_size", target_size)
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
    """Selective Sample Replay as the original's `active_sampling(do_ssr=True)` (reference §9.3).

    A FIFO (deque) of at most `capacity` (sample, advantage) pairs; the original's maxlen is the rollout
    batch N. Draws are with replacement, with probability proportional to |advantage| + 1e-4.
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
        _check_count("n", n)
        if n == 0:
            return np.zeros((0,), np.int64)
        if not self._samples:
            raise ValueError(f"cannot draw {n} samples from an empty replay buffer")
        return self._rng.choice(len(self._samples), size=n, replace=True, p=self.probabilities())

    def _fill(self, n: int) -> np.ndarray:
        """The original's fill rule: the whole buffer (storage order) while `n` exceeds its length, then
        the rest drawn by |advantage| (its `while numtotal > 0` loop over `keep_items`)."""
        _check_count("n", n)
        size = len(self._samples)
        if n and not size:
            raise ValueError(f"cannot replay {n} samples from an empty replay buffer")
        whole = (n - 1) // size if n else 0  # copies taken while the shortfall still exceeds the buffer
        parts = [np.arange(size)] * whole + [self._draw(n - whole * size)]
        return np.concatenate(parts).astype(np.int64)

    def sample(self, n: int) -> list:
        """Draws `n` stored samples with replacement, P(i) proportional to |adv_i| + 1e-4."""
        return [self._samples[i] for i in self._draw(n)]

    def mix(self, fresh: list, fresh_adv, size: int) -> tuple[list, np.ndarray, int]:
        """The training buffer of one rollout batch: fresh informative samples first, replay fills the rest.

        The original's rule (`active_sampling`, do_ssr): this step's informative samples join the buffer
        first (so they can be replayed now and later); then min(len(fresh), size) of them are taken without
        replacement in random order; only when fewer than `size` exist, the shortfall comes from the
        buffer (`_fill`); with no fresh sample at all the original divides by zero, here the buffer fills
        the batch alone. Replayed samples come back as stored: they keep the advantages (and, in the
        caller's samples, the old log-probs) of the rollout that produced them, as in the original. The original picks the fresh samples
        by indices into its item list after reassigning that list (bug §9.3, "index reuse"), so it trains
        on repeats of some fresh samples; what it meant, distinct fresh samples, is done here. It also
        reseeds Python's `random` with 42 on every call (so its shuffles repeat); the buffer's own
        checkpointed RNG shuffles here.

        Args:
            fresh: this step's informative samples (from non-uniform groups).
            fresh_adv: their advantages (len(fresh),).
            size: the training buffer size, half the rollout batch in the original.

        Returns:
            (samples, advantages, n_fresh): `size` samples, the first n_fresh of them fresh, or ([], empty, 0)
            when `fresh` and the buffer are both empty (the caller skips the step; the original crashes).
        """
        _check_count("size", size)
        self.add(fresh, fresh_adv)
        adv = np.asarray(fresh_adv, dtype=np.float64)
        if not self._samples or size == 0:
            return [], np.zeros((0,), np.float64), 0
        pick = self._rng.permutation(len(fresh))[: min(len(fresh), size)]
        idx = self._fill(size - len(pick))
        samples = [fresh[i] for i in pick] + [self._samples[i] for i in idx]
        return samples, np.concatenate([adv[pick], [self._adv[i] for i in idx]]), len(pick)

    def media_refs(self) -> set[str]:
        """The media digests of the stored samples."""
        return replay_samples.media_refs(self._samples)

    def state_dict(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON part, arrays part) of the state (samples, advantages, RNG): a resumed run draws the same.

        The arrays (keys `ARRAYS_PREFIX + name`) go into the checkpoint's npz item, the rest into its JSON.
        """
        meta = {
            "format": _STATE_FORMAT,
            "capacity": self.capacity,
            "rng": copy.deepcopy(self._rng.bit_generator.state),
        }
        arrays = replay_samples.pack_samples(list(self._samples))
        arrays["advantages"] = np.asarray(self._adv, dtype=np.float64)
        return meta, {ARRAYS_PREFIX + k: v for k, v in arrays.items()}

    def load_state_dict(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Restores a `state_dict()` (also after a JSON round trip of `meta` and an npz one of `arrays`)."""
        if meta.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"replay state has format {meta.get('format')!r}, expected {_STATE_FORMAT}: a checkpoint "
                "written before replay samples left their pixels out cannot be resumed with SSR"
            )
        missing = {"capacity", "rng"} - set(meta)
        if missing:
            raise KeyError(f"replay state is missing keys {sorted(missing)}")
        if int(meta["capacity"]) != self.capacity:
            raise ValueError(f"replay state capacity {meta['capacity']} != buffer capacity {self.capacity}")
        own = {k[len(ARRAYS_PREFIX) :]: v for k, v in arrays.items() if k.startswith(ARRAYS_PREFIX)}
        if "advantages" not in own:
            raise KeyError(f"replay state has no {ARRAYS_PREFIX}advantages array; got {sorted(arrays)}")
        samples = replay_samples.unpack_samples(own)
        adv = own["advantages"]
        if len(samples) != len(adv) or len(samples) > self.capacity:
            raise ValueError(
                f"replay state has {len(samples)} samples and {len(adv)} advantages;"
                f" expected equal counts <= capacity {self.capacity}"
            )
        rng_state = meta["rng"]
        if rng_state.get("bit_generator") != "PCG64":
            raise ValueError(f"replay rng state must be PCG64, got {rng_state.get('bit_generator')!r}")
        self._samples = collections.deque(samples, maxlen=self.capacity)
        self._adv = collections.deque((float(a) for a in adv), maxlen=self.capacity)
        self._rng.bit_generator.state = copy.deepcopy(rng_state)


def trained_values(x: np.ndarray, loss_mask: np.ndarray) -> list[np.ndarray]:
    """Per row of a stacked micro array (n, B, T), its values at the trained targets, in order.

    Rows come micro-batch by micro-batch, i.e. in the order of the examples given to `steps.micro_batches`.
    """
    x, mask = np.asarray(x), np.asarray(loss_mask) != 0
    if x.shape != mask.shape or x.ndim != 3:
        raise ValueError(f"x {x.shape} and loss_mask {mask.shape} must have one (n_micro, B, T) shape")
    t = x.shape[-1]
    return [row[m] for row, m in zip(x.reshape(-1, t), mask.reshape(-1, t))]


def with_trained_values(values: Sequence[np.ndarray], loss_mask: np.ndarray) -> np.ndarray:
    """The inverse of `trained_values`: float32 (n, B, T) zeros holding each row's values at its trained
    targets (the stored old log-probs of replayed samples).

    Raises:
      ValueError: a row count or a row's length that does not match the mask.
    """
    mask = np.asarray(loss_mask) != 0
    rows = mask.reshape(-1, mask.shape[-1])
    if len(values) != rows.shape[0]:
        raise ValueError(f"got values for {len(values)} rows, the micro-batches have {rows.shape[0]}")
    out = np.zeros(rows.shape, np.float32)
    for i, (v, m) in enumerate(zip(values, rows)):
        if np.shape(v) != (int(m.sum()),):
            raise ValueError(f"row {i} has {int(m.sum())} trained targets, got values of shape {np.shape(v)}")
        out[i, m] = v
    return out.reshape(mask.shape)
