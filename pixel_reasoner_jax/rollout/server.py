"""Alias of pixel_reasoner_jax.serve, kept for users' scripts: `python -m pixel_reasoner_jax.rollout.server`
runs the same CLI as `python -m pixel_reasoner_jax.serve`, and the public names below are re-exported.

New code imports from pixel_reasoner_jax.serve (http, launch, backend); nothing in rollout/ uses this module.
"""

import sys

from pixel_reasoner_jax.serve.__main__ import main
from pixel_reasoner_jax.serve.backend import DEFAULT_BACKEND
from pixel_reasoner_jax.serve.http import ServerConfig, SGLangServer
from pixel_reasoner_jax.serve.launch import LocalServer, start_local_server

__all__ = ["DEFAULT_BACKEND", "LocalServer", "SGLangServer", "ServerConfig", "main", "start_local_server"]

if __name__ == "__main__":
    sys.exit(main())
