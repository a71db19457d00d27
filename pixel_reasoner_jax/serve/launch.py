"""Starting the server as a subprocess for a run: start_local_server waits for /health; LocalServer stops it.

What train/ uses when `rollout.launch_local_server` is set; the child runs `python -m pixel_reasoner_jax.serve`.
"""

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import portpicker

from pixel_reasoner_jax.serve.backend import DEFAULT_BACKEND

logger = logging.getLogger(__name__)


class LocalServer:
    """A server subprocess started by `start_local_server`; `stop()` ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: str):
        self.process, self.url, self.log_path = process, url, log_path

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "server pid %d ignored SIGTERM for %.0f s; killing it", self.process.pid, timeout
                )
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_server(
    checkpoint: str | os.PathLike,
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    backend: str = DEFAULT_BACKEND,
    max_batch: int = 32,
    weight_version: str = "0",
    extra_args: Sequence[str] = (),
    timeout_s: float = 600.0,
    log_path: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
) -> tuple[str, LocalServer]:
    """Launches `python -m pixel_reasoner_jax.serve` and waits until /health answers 200.

    Args:
      checkpoint: folder served at start.
      port: None picks a free one (portpicker).
      backend: factory 'module:callable' (checkpoint, weight_version) -> Backend, importable from the cwd.
      extra_args: more CLI flags (e.g. ["--allow-local-paths"]).
      timeout_s: how long to wait for /health.
      log_path: where stdout/stderr go (a temp file by default; its tail is in every error).

    Returns:
      (url, handle); handle.stop() ends the process.

    Raises:
      RuntimeError: the process exited before it was healthy (with its log tail).
      TimeoutError: not healthy within timeout_s (the process is stopped).
    """
    port = port or portpicker.pick_unused_port()
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="prj-server-", suffix=".log")
        os.close(fd)
    cmd = [sys.executable, "-m", "pixel_reasoner_jax.serve", "--checkpoint", os.fspath(checkpoint),
           "--host", host, "--port", str(port), "--max-batch", str(max_batch), "--backend", backend,
           "--weight-version", weight_version, *extra_args]  # fmt: skip
    child_env = dict(os.environ if env is None else env)
    # The package and the cwd (for test factories) must import in the child whatever its cwd resolution.
    roots = [str(Path(__file__).resolve().parents[2]), os.getcwd()]
    child_env["PYTHONPATH"] = os.pathsep.join(roots + [p for p in [child_env.get("PYTHONPATH")] if p])
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env)
    handle = LocalServer(
        proc, f"http://{host if ':' not in host else f'[{host}]'}:{port}", os.fspath(log_path)
    )
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {proc.returncode} before it was healthy:\n{handle.log_tail()}"
                )
            try:
                if http.get(handle.url + "/health").status_code == 200:
                    return handle.url, handle
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                handle.stop()
                raise TimeoutError(
                    f"server at {handle.url} not healthy after {timeout_s} s:\n{handle.log_tail()}"
                )
            time.sleep(0.1)
