"""SGLang-API-compatible HTTP server over the project's JAX model (or any Backend factory): the CLI.

`python -m pixel_reasoner_jax.serve --checkpoint DIR [--port P] [--host H]`: builds the backend in the
background (/health answers 503 until it is ready) and serves until SIGTERM or SIGINT.
"""

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from pixel_reasoner_jax.serve.backend import DEFAULT_BACKEND, resolve_factory
from pixel_reasoner_jax.serve.http import ServerConfig, SGLangServer

logger = logging.getLogger(__name__)


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
    try:
        config = ServerConfig(
            host=a.host,
            port=a.port,
            max_batch=a.max_batch,
            batch_wait_s=a.batch_wait_ms / 1000,
            allow_local_paths=a.allow_local_paths,
        )
    except ValueError as e:
        p.error(str(e))
    factory = resolve_factory(a.backend)
    server = SGLangServer(lambda: factory(a.checkpoint, a.weight_version), config).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    logger.info("listening on %s", server.url)
    try:
        server.wait_ready()
    except RuntimeError as e:
        server.stop()
        logger.error("%s", e)
        return 1
    done.wait()
    logger.info("shutting down")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
