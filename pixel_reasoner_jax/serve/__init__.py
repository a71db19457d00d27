"""SGLang-API-compatible HTTP server over the project's JAX model (tests, CPU/TPU serving).

`python -m pixel_reasoner_jax.serve --checkpoint DIR [--port P] [--host H]`.
"""
