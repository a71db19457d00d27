"""SGLang client as a Policy: token-in/token-out POST /generate over one or more servers, and weight push.

Works against real SGLang (>= 0.5.13, launch/sglang_server.sh) and the in-repo stand-in (serve/).

Video: real SGLang's `video_data` items are video files (path, URL or base64 container) that the server
decodes, samples and resizes itself, so the frames and token counts would not be the trainer's. Video items
are therefore sent as `{"frames": [PNG data URLs], "fps": x}` only to servers whose /get_model_info says
`accepts_video_frames: true` (serve/); any other server gets a clear error instead.
"""

import concurrent.futures
import dataclasses
import itertools
import logging
import os
import shutil
import threading
import time
import uuid
import weakref
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
from PIL import Image

from pixel_reasoner_jax.processing.vision import FACTOR
from pixel_reasoner_jax.rollout.media import expand_pads, expanded_length, media_pad_count, png_data_url
from pixel_reasoner_jax.rollout.policy import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationRequest,
    GenerationResult,
    Policy,
    Video,
)

logger = logging.getLogger(__name__)

IMAGE_PAD, VIDEO_PAD = 151655, 151656
STALE_MODES = ("error", "flag", "ignore")


class SGLangError(RuntimeError):
    """A server answered, but not with a usable result."""


class SGLangUnavailable(SGLangError):
    """No server answered (connection refused, timeouts) after every retry."""


class SGLangRequestError(SGLangError):
    """HTTP 4xx: the request itself is wrong; never retried."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"{url} answered HTTP {status}: {message}")
        self.url, self.status, self.message = url, status, message


class StaleWeightsError(SGLangError):
    """A sample came from weights other than the last pushed version."""


class WeightPushError(SGLangError):
    """Exporting, renaming or loading pushed weights failed (on at least one server)."""


def _error_message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "message" in body:
            return str(body["message"])
    return str(body)[:500]


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


class SGLangClient(Policy):
    """Policy over SGLang's native /generate (reference/sglang.md §3, §5).

    Each request is sent with ONE pad per media item, every sampling parameter explicit and
    `return_logprob`; the sampled ids are read from `output_token_logprobs`, and the server's expanded
    `prompt_tokens` is checked against the count implied by the image sizes. Requests run in parallel on
    a thread pool; connection errors and 5xx are retried with exponential backoff (moving to the next
    server), 4xx never.

    Args:
      urls: server base URLs, e.g. ["http://10.0.0.5:30000"].
      timeout_s: read timeout of one /generate call.
      retries: extra attempts after the first on connection errors and 5xx.
      backoff_s: sleep before retry k is backoff_s * 2**k.
      concurrency: parallel requests (threads and pooled connections).
      connect_timeout_s: connect timeout (short, so a dead server fails fast).
      update_timeout_s: read timeout of /update_weights_from_disk (loads take minutes for 7B).
      stale: when a response's weight_version differs from the last pushed one: "error" raises
        StaleWeightsError, "flag" counts it in `stale_samples` and returns the sample with its own version,
        "ignore" does neither.
      pin_key: maps a request's rid to a key; requests with the same key go to the same server (radix cache
        reuse across turns). None = round robin.
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
        if backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s!r}")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.update_timeout_s, self.stale, self.pin_key = update_timeout_s, stale, pin_key
        self.keep_pushed, self.max_resubmits = keep_pushed, max_resubmits
        self.factor, self.temporal = factor, temporal_patch_size
        self._connect = connect_timeout_s
        self._expected = expected_weight_version
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency),
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="sglang")
        self._rr = itertools.count()
        self._lock = threading.Lock()
        self._urls_cache: dict[int, tuple[weakref.ref, str]] = {}
        self._video_ok: dict[str, bool] = {}
        self._seeds_ok: dict[str, bool] = {}
        self._info_lock = threading.Lock()
        self._pushed: list[Path] = []
        self.stale_samples = 0
        self.resubmits = 0
        self.unseeded_requests = 0  # seeded requests sent without their seed (server ignores seeds)

    # ------------------------------------------------------------------------------------ Policy API

    @property
    def weight_version(self) -> str:
        """The version last pushed (or given as expected); "" before either."""
        return self._expected or ""

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

    def close(self) -> None:
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
        n_img = sum(1 for t in request.input_ids if t == IMAGE_PAD)
        n_vid = sum(1 for t in request.input_ids if t == VIDEO_PAD)
        imgs = sum(1 for m in request.media if isinstance(m, Image.Image))
        vids = sum(1 for m in request.media if isinstance(m, Video))
        if (n_img, n_vid) != (imgs, vids) or imgs + vids != len(request.media):
            raise ValueError(
                f"request {request.rid!r}: input_ids hold {n_img} image pads and {n_vid} video pads but media has "
                f"{imgs} images and {vids} videos (of {len(request.media)} items); send one pad per item"
            )
        for k, m in enumerate(request.media):
            try:
                media_pad_count(m, self.factor, self.temporal)
            except ValueError as e:
                raise ValueError(f"request {request.rid!r} media[{k}]: {e}") from None
        return expanded_length(len(request.input_ids), request.media, self.factor, self.temporal)

    def build_payload(self, request: GenerationRequest, *, send_seed: bool = True) -> dict:
        """The /generate body: explicit sampling parameters (SGLang fills omitted ones from the model's
        generation_config), untrimmed output, log-probs of the sampled tokens only, the expanded prompt ids.

        The rid is the request's; `_post_generate` gives every attempt its own (SGLang answers 400 to a rid
        still in flight, and notices a dropped connection only by polling, so a quick retry would collide).
        """
        s = request.sampling
        sampling = {
            "max_new_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "stop_token_ids": list(s.stop_token_ids),
            "skip_special_tokens": False,
            "spaces_between_special_tokens": False,
            "no_stop_trim": True,
            "ignore_eos": False,
            "n": 1,
        }
        if request.seed is not None and send_seed:
            sampling["sampling_seed"] = request.seed
        payload = {
            "rid": request.rid or uuid.uuid4().hex,
            "input_ids": list(request.input_ids),
            "sampling_params": sampling,
            "return_logprob": True,
            "logprob_start_len": -1,
            "top_logprobs_num": 0,
            "stream": False,
            "return_prompt_token_ids": True,  # sglang >= 0.5.13; older servers ignore unknown fields
        }
        images = [m for m in request.media if isinstance(m, Image.Image)]
        videos = [m for m in request.media if isinstance(m, Video)]
        if images:
            payload["image_data"] = [self._data_url(m) for m in images]
        if videos:
            payload["video_data"] = [
                {"frames": [self._data_url(f) for f in v.frames], "fps": v.fps} for v in videos
            ]
        return payload

    # ------------------------------------------------------------------------------------- transport

    def _server_for(self, rid: str) -> int:
        if self.pin_key is not None and rid:
            return zlib.crc32(self.pin_key(rid).encode()) % len(self.urls)
        return next(self._rr) % len(self.urls)

    def _call(
        self, method: str, path: str, server: int, *, body=None, timeout=None, failover: bool = True
    ) -> tuple[str, httpx.Response]:
        """One request with retries; moves to the next server on each retry when failover.

        `body` may be a callable: it is called once per attempt (a fresh rid for each /generate attempt).
        """
        errors, transport_only = [], True
        for attempt in range(self.retries + 1):
            url = self.urls[(server + attempt) % len(self.urls) if failover else server]
            try:
                r = self._http.request(
                    method, url + path, json=body() if callable(body) else body, timeout=timeout
                )
            except httpx.TransportError as e:
                errors.append(f"{url}: {type(e).__name__}: {e}")
            else:
                if r.status_code < 400:
                    return url, r
                if r.status_code < 500:
                    raise SGLangRequestError(url + path, r.status_code, _error_message(r))
                transport_only = False
                errors.append(f"{url}: HTTP {r.status_code}: {_error_message(r)}")
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        tried = sorted(set(self.urls if failover else [self.urls[server]]))
        summary = f"{method} {path} failed {self.retries + 1} times on {tried}: " + "; ".join(errors)
        raise SGLangUnavailable(summary) if transport_only else SGLangError(summary)

    def _info(self, route: str, old_route: str, server: int) -> dict:
        """GET the current route, falling back to its deprecated name on 404 (older servers)."""
        try:
            _, r = self._call("GET", route, server, failover=False)
        except SGLangRequestError as e:
            if e.status != 404:
                raise
            _, r = self._call("GET", old_route, server, failover=False)
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
        server = self._server_for(request.rid)
        if any(isinstance(m, Video) for m in request.media) and not self._supports_video(server):
            raise SGLangError(
                f"request {request.rid!r} has a video, but {self.urls[server]} does not take frame lists in "
                "video_data (real SGLang samples and resizes video files itself, so its frames and token counts "
                "would not be the trainer's); serve with pixel_reasoner_jax.serve or send the frames as images"
            )
        ids: list[int] = []
        lps: list[float] = []
        current = request
        for attempt in range(self.max_resubmits + 1):
            result = self._post_generate(current, server, expected + len(ids))
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

    def _post_generate(self, request: GenerationRequest, server: int, expected: int) -> GenerationResult:
        send_seed = request.seed is not None and self._honours_seeds(server)
        if request.seed is not None and not send_seed:
            with self._lock:
                self.unseeded_requests += 1
        payload = self.build_payload(request, send_seed=send_seed)
        base = request.rid or "req"

        def attempt_body() -> dict:
            return {**payload, "rid": f"{base}.{uuid.uuid4().hex[:12]}"}

        url, r = self._call("POST", "/generate", server, body=attempt_body)
        try:
            body = r.json()
        except ValueError:
            raise SGLangError(f"{url}/generate returned non-JSON: {r.text[:200]!r}") from None
        return self._parse(body, url, request, expected)

    def _parse(self, body, url: str, request: GenerationRequest, expected: int) -> GenerationResult:
        where = f"{url}/generate (rid {request.rid!r})"
        if isinstance(body, list) and len(body) == 1:
            body = body[0]
        meta = body.get("meta_info") if isinstance(body, dict) else None
        if not isinstance(meta, dict):
            raise SGLangError(f"{where}: response has no meta_info object: {str(body)[:200]}")
        finish = meta.get("finish_reason") or {}
        kind = finish.get("type") if isinstance(finish, dict) else None
        if kind not in (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT):
            raise SGLangError(f"{where}: unknown finish_reason {finish!r}")
        if kind == FINISH_ABORT:
            # SGLang's abort answer has no prompt_tokens and may lack the log-probs: the partial output is
            # dropped and the caller resubmits from the same prompt (reference/sglang.md §12).
            return GenerationResult((), (), FINISH_ABORT, None, str(meta.get("weight_version", "")), expected)
        if meta.get("prompt_tokens") != expected:
            raise SGLangError(
                f"{where}: server counted {meta.get('prompt_tokens')} prompt tokens, expected {expected} "
                f"({len(request.input_ids)} ids with {len(request.media)} media pads expanded); the server "
                "re-tokenized the prompt or resized an image (send one pad per image, sides multiples of 28)"
            )
        lp_entries = meta.get("output_token_logprobs")
        if not isinstance(lp_entries, list):
            raise SGLangError(f"{where}: meta_info.output_token_logprobs missing (return_logprob ignored?)")
        try:
            ids = tuple(int(e[1]) for e in lp_entries)
            lps = tuple(float(e[0]) for e in lp_entries)
        except (TypeError, ValueError, IndexError):
            raise SGLangError(f"{where}: malformed output_token_logprobs {str(lp_entries)[:200]}") from None
        if "output_ids" in body and list(body["output_ids"]) != list(ids):
            raise SGLangError(
                f"{where}: output_ids {body['output_ids'][:20]} disagree with output_token_logprobs"
            )
        self._check_prompt_ids(body.get("prompt_token_ids"), request, where)
        matched = finish.get("matched")
        version = str(meta.get("weight_version", ""))
        self._check_version(version, where)
        return GenerationResult(
            ids, lps, kind, matched if isinstance(matched, int) and not isinstance(matched, bool) else None, version,
            expected,
        )  # fmt: skip

    def _check_prompt_ids(self, got, request: GenerationRequest, where: str) -> None:
        """The server's expanded prompt (`return_prompt_token_ids`, sglang >= 0.5.13) against ours.

        Text positions must be identical (a re-tokenized prompt differs there even when its length agrees);
        inside a media run only the length is compared, since a server may write cache keys in place of the
        pad id there. Absent ids (older servers) are not checked: the count check above still applies.
        """
        if got is None:
            return
        pads = (IMAGE_PAD, VIDEO_PAD)
        want = expand_pads(request.input_ids, request.media, pads, self.factor, self.temporal)
        if not isinstance(got, list) or len(got) != len(want):
            raise SGLangError(f"{where}: prompt_token_ids has {len(got) if isinstance(got, list) else got!r} ids, "
                              f"expected {len(want)}")  # fmt: skip
        for k, (g, w) in enumerate(zip(got, want)):
            if w not in pads and g != w:
                raise SGLangError(
                    f"{where}: the server's prompt differs from ours at position {k} (id {g}, expected {w}): it "
                    "re-tokenized the prompt (SGLANG_MM_AVOID_RETOKENIZE off, or its fallback after a failure)"
                )

    def _check_version(self, version: str, where: str) -> None:
        if self._expected is None or version == self._expected or self.stale == "ignore":
            return
        if self.stale == "error":
            raise StaleWeightsError(f"{where}: sample from weights {version!r}, expected {self._expected!r}")
        with self._lock:
            self.stale_samples += 1
        logger.warning("%s: stale sample from weights %r (expected %r)", where, version, self._expected)

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
        """Exports weights, publishes them atomically, and loads them on EVERY server.

        export_fn(out_dir) writes an HF folder (config.json + safetensors) into out_dir, which exists and is
        `<shared_dir>/.tmp-<version>-<uuid>`; it is fsynced and renamed to `<shared_dir>/v<version>`, then
        each server gets POST /update_weights_from_disk {model_path, weight_version, load_format: "auto"}.
        After all succeed, later responses are checked against this version and older pushed folders are
        deleted (the last `keep_pushed` stay).

        Args:
          export_fn: writes the folder.
          version: the new weight_version label (str(step)).
          shared_dir: a folder the servers can read.
          server_dir: shared_dir as the servers see it, when mounted elsewhere (default: the same path).
          abort_all_requests: abort in-flight generations instead of waiting for them.

        Returns:
          The published folder.

        Raises:
          WeightPushError: export failed, or a server did not load the weights (message per server).
        """
        version = str(version)
        shared = Path(shared_dir)
        shared.mkdir(parents=True, exist_ok=True)
        tmp = shared / f".tmp-{version}-{uuid.uuid4().hex}"
        final = shared / f"v{version}"
        tmp.mkdir()
        try:
            export_fn(str(tmp))
            if not (tmp / "config.json").is_file():
                raise WeightPushError(f"export_fn wrote no config.json into {tmp}")
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(shared)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, WeightPushError | KeyboardInterrupt):
                raise
            raise WeightPushError(
                f"exporting weights {version} to {tmp} failed: {type(e).__name__}: {e}"
            ) from e
        model_path = str(Path(server_dir) / final.name) if server_dir else str(final.resolve())
        body = {"model_path": model_path, "weight_version": version, "load_format": "auto",
                "abort_all_requests": abort_all_requests}  # fmt: skip

        def update(i: int) -> str | None:
            try:
                _, r = self._call("POST", "/update_weights_from_disk", i, body=body, timeout=self.update_timeout_s,
                                  failover=False)  # fmt: skip
            except SGLangError as e:
                return str(e)
            if r.json().get("success") is not True:
                return f"{self.urls[i]}: {r.json().get('message')}"
            got = self.model_info(i).get("weight_version")
            return (
                None if got == version else f"{self.urls[i]}: serves weight_version {got!r} after the update"
            )

        failures = [f for f in self._pool.map(update, range(len(self.urls))) if f]
        if failures:
            raise WeightPushError(f"weights {version} from {model_path} not loaded: " + " | ".join(failures))
        self._expected = version
        self._pushed = [p for p in self._pushed if p != final] + [final]
        while len(self._pushed) > self.keep_pushed:
            old = self._pushed.pop(0)
            shutil.rmtree(old, ignore_errors=True)
        logger.info("weights %s pushed to %d servers from %s", version, len(self.urls), model_path)
        return final

    def expect_weight_version(self, version: str | int) -> None:
        """Checks later responses against `version`: weights another client (another trainer process) has
        pushed to these servers."""
        self._expected = str(version)

    def health(self) -> dict[str, bool]:
        """url -> whether GET /health answers 200 now (no retries)."""
        out = {}
        for url in self.urls:
            try:
                out[url] = self._http.get(url + "/health", timeout=self._connect).status_code == 200
            except httpx.TransportError:
                out[url] = False
        return out
