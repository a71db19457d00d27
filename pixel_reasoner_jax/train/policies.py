"""The rollout policy of a run: the backend factory (in-process JaxSampler or SGLang servers, optionally a
local server), per-request sampling seeds, and bringing the policy to the trainer's weights.

Shared by the GRPO loop and the eval runner.
"""

import dataclasses
import pathlib
import socket
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixel_reasoner_jax import distributed
from pixel_reasoner_jax.config import ConfigError, RunConfig, rollout_mesh_shape
from pixel_reasoner_jax.models import hf_io
from pixel_reasoner_jax.rollout.policy import GenerationRequest, GenerationResult, Policy
from pixel_reasoner_jax.rollout.sampler import JaxSampler
from pixel_reasoner_jax.rollout.sglang_client import SGLangClient
from pixel_reasoner_jax.serve.launch import start_local_server
from pixel_reasoner_jax.sharding import make_mesh
from pixel_reasoner_jax.train.run import RunContext, host

PUSH_DIR = "pushed_weights"
SERVER_LOG = "server.log"


def request_seed(base: int, step: int, rid: str) -> int:
    """A sampling seed from (run seed, loop step, request id) alone: a resumed run draws the same tokens."""
    words = np.random.SeedSequence([base, step, zlib.crc32(rid.encode())]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) | (int(words[1]) >> 1)


def sampler_copy(params, dtype: str, copy: bool = True):
    """New buffers of `params` in the sampler's weight dtype (`rollout.sampler_param_dtype`), never the
    train state's own: the train step donates those. Floating leaves only; a cast is itself the copy.
    copy=False only casts: for arrays that are already the caller's own (a host gather, a snapshot)."""
    want = jnp.dtype(dtype)

    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == want:
            return x.copy() if copy else x
        return x.astype(want)

    return jax.tree.map(one, params)


class SeededPolicy(Policy):
    """Gives every request of one rollout a seed derived from its rid (`request_seed`)."""

    def __init__(self, inner: Policy, base: int, step: int):
        self.inner, self.base, self.step = inner, base, step

    @property
    def weight_version(self) -> str:
        return self.inner.weight_version

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        seeded = [dataclasses.replace(r, seed=request_seed(self.base, self.step, r.rid)) for r in requests]
        return self.inner.generate(seeded)


def open_policy(
    cfg: RunConfig, model_cfg, processor, model_fn, *, version: str, workdir, max_batch: int,
    shared_server: bool = False,
):  # fmt: skip
    """(policy, SGLang client or None, local server or None) for `cfg.rollout.backend`.

    The in-process sampler runs on this process's devices: each process samples its own episodes.

    Args:
      model_fn: builds the Qwen25VL the in-process sampler serves (called for backend "jax" only), its
        parameters on this process's devices.
      version: the weight label of that model.
      workdir: where a launched local server writes its log.
      max_batch: episodes decoded together.
      shared_server: with rollout.launch_local_server, process 0 alone launches the server and every
        process uses it (one set of servers, which one process keeps at the trainer's weights); False:
        each process launches its own.

    Raises:
      ConfigError: rollout.launch_local_server with shared_server over processes on several hosts (the
        server listens on 127.0.0.1 of its own host).
    """
    if cfg.rollout.backend == "jax":
        devices = jax.local_devices()
        data, tensor = rollout_mesh_shape(cfg.mesh, len(devices))
        sampler = JaxSampler(
            model_fn(),
            model_cfg,
            processor,
            max_batch=max_batch,
            seq_buckets=cfg.data.seq_buckets,
            patch_buckets=cfg.data.patch_buckets,
            decode_bucket=cfg.rollout.decode_bucket,
            mesh=make_mesh(data, 1, tensor, devices=devices),
            rules="rollout",
            weight_version=version,
        )
        return sampler, None, None
    urls, server = list(cfg.rollout.urls), None
    if cfg.rollout.launch_local_server:
        shared = shared_server and jax.process_count() > 1
        if shared and len(set(distributed.allgather_object(socket.gethostname()))) > 1:
            raise ConfigError(
                "rollout.launch_local_server",
                f"the {jax.process_count()} trainer processes run on several hosts and a local server is "
                "reachable on its own host only; launch SGLang servers and pass rollout.sglang_urls",
            )
        url = None
        if not shared or jax.process_index() == 0:
            url, server = start_local_server(
                cfg.model.checkpoint,
                max_batch=max_batch,
                weight_version=version,
                timeout_s=cfg.rollout.request_timeout_s,
                log_path=pathlib.Path(workdir) / SERVER_LOG,
            )
        urls.append(distributed.broadcast_object(url) if shared else url)
    r = cfg.rollout
    client = SGLangClient(urls, timeout_s=r.request_timeout_s, retries=r.retries, wait_s=r.server_wait_s,
                          backoff_s=r.health_backoff_s, max_backoff_s=r.health_max_backoff_s)  # fmt: skip
    return client, client, server


def push_weights(client: SGLangClient, params, model_cfg, version: str, shared_dir, *, extra_files_from=None):
    """Brings the client's servers to `params` as weight `version`, from any number of trainer processes.

    Every process calls it (the export gathers the parameters collectively); process 0 alone writes the
    folder and loads it on the servers, the others wait at a barrier and then expect `version` from the
    servers. Several pushers would each publish and load the same weights, and a process that writes no
    files has nothing to push.
    """

    def export(out: str) -> None:
        hf_io.export_hf(params, model_cfg, out, extra_files_from=extra_files_from)

    if jax.process_index() == 0:
        client.push_weights(export, version, shared_dir)
    else:
        export(str(shared_dir))  # takes part in the gathers; writes nothing on this process
    distributed.barrier("pixel_reasoner_push_weights")
    client.expect_weight_version(version)


class Rollouts:
    """The run's Policy (in-process JaxSampler, or SGLang servers) and how new weights reach it."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

        def model_fn():
            return nnx.merge(ctx.graphdef, self._sampler_params(), ctx.state.buffers)

        # A launched server starts from the checkpoint folder, labelled "base": the first sync pushes ours.
        version = self.version() if ctx.cfg.rollout.backend == "jax" else "base"
        self.policy, self.client, self.server = open_policy(
            ctx.cfg, ctx.model_cfg, self.processor, model_fn, version=version, workdir=ctx.workdir,
            max_batch=ctx.cfg.rollout.batch_size, shared_server=True,
        )  # fmt: skip

    def _sampler_params(self):
        """The train state's parameters for this process's sampler, in `rollout.sampler_param_dtype`: copies
        (the train step donates the state's buffers, which must never be the sampler's), gathered to the
        host when they span processes (the sampler's devices are this process's only)."""
        dtype = self.ctx.cfg.rollout.sampler_param_dtype
        if jax.process_count() > 1:  # the gather is already a new host copy: only cast it
            return sampler_copy(jax.tree.map(distributed.to_host, self.ctx.state.params), dtype, copy=False)
        return sampler_copy(self.ctx.state.params, dtype)

    @property
    def processor(self):
        r = self.ctx.cfg.rollout
        return self.ctx.processor(r.model_min_pixels, r.model_max_pixels)

    def version(self) -> str:
        """The weight label of the current train state: optimizer updates applied."""
        return str(int(host(self.ctx.state.step)))

    @property
    def units(self) -> tuple[str, int]:
        """What rollout throughput is divided by: ("device", devices of the in-process sampler's mesh) or
        ("server", SGLang servers; their devices are not known here)."""
        if self.client is None:
            return "device", jax.device_count()
        return "server", len(self.client.urls)

    def sync(self) -> None:
        """Brings the policy to the train state's weights when its version lags (after a step or resume)."""
        version = self.version()
        if self.policy.weight_version == version:
            return
        # Copies for the in-process sampler (the train step donates the state's buffers); SGLang servers get
        # an export of the state itself.
        self.push(self._sampler_params() if self.client is None else self.ctx.state.params, version)

    def push(self, params, version: str) -> None:
        """Brings the policy to `params` labelled `version` unless it serves that version already.

        The in-process sampler keeps `params` (or its own resharded copy): pass arrays no train step will
        donate. Safe from the rollout worker thread (train/async_rollout.py) while the trainer steps.
        """
        if self.policy.weight_version == version:
            return
        if self.client is None:
            # Already the caller's own arrays (see above): only cast to the sampler's weight dtype.
            dtype = self.ctx.cfg.rollout.sampler_param_dtype
            self.policy.update_weights(sampler_copy(params, dtype, copy=False), version)
            return
        ctx = self.ctx
        push_weights(
            self.client, params, ctx.model_cfg, version, ctx.workdir / PUSH_DIR,
            extra_files_from=ctx.cfg.model.checkpoint,
        )  # fmt: skip

    def metrics(self) -> dict[str, float]:
        """The server fleet's counters (SGLangClient.fleet_metrics); none for the in-process sampler."""
        return {} if self.client is None else self.client.fleet_metrics()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()
