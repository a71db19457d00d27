"""SGLang-API-compatible HTTP server over the project's JAX model (tests, CPU/TPU serving).

`python -m pixel_reasoner_jax.serve --checkpoint DIR [--port P] [--host H]`. Modules, lowest first: spec
(ModelSpec), media (image items), protocol (/generate and control bodies), chat (/v1/chat/completions),
batching (BatchWorker), backend (Backend, JaxBackend), http (routes, SGLangServer, ServerConfig), launch
(start_local_server, for a run that serves its own rollouts), __main__ (the CLI). rollout/ imports none of them.
"""
