"""SGLang client as a Policy: token-in/token-out POST /generate over a fleet of servers, and weight push.

Works against real SGLang (>= 0.5.13, launch/sglang_server.sh) and the in-repo stand-in (serve/). The wire
format is rollout/sglang_protocol.py; balancing and re-admission are rollout/fleet.py.
"""

import concurrent.futures
import dataclasses
import logging
import os
import shutil
import threading
import uuid
import weakref
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
from PIL import Image

from pixel_reasoner_jax.processing.vision import FACTOR
from pixel_reasoner_jax.rollout.fleet import Fleet, NoServerError
from pixel_reasoner_jax.rollout.media import png_data_url
from pixel_reasoner_jax.rollout.policy import (
    FINISH_ABORT,
    FINISH_LENGTH,
    GenerationRequest,
    GenerationResult,
    Policy,
    Video,
)
from pixel_reasoner_jax.rollout.publish import publish_folder
from pixel_reasoner_jax.rollout.sglang_protocol import (  # the errors are this module's API too
    ServerFailure,
    SGLangError,
    SGLangRequestError,
    SGLangUnavailable,
    StaleWeightsError,
    WeightPushError,
    error_message,
    expected_prompt_tokens,
    generate_payload,
    parse_generate,
)

logger = logging.getLogger(__name__)

STALE_MODES = ("error", "flag", "ignore")
HEALTH_TIMEOUT_S = 30.0  # real SGLang's /health runs a one-token generation when idle


class SGLangClient(Policy):
    """Policy over SGLang's native /generate (reference/sglang.md §3, §5), on one server or a fleet.

    Each request is sent with ONE pad per media item, every sampling parameter explicit and
    `return_logprob`; the sampled ids are read from `output_token_logprobs`, and the server's expanded
    `prompt_tokens` is checked against the count implied by the image sizes. Requests run in parallel on
    a thread pool and go to the server with the fewest outstanding requests (rollout/fleet.py). A server
    that fails a request (connection error, timeout, 5xx) leaves rotation and the request is resubmitted
    elsewhere under a fresh rid; 4xx is never retried. A failed server is probed on /health with backoff
    and re-admitted once it serves the last pushed weights (pushed to it first when it missed them).

    Args:
      urls: server base URLs, e.g. ["http://10.0.0.5:30000"].
      timeout_s: read timeout of one /generate call.
      retries: times one request is resubmitted after server failures before it fails.
      backoff_s: delay of the first /health probe of a failed server; doubles after each failed probe.
      max_backoff_s: the largest delay between probes.
      wait_s: how long a request waits for a server in rotation before SGLangUnavailable.
      concurrency: parallel requests (threads and pooled connections).
      connect_timeout_s: connect timeout (short, so a dead server fails fast).
      update_timeout_s: read timeout of /update_weights_from_disk (loads take minutes for 7B).
      stale: when a response's weight_version differs from the last pushed one: "error" raises
        StaleWeightsError, "flag" counts it in `stale_samples` and returns the sample with its own version,
        "ignore" does neither.
      pin_key: maps a request's rid to a key; requests with the same key prefer the same server (radix cache
        reuse across turns) while it is in rotation. None = least outstanding requests.
      expected_weight_version: version the servers should serve before the first push (None: unchecked).
      keep_pushed: pushed folders kept on disk (older ones are deleted after a successful push).
      max_resubmits: times an aborted request (server paused for an update) is resubmitted with its partial
        output appended, as AReaL does; 0 returns the abort to the caller.
      factor, temporal_patch_size: pixels per merged patch side and frames per temporal patch.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout_s: float = 600.0,
        retries: int = 3,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        wait_s: float = 600.0,
        concurrency: int = 64,
        connect_timeout_s: float = 5.0,
        update_timeout_s: float = 1800.0,
        stale: str = "error",
        pin_key: Callable[[str], str] | None = None,
        expected_weight_version: str | None = None,
        keep_pushed: int = 2,
        max_resubmits: int = 4,
        factor: int = FACTOR,
        temporal_patch_size: int = 2,
    ):
        if isinstance(urls, str) or not urls:
            raise ValueError(f"urls must be a non-empty list of server URLs, got {urls!r}")
        for u in urls:
            if not isinstance(u, str) or not u.startswith(("http://", "https://")):
                raise ValueError(f"server URL must start with http:// or https://, got {u!r}")
        if stale not in STALE_MODES:
            raise ValueError(f"stale must be one of {STALE_MODES}, got {stale!r}")
        for name, v, lo in (("retries", retries, 0), ("concurrency", concurrency, 1), ("keep_pushed", keep_pushed, 1),
                            ("max_resubmits", max_resubmits, 0)):  # fmt: skip
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        for name, v in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s),
                        ("update_timeout_s", update_timeout_s)):  # fmt: skip
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        self.urls = [u.rstrip("/") for u in urls]
        self.fleet = Fleet(self.urls, self._probe, wait_s=wait_s, backoff_s=backoff_s, max_backoff_s=max_backoff_s,
                           current=expected_weight_version)  # fmt: skip
        self.timeout_s, self.retries = timeout_s, retries
        self.update_timeout_s, self.stale, self.pin_key = update_timeout_s, stale, pin_key
        self.keep_pushed, self.max_resubmits = keep_pushed, max_resubmits
        self.factor, self.temporal = factor, temporal_patch_size
        self._connect = connect_timeout_s
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency),
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="sglang")
        self._lock = threading.Lock()
        self._urls_cache: dict[int, tuple[weakref.ref, str]] = {}
        self._video_ok: dict[str, bool] = {}
        self._seeds_ok: dict[str, bool] = {}
        self._info_lock = threading.Lock()
        self._pushed: list[Path] = []
        self._current_path: tuple[str, str] | None = None  # (model_path as servers see it, version)
        self.stale_samples = 0
        self.resubmits = 0
        self.unseeded_requests = 0  # seeded requests sent without their seed (server ignores seeds)

    # ------------------------------------------------------------------------------------ Policy API

    @property
    def weight_version(self) -> str:
        """The version last pushed (or given as expected); "" before either."""
        return self.fleet.current or ""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order; requests run concurrently.

        Raises:
          SGLangUnavailable: no server answered one of the requests.
          SGLangRequestError: a server rejected a request (4xx).
          SGLangError: a malformed response, or prompt_tokens not the expected expanded length.
          StaleWeightsError: a sample from other weights than expected (stale="error").
        """
        futures = [self._pool.submit(self._generate_one, r) for r in requests]
        return [f.result() for f in futures]

    def fleet_metrics(self) -> dict[str, float]:
        """Servers in rotation and per-server requests, failures, resubmissions (`Fleet.metrics`)."""
        return self.fleet.metrics()

    def close(self) -> None:
        self.fleet.close()
        self._pool.shutdown(wait=True)
        self._http.close()

    def __enter__(self) -> "SGLangClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- payloads

    def _data_url(self, img: Image.Image) -> str:
        """PNG data URL, cached per image object: every turn resends the episode's images."""
        key = id(img)
        with self._lock:
            hit = self._urls_cache.get(key)
            if hit is not None and hit[0]() is img:
                return hit[1]
        url = png_data_url(img)
        ref = weakref.ref(img, lambda _, k=key, cache=self._urls_cache: cache.pop(k, None))
        with self._lock:
            self._urls_cache[key] = (ref, url)
        return url

    def expected_prompt_tokens(self, request: GenerationRequest) -> int:
        """len(input_ids) + sum over media of (tokens - 1); validates one pad per media item."""
        return expected_prompt_tokens(request, self.factor, self.temporal)

    def build_payload(self, request: GenerationRequest, *, send_seed: bool = True) -> dict:
        """The /generate body (sglang_protocol.generate_payload), images as cached PNG data URLs."""
        return generate_payload(request, self._data_url, send_seed=send_seed)

    # ------------------------------------------------------------------------------------- transport

    def _preferred(self, rid: str) -> int | None:
        if self.pin_key is not None and rid:
            return zlib.crc32(self.pin_key(rid).encode()) % len(self.urls)
        return None

    def _call(self, method: str, path: str, server: int, *, body=None, timeout=None) -> httpx.Response:
        """One request to one server.

        Raises:
          SGLangRequestError: HTTP 4xx.
          ServerFailure: a transport error (refused, reset, timeout) or HTTP 5xx.
        """
        url = self.urls[server]
        try:
            # An explicit timeout=None would switch httpx's timeouts off, so the default is passed by name.
            r = self._http.request(method, url + path, json=body, timeout=timeout or httpx.USE_CLIENT_DEFAULT)
        except httpx.TransportError as e:
            raise ServerFailure(f"{url}{path}: {type(e).__name__}: {e}", transport=True) from None
        if r.status_code >= 500:
            raise ServerFailure(f"{url}{path}: HTTP {r.status_code}: {error_message(r)}", transport=False)
        if r.status_code >= 400:
            raise SGLangRequestError(url + path, r.status_code, error_message(r))
        return r

    def _info(self, route: str, old_route: str, server: int) -> dict:
        """GET the current route, falling back to its deprecated name on 404 (older servers)."""
        try:
            r = self._call("GET", route, server)
        except SGLangRequestError as e:
            if e.status != 404:
                raise
            r = self._call("GET", old_route, server)
        body = r.json()
        if not isinstance(body, dict):
            raise SGLangError(f"{self.urls[server]}{route} answered {str(body)[:200]}, not an object")
        return body

    def model_info(self, server: int = 0) -> dict:
        """/model_info (the current route since sglang 0.5.13; /get_model_info is deprecated there)."""
        return self._info("/model_info", "/get_model_info", server)

    def server_info(self, server: int = 0) -> dict:
        """/server_info (falls back to /get_server_info): the server's launch arguments and state."""
        return self._info("/server_info", "/get_server_info", server)

    def _supports_video(self, server: int) -> bool:
        url = self.urls[server]
        if url not in self._video_ok:
            self._video_ok[url] = self.model_info(server).get("accepts_video_frames") is True
        return self._video_ok[url]

    def _honours_seeds(self, server: int) -> bool:
        """SGLang applies `sampling_seed` only under --enable-deterministic-inference (launch/sglang_server.sh
        with SGLANG_DETERMINISTIC=1); elsewhere a seed is ignored, and with flashinfer sampling plus top-p/k it
        trips an assertion. So seeds go only to servers that say they honour them; the rest are reported once."""
        url = self.urls[server]
        with self._info_lock:  # concurrent first requests: one look-up, one report
            if url not in self._seeds_ok:
                self._seeds_ok[url] = self._probe_seeds(server)
        return self._seeds_ok[url]

    def _probe_seeds(self, server: int) -> bool:
        url = self.urls[server]
        try:
            ok = self.server_info(server).get("enable_deterministic_inference") is True
        except ServerFailure:
            raise  # the server is down: the request moves on, and the question waits for its return
        except SGLangError as e:
            logger.warning("%s: server_info unavailable (%s); sending no sampling seeds", url, e)
            return False
        if not ok:
            logger.warning(
                "%s ignores sampling_seed (not started with --enable-deterministic-inference): rollouts "
                "there are not reproducible from the run seed; seeds are not sent to it",
                url,
            )
        return ok

    # ------------------------------------------------------------------------------------ generation

    def _generate_one(self, request: GenerationRequest) -> GenerationResult:
        expected = self.expected_prompt_tokens(request)
        ids: list[int] = []
        lps: list[float] = []
        current = request
        for attempt in range(self.max_resubmits + 1):
            result = self._send(current, expected + len(ids))
            ids += result.output_ids
            lps += result.logprobs
            if result.finish_reason != FINISH_ABORT:
                break
            left = request.sampling.max_new_tokens - len(ids)
            if left <= 0:  # aborted exactly at the budget: that is a length finish
                result = dataclasses.replace(result, finish_reason=FINISH_LENGTH)
                break
            if attempt == self.max_resubmits:
                break
            # Paused for a weight update: continue from the partial output, as AReaL does.
            with self._lock:
                self.resubmits += 1
            current = dataclasses.replace(
                request,
                input_ids=request.input_ids + tuple(ids),
                sampling=dataclasses.replace(request.sampling, max_new_tokens=left),
            )
        return GenerationResult(
            tuple(ids), tuple(lps), result.finish_reason, result.matched_stop, result.weight_version, expected
        )

    def _send(self, request: GenerationRequest, expected: int) -> GenerationResult:
        """One /generate on the fleet; after a server failure it is resubmitted to a server in rotation."""
        failures: list[ServerFailure] = []
        prefer = self._preferred(request.rid)
        for attempt in range(self.retries + 1):
            try:
                server = self.fleet.acquire(prefer)
            except NoServerError as e:
                earlier = "; earlier attempts: " + "; ".join(map(str, failures)) if failures else ""
                raise SGLangUnavailable(f"request {request.rid!r}: {e}{earlier}") from None
            try:
                result = self._post_generate(request, server, expected)
            except ServerFailure as e:
                failures.append(e)
                self.fleet.release(server, str(e), resubmitted=attempt < self.retries)
                continue
            except BaseException:
                self.fleet.release(server)  # the request's fault, not the server's
                raise
            self.fleet.release(server)
            return result
        summary = f"request {request.rid!r} failed {len(failures)} times: " + "; ".join(map(str, failures))
        raise SGLangUnavailable(summary) if all(f.transport for f in failures) else SGLangError(summary)

    def _post_generate(self, request: GenerationRequest, server: int, expected: int) -> GenerationResult:
        url = self.urls[server]
        if any(isinstance(m, Video) for m in request.media) and not self._supports_video(server):
            raise SGLangError(
                f"request {request.rid!r} has a video, but {url} does not take frame lists in video_data (real "
                "SGLang samples and resizes video files itself, so its frames and token counts would not be the "
                "trainer's); serve with pixel_reasoner_jax.serve or send the frames as images"
            )
        send_seed = request.seed is not None and self._honours_seeds(server)
        if request.seed is not None and not send_seed:
            with self._lock:
                self.unseeded_requests += 1
        payload = self.build_payload(request, send_seed=send_seed)
        # Each attempt its own rid: SGLang rejects a rid still in flight (reference/sglang.md §12).
        payload["rid"] = f"{request.rid or 'req'}.{uuid.uuid4().hex[:12]}"
        r = self._call("POST", "/generate", server, body=payload)
        try:
            body = r.json()
        except ValueError:
            raise SGLangError(f"{url}/generate returned non-JSON: {r.text[:200]!r}") from None
        where = f"{url}/generate (rid {request.rid!r})"
        result = parse_generate(body, where, request, expected, self.factor, self.temporal)
        if result.finish_reason != FINISH_ABORT:
            self._check_version(result.weight_version, where)
        return result

    def _check_version(self, version: str, where: str) -> None:
        expected = self.fleet.current
        if expected is None or version == expected or self.stale == "ignore":
            return
        if self.stale == "error":
            raise StaleWeightsError(f"{where}: sample from weights {version!r}, expected {expected!r}")
        with self._lock:
            self.stale_samples += 1
        logger.warning("%s: stale sample from weights %r (expected %r)", where, version, expected)

    # ----------------------------------------------------------------------------------- weight push

    def push_weights(
        self,
        export_fn: Callable[[str], object],
        version: str | int,
        shared_dir: str | os.PathLike,
        *,
        server_dir: str | None = None,
        abort_all_requests: bool = False,
    ) -> Path:
        """Exports weights, publishes them atomically, and loads them on every server not known to be down.

        export_fn(out_dir) writes an HF folder (config.json + safetensors) into a temporary folder of
        shared_dir, published as `<shared_dir>/v<version>` (rollout/publish.py); each server then gets POST
        /update_weights_from_disk {model_path, weight_version, load_format: "auto"}. From then on responses
        are checked against this version, and a server that did not load it (down, or its load failed) stays
        out of rotation until the prober has pushed it this folder. Older pushed folders are deleted (the
        last `keep_pushed` stay).

        Args:
          export_fn: writes the folder.
          version: the new weight_version label (str(step)).
          shared_dir: a folder the servers can read.
          server_dir: shared_dir as the servers see it, when mounted elsewhere (default: the same path).
          abort_all_requests: abort in-flight generations instead of waiting for them.

        Returns:
          The published folder.

        Raises:
          WeightPushError: the export failed, or no server loaded the weights and one of them rejected them
            (a message per server); the version is then unchanged.
        """
        version = str(version)
        try:
            final = publish_folder(export_fn, shared_dir, f"v{version}")
        except Exception as e:
            raise WeightPushError(
                f"exporting weights {version} to {shared_dir} failed: {type(e).__name__}: {e}"
            ) from e
        model_path = str(Path(server_dir) / final.name) if server_dir else str(final.resolve())

        def load(i: int) -> SGLangError | None:
            try:
                self._load(i, model_path, version, abort_all_requests)
            except SGLangError as e:
                return e
            return None

        targets = self.fleet.alive()
        failed = {i: e for i, e in zip(targets, self._pool.map(load, targets)) if e is not None}
        loaded = [i for i in targets if i not in failed]
        if not loaded and any(not (isinstance(e, ServerFailure) and e.transport) for e in failed.values()):
            raise WeightPushError(
                f"weights {version} from {model_path} not loaded: " + " | ".join(map(str, failed.values()))
            )
        for i in loaded:
            self.fleet.served(i, version)
        for i, e in failed.items():
            self.fleet.fail(i, f"weights {version} not loaded: {e}")
        self._current_path = (model_path, version)
        self.fleet.set_current(version)
        self._pushed = [p for p in self._pushed if p != final] + [final]
        while len(self._pushed) > self.keep_pushed:
            shutil.rmtree(self._pushed.pop(0), ignore_errors=True)
        logger.info(
            "weights %s pushed to %d of %d servers from %s", version, len(loaded), len(self.urls), model_path
        )
        return final

    def _load(self, server: int, model_path: str, version: str, abort_all_requests: bool = False) -> None:
        """POST /update_weights_from_disk on one server, then checks the version it reports."""
        url = self.urls[server]
        body = {"model_path": model_path, "weight_version": version, "load_format": "auto",
                "abort_all_requests": abort_all_requests}  # fmt: skip
        r = self._call("POST", "/update_weights_from_disk", server, body=body, timeout=self.update_timeout_s)
        if r.json().get("success") is not True:
            raise SGLangError(f"{url}: {r.json().get('message')}")
        got = self.model_info(server).get("weight_version")
        if got != version:
            raise SGLangError(f"{url}: serves weight_version {got!r} after the update")

    def _probe(self, server: int) -> str:
        """The fleet's probe of a failed server: /health, then the version it serves, loading the last pushed
        folder first when it serves another (it was down or failed the push). Returns the version."""
        url = self.urls[server]
        r = self._http.get(url + "/health", timeout=httpx.Timeout(HEALTH_TIMEOUT_S, connect=self._connect))
        if r.status_code != 200:
            raise SGLangError(f"{url}/health answered HTTP {r.status_code}")
        version = str(self.model_info(server).get("weight_version", ""))
        pushed = self._current_path
        if pushed is None or version == pushed[1] or self.fleet.current != pushed[1]:
            return version
        logger.info(
            "%s serves weights %r: loading the current %r from %s", url, version, pushed[1], pushed[0]
        )
        self._load(server, *pushed)
        return pushed[1]

    def expect_weight_version(self, version: str | int) -> None:
        """Checks later responses against `version`: weights another client (another trainer process) has
        pushed to these servers. Each server rejoins this client's rotation once a probe sees it serve them."""
        self.fleet.set_current(str(version))

    def health(self) -> dict[str, bool]:
        """url -> whether GET /health answers 200 now (no retries)."""
        out = {}
        for url in self.urls:
            try:
                out[url] = self._http.get(url + "/health", timeout=self._connect).status_code == 200
            except httpx.TransportError:
                out[url] = False
        return out
