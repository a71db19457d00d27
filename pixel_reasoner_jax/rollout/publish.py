"""Publishing weight folders for rollout servers to load: export into a temporary folder, fsync, rename.

A server never sees a half-written folder (serve/backend.check_weights_folder also rejects `.tmp` names).
"""

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def publish_folder(export_fn: Callable[[str], object], shared_dir: str | os.PathLike, name: str) -> Path:
    """Runs export_fn(tmp) into `<shared_dir>/.tmp-<name>-<uuid>`, fsyncs it and renames it to
    `<shared_dir>/<name>` (replacing an older folder of that name).

    Raises:
      ValueError: export_fn wrote no config.json.
      Whatever export_fn raises; the temporary folder is removed either way.
    """
    shared = Path(shared_dir)
    shared.mkdir(parents=True, exist_ok=True)
    tmp = shared / f".tmp-{name}-{uuid.uuid4().hex}"
    final = shared / name
    tmp.mkdir()
    try:
        export_fn(str(tmp))
        if not (tmp / "config.json").is_file():
            raise ValueError(f"export_fn wrote no config.json into {tmp}")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(shared)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _fsync_tree(root: Path) -> None:
    """Flushes every file and folder under root (and root) to disk before the rename publishes them."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
