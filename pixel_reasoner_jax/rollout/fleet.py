"""A fleet of rollout servers: least-outstanding-requests balancing, failure bookkeeping, and /health probing
with backoff that re-admits a server only once it serves the current weights.

HTTP-free: the SGLang client (rollout/sglang_client.py) reports each request's outcome and supplies the probe
(health check + weight push); this module decides where requests go and when a server is back in rotation.
"""

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

# probe(server index) -> the weight version the server serves once the probe is done (it pushes the current
# weights when they are missing); raises when the server is not usable yet.
Probe = Callable[[int], str]


class NoServerError(RuntimeError):
    """No server was in rotation within the fleet's wait timeout (or the fleet was closed)."""


@dataclasses.dataclass
class ServerState:
    """One server as the fleet sees it; counters are cumulative since the fleet started.

    `alive` is False from a failure until a probe succeeds. `version` is the weight version it was last seen
    to serve (None before the first push: assumed current).
    """

    url: str
    alive: bool = True
    version: str | None = None
    outstanding: int = 0
    requests: int = 0
    failures: int = 0
    resubmissions: int = 0
    last_error: str = ""
    backoff_s: float = 0.0
    next_probe: float = 0.0


class Fleet:
    """Which server takes the next request, and a prober thread that brings failed servers back.

    A server is in rotation when it is alive and serves the current weight version. `acquire` picks the
    server in rotation with the fewest outstanding requests (ties: the lowest index) and waits up to
    `wait_s` when none is. A failure takes the server out; the prober then calls `probe` after `backoff_s`,
    doubling the delay after each failed probe (and each failure that follows a re-admission without a
    successful request in between) up to `max_backoff_s`.

    Args:
      urls: the servers, in a fixed order (metrics name them by index).
      probe: checks a server and brings it to the current weights (see `Probe`).
      wait_s: how long `acquire` waits for a server in rotation before NoServerError.
      backoff_s: delay of the first probe after a failure.
      max_backoff_s: the largest delay between probes.
      current: the weight version every server should serve (None: not checked until `set_current`).
    """

    def __init__(
        self,
        urls: Sequence[str],
        probe: Probe,
        *,
        wait_s: float,
        backoff_s: float,
        max_backoff_s: float,
        current: str | None = None,
    ):
        if not urls:
            raise ValueError("a fleet needs at least one server URL")
        if len(set(urls)) != len(urls):
            raise ValueError(f"server URLs must be distinct, got {list(urls)}")
        if not wait_s > 0 or not backoff_s > 0 or max_backoff_s < backoff_s:
            raise ValueError(
                f"need wait_s > 0, backoff_s > 0 and max_backoff_s >= backoff_s, got {wait_s}, {backoff_s}, "
                f"{max_backoff_s}"
            )
        self.servers = [ServerState(u) for u in urls]
        self.current = current
        self.wait_s, self.backoff_s, self.max_backoff_s = wait_s, backoff_s, max_backoff_s
        self._probe = probe
        self._cond = threading.Condition()
        self._closed = False
        self._prober: threading.Thread | None = None
        self._probing: int | None = None

    # ------------------------------------------------------------------------------------- rotation

    def _in_rotation(self, s: ServerState) -> bool:
        return s.alive and (self.current is None or s.version is None or s.version == self.current)

    def in_rotation(self) -> list[int]:
        """Indices of the servers that take requests now."""
        with self._cond:
            return [i for i, s in enumerate(self.servers) if self._in_rotation(s)]

    def alive(self) -> list[int]:
        """Indices of the servers not known to be down, less the one being probed: the targets of a weight
        push (a probe loads the current weights itself, and two loads at once could land out of order)."""
        with self._cond:
            return [i for i, s in enumerate(self.servers) if s.alive and i != self._probing]

    def acquire(self, prefer: int | None = None) -> int:
        """Reserves a server for one request: `prefer` when it is in rotation, else the least loaded.

        Raises:
          NoServerError: none in rotation for `wait_s` seconds (the message names every server and why).
        """
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while True:
                if self._closed:
                    raise NoServerError("the server fleet is closed")
                ready = [i for i, s in enumerate(self.servers) if self._in_rotation(s)]
                if ready:
                    if prefer not in ready:
                        prefer = min(ready, key=lambda k: (self.servers[k].outstanding, k))
                    s = self.servers[prefer]
                    s.outstanding += 1
                    s.requests += 1
                    return prefer
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoServerError(
                        f"no rollout server took requests for {self.wait_s:g} s: " + self._describe()
                    )
                self._ensure_prober()
                self._cond.wait(left)

    def release(self, i: int, error: str | None = None, *, resubmitted: bool = False) -> None:
        """Ends a request acquired on server i: a success, or a failure that takes the server out of
        rotation (`resubmitted`: the request goes to another server)."""
        with self._cond:
            s = self.servers[i]
            s.outstanding -= 1
            if error is None:
                s.backoff_s = 0.0
            else:
                self._fail(s, error)
                s.resubmissions += int(resubmitted)
            self._cond.notify_all()

    def fail(self, i: int, error: str) -> None:
        """Server i failed outside a request (a weight push): out of rotation until a probe succeeds."""
        with self._cond:
            self._fail(self.servers[i], error)

    def _fail(self, s: ServerState, error: str) -> None:
        s.failures += 1
        s.last_error = error
        if s.alive:  # the first of concurrent failures on one server sets its next probe
            s.alive = False
            s.backoff_s = min(max(2 * s.backoff_s, self.backoff_s), self.max_backoff_s)
            s.next_probe = time.monotonic() + s.backoff_s
            logger.warning("rollout server %s out of rotation: %s", s.url, error)
        self._ensure_prober()
        self._cond.notify_all()

    # ------------------------------------------------------------------------------------- weights

    def set_current(self, version: str) -> None:
        """The weight version every server must serve from now on; others leave rotation until probed."""
        with self._cond:
            self.current = version
            if any(not self._in_rotation(s) for s in self.servers):
                self._ensure_prober()
            self._cond.notify_all()

    def served(self, i: int, version: str) -> None:
        """Server i loaded `version` (a successful push)."""
        with self._cond:
            self.servers[i].version = version
            self._cond.notify_all()

    # ------------------------------------------------------------------------------------- prober

    def _ensure_prober(self) -> None:
        if self._prober is None and not self._closed:
            self._prober = threading.Thread(target=self._probe_loop, name="fleet-prober", daemon=True)
            self._prober.start()

    def _next_due(self) -> int | None:
        """Blocks until a server out of rotation is due for a probe; None when the fleet closes."""
        with self._cond:
            while not self._closed:
                out = [(s.next_probe, i) for i, s in enumerate(self.servers) if not self._in_rotation(s)]
                now = time.monotonic()
                if out and min(out)[0] <= now:
                    self._probing = min(out)[1]
                    return self._probing
                self._cond.wait(min(out)[0] - now if out else None)
        return None

    def _probe_loop(self) -> None:
        while (i := self._next_due()) is not None:
            s = self.servers[i]
            try:
                version, error = self._probe(i), None
            except Exception as e:  # noqa: BLE001 - any probe failure keeps the server out and is retried
                version, error = None, f"{type(e).__name__}: {e}"
            with self._cond:
                self._probing = None
                if error is None:
                    s.version = version
                    if self.current is not None and version != self.current:
                        error = f"serves weights {version!r}, the current ones are {self.current!r}"
                if error is None:
                    s.alive = True
                    logger.info("rollout server %s back in rotation (weights %r)", s.url, version)
                    self._cond.notify_all()
                    continue
                s.alive = False
                s.last_error = error
                s.backoff_s = min(max(2 * s.backoff_s, self.backoff_s), self.max_backoff_s)
                s.next_probe = time.monotonic() + s.backoff_s

    # ------------------------------------------------------------------------------------- reports

    def _describe(self) -> str:
        parts = []
        for s in self.servers:
            state = "down" if not s.alive else f"serves weights {s.version!r}, not {self.current!r}"
            parts.append(f"{s.url} ({state}; last error: {s.last_error or 'none'})")
        return "; ".join(parts)

    def metrics(self) -> dict[str, float]:
        """Servers in rotation, and each server's requests, failures and resubmissions (cumulative),
        keyed `fleet/server<i>/...` in the order of the URLs."""
        with self._cond:
            out = {"fleet/servers_healthy": float(sum(self._in_rotation(s) for s in self.servers))}
            for i, s in enumerate(self.servers):
                for name in ("requests", "failures", "resubmissions"):
                    out[f"fleet/server{i}/{name}"] = float(getattr(s, name))
            return out

    def close(self, timeout: float = 5.0) -> None:
        """Stops the prober (waiting up to `timeout` for a probe in flight); waiting acquires fail."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._prober is not None:
            self._prober.join(timeout)
