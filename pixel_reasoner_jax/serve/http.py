"""SGLang-API-compatible HTTP server over any Backend: /generate, weight updates from disk, pause/abort, chat.

Speaks the subset of SGLang's native API the rollout uses (reference/sglang.md §6), stricter where that
surfaces client bugs. `python -m pixel_reasoner_jax.serve.http --checkpoint DIR [--port P]`.
"""

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pixel_reasoner_jax import __version__
from pixel_reasoner_jax.rollout.policy import GenerationResult
from pixel_reasoner_jax.serve import protocol as proto
from pixel_reasoner_jax.serve.backend import (
    PAUSE_MODES,
    Backend,
    BatchWorker,
    DuplicateRequestError,
    Job,
    WeightsFolderError,
    check_weights_folder,
    resolve_factory,
)
from pixel_reasoner_jax.serve.protocol import HttpError

logger = logging.getLogger(__name__)

DEFAULT_BACKEND = "pixel_reasoner_jax.serve.backend:jax_backend"


# ------------------------------------------------------------------------------------------ server


class _State:
    """Everything the request handlers share."""

    def __init__(self, args: dict[str, Any]):
        self.args = args
        self.backend: Backend | None = None
        self.load_error: str | None = None
        self.ready = threading.Event()
        self.model_lock = threading.Lock()
        self.update_lock = threading.Lock()
        self.model_path = ""
        self.worker: BatchWorker | None = None

    def need_backend(self) -> Backend:
        if self.backend is None:
            raise HttpError(503, self.load_error or "the server is still loading the model")
        return self.backend


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client's connection pool is reused
    server_version = f"pixel_reasoner_jax/{__version__}"
    state: _State  # set on the subclass built per server

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        route = _ROUTES.get(path)
        try:
            body = self._read_body()
            if route is None:
                raise HttpError(404, f"unknown endpoint {method} {path}")
            methods, fn = route
            if method not in methods:
                raise HttpError(405, f"{path} accepts {'/'.join(methods)}, got {method}")
            status, payload = fn(self.state, self._json(body) if method == "POST" else {})
        except HttpError as e:
            status, payload = e.status, e.payload or {"error": {"message": e.message}}
        except Exception:  # noqa: BLE001 - the client gets a message, the log gets the traceback
            logger.exception("unhandled error in %s %s", method, path)
            status, payload = 500, {"error": {"message": "internal server error (details in the server log)"}}
        self._send(status, payload)

    def _read_body(self) -> bytes:
        n = self.headers.get("Content-Length")
        if n is None:
            return b""
        try:
            length = int(n)
        except ValueError:
            raise HttpError(400, f"Content-Length must be an integer, got {n!r}") from None
        if length > self.state.args["max_request_bytes"]:
            raise HttpError(
                413, f"request body of {length} bytes exceeds {self.state.args['max_request_bytes']}"
            )
        return self.rfile.read(length)

    @staticmethod
    def _json(body: bytes) -> dict:
        if not body.strip():
            return {}
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HttpError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise HttpError(400, f"request body must be a JSON object, got {type(obj).__name__}")
        return obj

    def _send(self, status: int, payload) -> None:
        if isinstance(payload, str):
            data, ctype = payload.encode(), "text/plain; charset=utf-8"
        elif payload is None:
            data, ctype = b"", "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            logger.info("client went away before the %d response was sent", status)


def _health(st: _State, body: dict):
    if st.backend is None:
        return 503, st.load_error or "loading"
    return 200, None


def _model_info(st: _State, body: dict):
    b = st.need_backend()
    return 200, {
        "model_path": st.model_path,
        "tokenizer_path": b.spec.tokenizer_path or b.spec.model_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": b.policy.weight_version,
        "has_image_understanding": True,
        "has_audio_understanding": False,
        "served_model_name": b.spec.served_model_name or st.model_path,
        "context_length": b.spec.context_length,
        # Extension: video_data may be a list of frame images (see rollout/sglang_client.py).
        "accepts_video_frames": True,
    }


def _server_info(st: _State, body: dict):
    b = st.need_backend()
    return 200, {
        **{k: v for k, v in st.args.items() if k != "backend"},
        "model_path": st.model_path,
        "context_length": b.spec.context_length,
        "weight_version": b.policy.weight_version,
        "paused": st.worker.paused,
        # Seeds are always honoured here (SGLang needs --enable-deterministic-inference for that).
        "enable_deterministic_inference": True,
        "batch_sizes_seen": len(st.worker.batch_sizes),
        "version": f"pixel_reasoner_jax-{__version__}",
    }


def _wait(st: _State, jobs: list[Job]) -> list[GenerationResult]:
    try:
        st.worker.submit(jobs)
    except DuplicateRequestError as e:  # SGLang: ValueError in the tokenizer manager -> HTTP 400
        raise HttpError(400, str(e)) from None
    try:
        return [j.future.result() for j in jobs]
    except Exception as e:  # noqa: BLE001 - a failing policy call: message to the client, traceback logged
        raise HttpError(500, f"generation failed: {type(e).__name__}: {e}") from None


def _generate(st: _State, body: dict):
    t0 = time.monotonic()
    b = st.need_backend()
    units, as_list = proto.parse_generate(body, b.spec, b.tokenizer, st.args["allow_local_paths"])
    jobs = [Job(u.request, u.rid, u.prompt_tokens) for u in units]
    results = _wait(st, jobs)
    for r, u in zip(results, units):
        # The policy expands pads itself; a different count means server and policy resize differently.
        if r.prompt_tokens and r.prompt_tokens != u.prompt_tokens:
            logger.error(
                "policy counted %d prompt tokens, server %d (rid %s)", r.prompt_tokens, u.prompt_tokens, u.rid
            )
            raise HttpError(500, f"policy counted {r.prompt_tokens} prompt tokens, server {u.prompt_tokens}")
    latency = time.monotonic() - t0
    out = [
        proto.generate_response(u, r, j.abort_message, b.tokenizer, latency)
        for u, r, j in zip(units, results, jobs)
    ]
    return 200, out if as_list else out[0]


def _chat(st: _State, body: dict):
    t0 = time.monotonic()
    b = st.need_backend()
    units, model = proto.parse_chat(body, b.spec, b.tokenizer, st.args["allow_local_paths"])
    jobs = [Job(u.request, u.rid, u.prompt_tokens) for u in units]
    results = _wait(st, jobs)
    outs = [
        proto.generate_response(u, r, j.abort_message, b.tokenizer, 0.0)
        for u, r, j in zip(units, results, jobs)
    ]
    return 200, proto.chat_response(
        units, outs, model or b.spec.served_model_name, b.tokenizer, time.monotonic() - t0
    )


def _update_weights(st: _State, body: dict):
    b = st.need_backend()
    req = proto.parse_update(body)
    try:
        check_weights_folder(req["model_path"])
    except WeightsFolderError as e:
        logger.warning("rejected weight update: %s", e)
        return 400, {"success": False, "message": f"Failed to update weights: {e}", "num_paused_requests": 0}
    with st.update_lock:
        if req["abort_all_requests"]:
            st.worker.abort("aborted by /update_weights_from_disk (abort_all_requests)")
        version = req["weight_version"] if req["weight_version"] is not None else b.policy.weight_version
        with st.model_lock:  # waits for the running batch; new batches wait for the load
            try:
                b.load(req["model_path"], version)
            except Exception as e:  # noqa: BLE001 - the old weights keep serving; the client gets why
                logger.exception("loading %s failed", req["model_path"])
                msg = f"Failed to update weights from {req['model_path']}: {type(e).__name__}: {e}"
                return 400, {"success": False, "message": msg, "num_paused_requests": 0}
            if b.policy.weight_version != version:
                raise HttpError(
                    500, f"backend reports version {b.policy.weight_version!r} after loading {version!r}"
                )
            if req["flush_cache"]:
                b.flush_cache()
        st.model_path = req["model_path"]
    logger.info("weights %s loaded from %s", version, req["model_path"])
    return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}


def _flush_cache(st: _State, body: dict):
    b = st.need_backend()
    if st.worker.busy():
        raise HttpError(400, "Cache not flushed because there are pending requests.")
    b.flush_cache()
    return 200, "Cache flushed.\n"


def _pause(st: _State, body: dict):
    st.need_backend()
    mode = body.get("mode", "abort")
    if mode not in PAUSE_MODES:
        raise HttpError(400, f"pause_generation mode must be one of {PAUSE_MODES}, got {mode!r}")
    st.worker.pause(mode)
    return 200, {"message": "Generation paused successfully.", "status": "ok"}


def _continue(st: _State, body: dict):
    st.need_backend()
    st.worker.resume()
    return 200, {"success": True, "message": "Generation continued."}


def _abort_request(st: _State, body: dict):
    st.need_backend()
    rid, abort_all = body.get("rid", ""), body.get("abort_all", False)
    if not isinstance(rid, str) or not isinstance(abort_all, bool):
        raise HttpError(400, f"abort_request needs rid: str and abort_all: bool, got {rid!r}, {abort_all!r}")
    if not rid and not abort_all:
        raise HttpError(400, "abort_request needs a rid or abort_all: true")
    n = st.worker.abort("aborted by /abort_request", None if abort_all else {rid})
    logger.info("/abort_request aborted %d requests", n)
    return 200, None  # SGLang answers an empty 200


def _models(st: _State, body: dict):
    b = st.need_backend()
    name = b.spec.served_model_name or st.model_path
    return 200, {
        "object": "list",
        "data": [{"id": name, "object": "model", "owned_by": "pixel_reasoner_jax"}],
    }


_ROUTES: dict[str, tuple[tuple[str, ...], Callable]] = {
    "/health": (("GET",), _health),
    "/health_generate": (("GET",), _health),
    "/get_model_info": (("GET",), _model_info),
    "/model_info": (("GET",), _model_info),
    "/get_server_info": (("GET",), _server_info),
    "/server_info": (("GET",), _server_info),
    "/generate": (("POST",), _generate),
    "/v1/chat/completions": (("POST",), _chat),
    "/v1/models": (("GET",), _models),
    "/update_weights_from_disk": (("POST",), _update_weights),
    "/flush_cache": (("GET", "POST"), _flush_cache),
    "/pause_generation": (("POST",), _pause),
    "/continue_generation": (("POST",), _continue),
    "/abort_request": (("POST",), _abort_request),
}


class _HTTPServer(ThreadingHTTPServer):
    # The stdlib default backlog of 5 resets connections when many episodes post at once.
    request_queue_size = 256
    daemon_threads = True


class SGLangServer:
    """The HTTP server, its batching worker and the backend (built in the background when a factory).

    `start()` binds and returns at once; /health answers 503 until the backend is ready.
    """

    def __init__(
        self,
        backend: "Backend | Callable[[], Backend]",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_batch: int = 32,
        batch_wait_s: float = 0.005,
        allow_local_paths: bool = False,
        max_request_bytes: int = 1 << 30,
    ):
        self._backend_src = backend
        self.state = _State(
            {
                "host": host,
                "port": port,
                "max_batch": max_batch,
                "batch_wait_s": batch_wait_s,
                "allow_local_paths": allow_local_paths,
                "max_request_bytes": max_request_bytes,
            }
        )
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None

    def start(self) -> "SGLangServer":
        st = self.state
        handler = type("Handler", (_Handler,), {"state": st})
        self._httpd = _HTTPServer((st.args["host"], st.args["port"]), handler)
        st.args["port"] = self._httpd.server_address[1]
        st.worker = BatchWorker(
            lambda: st.backend.policy, st.args["max_batch"], st.args["batch_wait_s"], st.model_lock
        )
        # A short poll interval keeps stop() quick (shutdown waits for the loop to notice).
        self._serve_thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="http", daemon=True
        )
        self._serve_thread.start()
        if isinstance(self._backend_src, Backend):
            self._install(self._backend_src)
        else:
            threading.Thread(target=self._build, name="backend-load", daemon=True).start()
        return self

    def _build(self) -> None:
        try:
            self._install(self._backend_src())
        except Exception as e:  # noqa: BLE001 - /health reports it; main() exits on it
            logger.exception("building the backend failed")
            self.state.load_error = f"backend failed to load: {type(e).__name__}: {e}"
            self.state.ready.set()

    def _install(self, backend: Backend) -> None:
        self.state.model_path = backend.spec.model_path
        self.state.backend = backend
        self.state.ready.set()
        logger.info(
            "serving %s (weights %s) at %s", backend.spec.model_path, backend.policy.weight_version, self.url
        )

    @property
    def url(self) -> str:
        host = self.state.args["host"]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.state.args['port']}"

    @property
    def backend(self) -> Backend | None:
        return self.state.backend

    @property
    def worker(self) -> BatchWorker:
        return self.state.worker

    def wait_ready(self, timeout: float | None = None) -> Backend:
        """Blocks until the backend is built; raises RuntimeError if it failed, TimeoutError if slow."""
        if not self.state.ready.wait(timeout):
            raise TimeoutError(f"backend not ready after {timeout} s")
        if self.state.backend is None:
            raise RuntimeError(self.state.load_error)
        return self.state.backend

    def stop(self) -> None:
        """Stops accepting requests, aborts queued ones, lets the running batch finish, closes the socket."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self.state.worker.stop()
        self._httpd.server_close()
        self._httpd = None

    def __enter__(self) -> "SGLangServer":
        return self if self._httpd is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------ local server


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
    """Launches `python -m pixel_reasoner_jax.serve.http` and waits until /health answers 200.

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
    import httpx
    import portpicker

    port = port or portpicker.pick_unused_port()
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="prj-server-", suffix=".log")
        os.close(fd)
    cmd = [sys.executable, "-m", "pixel_reasoner_jax.serve.http", "--checkpoint", os.fspath(checkpoint),
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


# --------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="HF checkpoint folder served at start")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless told otherwise)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--max-batch", type=int, default=32, help="requests per policy call")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for company")
    p.add_argument("--allow-local-paths", action="store_true", help="accept local file paths in image_data")
    p.add_argument("--weight-version", default="0", help="label of the starting weights")
    p.add_argument(
        "--backend", default=DEFAULT_BACKEND, help="factory 'module:callable'(checkpoint, version)"
    )
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    factory = resolve_factory(a.backend)
    server = SGLangServer(
        lambda: factory(a.checkpoint, a.weight_version),
        host=a.host,
        port=a.port,
        max_batch=a.max_batch,
        batch_wait_s=a.batch_wait_ms / 1000,
        allow_local_paths=a.allow_local_paths,
    ).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    logger.info("listening on %s", server.url)
    server.state.ready.wait()
    if server.backend is None:
        server.stop()
        logger.error("%s", server.state.load_error)
        return 1
    done.wait()
    logger.info("shutting down")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
