"""SGLang-API-compatible HTTP server over any Backend: the handler, the routes, SGLangServer and its config.

Speaks the subset of SGLang's native API the rollout uses (reference/sglang.md §6), stricter where that
surfaces client bugs. Bodies are parsed by serve/protocol.py and serve/chat.py; requests are batched by
serve/batching.py.
"""

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pixel_reasoner_jax import __version__
from pixel_reasoner_jax.rollout.policy import GenerationResult
from pixel_reasoner_jax.serve import chat
from pixel_reasoner_jax.serve import protocol as proto
from pixel_reasoner_jax.serve.backend import Backend, WeightsFolderError, check_weights_folder
from pixel_reasoner_jax.serve.batching import PAUSE_MODES, BatchWorker, DuplicateRequestError, Job
from pixel_reasoner_jax.serve.protocol import HttpError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How the server listens and batches; /server_info reports every field.

    Attributes:
      host: bind address (loopback unless told otherwise).
      port: 0 picks a free port at start(); the server's `config` then holds the bound one.
      max_batch: requests per policy call.
      batch_wait_s: how long a batch waits for company before it runs.
      allow_local_paths: accept local image file paths in image_data (off: a request must not read files).
      max_request_bytes: larger request bodies are answered 413 unread.
    """

    host: str = "127.0.0.1"
    port: int = 0
    max_batch: int = 32
    batch_wait_s: float = 0.005
    allow_local_paths: bool = False
    max_request_bytes: int = 1 << 30

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port must be in 0..65535, got {self.port}")
        if self.max_batch < 1:
            raise ValueError(f"ServerConfig.max_batch must be >= 1, got {self.max_batch}")
        if self.batch_wait_s < 0:
            raise ValueError(f"ServerConfig.batch_wait_s must be >= 0, got {self.batch_wait_s}")
        if self.max_request_bytes < 1:
            raise ValueError(f"ServerConfig.max_request_bytes must be >= 1, got {self.max_request_bytes}")


# ------------------------------------------------------------------------------------------ server


class _State:
    """Everything the request handlers share."""

    def __init__(self, config: ServerConfig):
        self.config = config
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
        if length > self.state.config.max_request_bytes:
            raise HttpError(
                413, f"request body of {length} bytes exceeds {self.state.config.max_request_bytes}"
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
        # Extension: video_data may be a list of frame images (see rollout/sglang_protocol.py).
        "accepts_video_frames": True,
    }


def _server_info(st: _State, body: dict):
    b = st.need_backend()
    return 200, {
        **dataclasses.asdict(st.config),
        "model_path": st.model_path,
        "context_length": b.spec.context_length,
        "weight_version": b.policy.weight_version,
        "paused": st.worker.paused,
        # Seeds are always honoured here (SGLang needs --enable-deterministic-inference for that).
        "enable_deterministic_inference": True,
        "batch_sizes_seen": len(st.worker.batch_sizes),
        "version": f"pixel_reasoner_jax-{__version__}",
    }


def _wait(st: _State, units: list[proto.Unit]) -> tuple[list[Job], list[GenerationResult]]:
    """Queues one job per unit and waits for all of them: (jobs, their results)."""
    jobs = [Job(u.request, u.rid, u.prompt_tokens) for u in units]
    try:
        st.worker.submit(jobs)
    except DuplicateRequestError as e:  # SGLang: ValueError in the tokenizer manager -> HTTP 400
        raise HttpError(400, str(e)) from None
    try:
        return jobs, [j.future.result() for j in jobs]
    except Exception as e:  # noqa: BLE001 - a failing policy call: message to the client, traceback logged
        raise HttpError(500, f"generation failed: {type(e).__name__}: {e}") from None


def _generate(st: _State, body: dict):
    t0 = time.monotonic()
    b = st.need_backend()
    units, as_list = proto.parse_generate(body, b.spec, b.tokenizer, st.config.allow_local_paths)
    jobs, results = _wait(st, units)
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
    units, model = chat.parse_chat(body, b.spec, b.tokenizer, st.config.allow_local_paths)
    jobs, results = _wait(st, units)
    outs = [
        proto.generate_response(u, r, j.abort_message, b.tokenizer, 0.0)
        for u, r, j in zip(units, results, jobs)
    ]
    return 200, chat.chat_response(
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
        self, backend: "Backend | Callable[[], Backend]", config: ServerConfig | None = None, **options
    ):
        """`options` are ServerConfig fields that override `config` (e.g. `port=0, max_batch=8`)."""
        self._backend_src = backend
        self.state = _State(dataclasses.replace(config or ServerConfig(), **options))
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None

    def start(self) -> "SGLangServer":
        st = self.state
        handler = type("Handler", (_Handler,), {"state": st})
        self._httpd = _HTTPServer((st.config.host, st.config.port), handler)
        st.config = dataclasses.replace(st.config, port=self._httpd.server_address[1])
        st.worker = BatchWorker(
            lambda: st.backend.policy, st.config.max_batch, st.config.batch_wait_s, st.model_lock
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
    def config(self) -> ServerConfig:
        """The options; after start() `port` is the bound one."""
        return self.state.config

    @property
    def url(self) -> str:
        host = self.config.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.config.port}"

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
