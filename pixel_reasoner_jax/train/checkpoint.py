"""Orbax checkpoints of the TrainState plus a JSON `extra` item (data-iterator state, RNG, metrics cursor) and
an optional `arrays` item (named NumPy arrays: the replay buffer), restorable onto any mesh; damaged or
uncommitted steps are never restored.

A step directory holds `state/` (StandardSave of the pytree), `extra/` (JsonSave) and, when given, `arrays/`
(one uncompressed `arrays.npz`), written by orbax's CheckpointManager (v0 API): atomically on local disks
(tmp dir + rename) and with a commit marker elsewhere, so a committed step always has all of its items.
"""

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE, EXTRA, ARRAYS = "state", "extra", "arrays"
ARRAYS_FILE = "arrays.npz"
# Files a finished step always has: orbax writes the commit marker last (before the rename on local disks),
# so a directory without them is a half-written or damaged step.
_STEP_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt")
_ITEM_MARKERS = {STATE: ("_METADATA",), EXTRA: ("metadata",)}
# Optional items: required when the step's metadata lists their handler (the step saved them).
_OPTIONAL_MARKERS = {ARRAYS: (ARRAYS_FILE,)}


def is_complete_step(step_dir: Path) -> bool:
    """True when `step_dir` holds every marker and item of a finished checkpoint."""
    if not step_dir.is_dir() or not all((step_dir / m).is_file() for m in _STEP_MARKERS):
        return False
    try:
        saved = json.loads((step_dir / _STEP_MARKERS[0]).read_text()).get("item_handlers") or {}
    except (OSError, ValueError):
        return False
    items = {**_ITEM_MARKERS, **{k: v for k, v in _OPTIONAL_MARKERS.items() if k in saved}}
    return all((step_dir / item / m).is_file() for item, ms in items.items() for m in ms)


class NpzHandler(ocp.AsyncCheckpointHandler):
    """Named NumPy arrays as one uncompressed `arrays.npz` (no pickled objects), written by the primary host
    in orbax's background commit (the caller hands over arrays it no longer mutates)."""

    def _write(self, directory, arrays: dict[str, np.ndarray]) -> None:
        if jax.process_index() == 0:
            with (directory / ARRAYS_FILE).open("wb") as f:
                np.savez(f, **arrays)

    async def async_save(self, directory, args: "NpzSave"):
        async def write():
            self._write(directory, args.arrays)

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="npz_save")]

    def save(self, directory, args: "NpzSave") -> None:
        self._write(directory, args.arrays)

    def restore(self, directory, args: "NpzRestore | None" = None) -> dict[str, np.ndarray]:
        return read_arrays(Path(directory) / ARRAYS_FILE)


@ocp.args.register_with_handler(NpzHandler, for_save=True)
@dataclasses.dataclass
class NpzSave(ocp.args.CheckpointArgs):
    arrays: dict[str, np.ndarray]


@ocp.args.register_with_handler(NpzHandler, for_restore=True)
@dataclasses.dataclass
class NpzRestore(ocp.args.CheckpointArgs):
    pass


def read_arrays(path: Path, keys=None) -> dict[str, np.ndarray]:
    """The arrays of an `arrays.npz` read into memory: all, or those of `keys` the file has; no pickles."""
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files if keys is None or k in keys}


def _check_arrays(arrays: dict) -> None:
    if not isinstance(arrays, dict):
        raise TypeError(f"arrays must be a dict of NumPy arrays, got {type(arrays).__name__}")
    for key, value in arrays.items():
        if not isinstance(key, str) or not key or "/" in key:
            raise ValueError(f"arrays keys must be non-empty strings without '/', got {key!r}")
        if not isinstance(value, np.ndarray) or value.dtype.hasobject:
            raise TypeError(
                f"arrays[{key!r}] must be a NumPy array without objects, got {type(value).__name__}"
            )


class Checkpointer:
    """Periodic TrainState checkpoints with exact resume.

    Damaged steps: when opened, a step directory that lacks orbax's commit marker or one of its items (a
    save cut short on a non-atomic filesystem, or files lost later) is renamed to `<step>.damaged-<ns>`
    (kept for inspection, ignored by orbax), so `latest_step()` and `restore(None, ...)` fall back to the
    previous committed step and that step number can be saved again. Asking `restore` for a step that is
    not committed raises ValueError. Data corrupted inside a complete-looking step is not detected up front:
    orbax raises while reading it. Open one Checkpointer per directory at a time (per job): on a
    non-atomic filesystem a second one would take the first one's in-flight step for a damaged one.

    Args:
        directory: root folder; one subfolder per step.
        max_to_keep: how many recent steps orbax keeps (None keeps all).
        save_every: `save` writes only steps divisible by this, unless forced.
        async_save: let orbax write in the background after copying the arrays to host memory;
            `wait()` blocks until the last save is committed.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int | None = 3,
        save_every: int = 1,
        async_save: bool = True,
    ):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"max_to_keep must be None or an int >= 1, got {max_to_keep!r}")
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be an int >= 1, got {save_every!r}")
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        self._quarantine_damaged()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                EXTRA: ocp.JsonCheckpointHandler(),
                ARRAYS: NpzHandler(),
            },
        )

    def _quarantine_damaged(self) -> None:
        if jax.process_index() == 0 and self.directory.is_dir():
            for d in sorted(self.directory.iterdir()):
                if d.is_dir() and d.name.isdigit() and not is_complete_step(d):
                    aside = d.with_name(f"{d.name}.damaged-{time.time_ns()}")
                    log.warning("checkpoint step %s is incomplete; moved aside to %s", d, aside.name)
                    d.rename(aside)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("pixel_reasoner_checkpointer_quarantine")

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(
        self,
        step: int,
        state: Any,
        extra: dict | None = None,
        *,
        arrays: dict[str, np.ndarray] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` (any pytree of arrays), the JSON `extra` and the NumPy `arrays` (when given) at `step`
        if due (or `force`).

        Returns whether a save started. Raises ValueError if `step` is already committed, TypeError if
        `extra` does not serialise to JSON or `arrays` holds something else than NumPy arrays (checked here,
        not later in orbax's background thread).
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if not (force or self.should_save(step)):
            return False
        extra = {} if extra is None else extra
        if not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict of JSON values, got {type(extra).__name__}")
        for key, value in extra.items():
            try:
                json.dumps({key: value})
            except (TypeError, ValueError) as e:
                raise TypeError(f"extra[{key!r}] is not JSON-serialisable: {e}") from e
        if arrays is not None:
            _check_arrays(arrays)
        if step in self._manager.all_steps():
            raise ValueError(f"step {step} is already saved in {self.directory}")
        items = {STATE: ocp.args.StandardSave(state), EXTRA: ocp.args.JsonSave(extra)}
        if arrays:  # an empty dict saves no item
            items[ARRAYS] = NpzSave(dict(arrays))
        args = ocp.args.Composite(**items)
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """(state, extra) of `step` (None: the latest committed one), placed as `abstract_state` says.

        Args:
            step: a committed step, or None for the latest.
            abstract_state: pytree of `jax.ShapeDtypeStruct` with concrete shardings on the current mesh
                (`state.abstract_like` / `state.abstract_train_state`); the saving mesh does not matter.
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise ValueError(
                f"step {step} is not a committed checkpoint in {self.directory}; committed: {steps}"
            )
        for leaf in jax.tree.leaves(abstract_state):
            sh = getattr(leaf, "sharding", None)
            concrete = isinstance(sh, jax.sharding.Sharding) and not isinstance(
                getattr(sh, "mesh", None), jax.sharding.AbstractMesh
            )
            if not isinstance(leaf, jax.ShapeDtypeStruct) or not concrete:
                raise TypeError(
                    "abstract_state leaves must be jax.ShapeDtypeStruct with a concrete sharding "
                    f"(see state.abstract_like), got {leaf!r}"
                )
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state), EXTRA: ocp.args.JsonRestore()}
        )
        restored = self._manager.restore(step, args=args)
        return restored[STATE], dict(restored[EXTRA])

    def arrays(self, step: int, keys=None) -> dict[str, np.ndarray]:
        """The `arrays` item of committed step `step` ({} when it saved none); with `keys`, only those it has.

        Does not wait for a save in flight: the step being written is not committed yet.
        """
        if step not in self.all_steps():
            raise ValueError(f"step {step} is not a committed checkpoint in {self.directory}")
        path = self.directory / str(step) / ARRAYS / ARRAYS_FILE
        return read_arrays(path, keys) if path.is_file() else {}

    def wait(self) -> None:
        """Blocks until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources."""
        self._manager.wait_until_finished()
        self._manager.close()
