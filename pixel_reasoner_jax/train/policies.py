"""The rollout policy of a run: the backend factory (in-process JaxSampler or SGLang servers, optionally a
local server), per-request sampling seeds, and bringing the policy to the trainer's weights.

Shared by the GRPO loop and the eval runner.
"""

import dataclasses
import pathlib
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixel_reasoner_jax.config import RunConfig, rollout_mesh_shape
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


def sampler_copy(params, dtype: str):
    """New buffers of `params` in the sampler's weight dtype (`rollout.sampler_param_dtype`), never the
    train state's own: the train step donates those. Floating leaves only; a cast is itself the copy."""
    want = jnp.dtype(dtype)

    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == want:
            return x.copy()
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


def open_policy(cfg: RunConfig, model_cfg, processor, model_fn, *, version: str, workdir, max_batch: int):
    """(policy, SGLang client or None, local server or None) for `cfg.rollout.backend`.

    Args:
      model_fn: builds the Qwen25VL the in-process sampler serves (called for backend "jax" only).
      version: the weight label of that model.
      workdir: where a launched local server writes its log.
      max_batch: episodes decoded together.
    """
    if cfg.rollout.backend == "jax":
        data, tensor = rollout_mesh_shape(cfg.mesh, jax.device_count())
        sampler = JaxSampler(
            model_fn(),
            model_cfg,
            processor,
            max_batch=max_batch,
            seq_buckets=cfg.data.seq_buckets,
            patch_buckets=cfg.data.patch_buckets,
            decode_bucket=cfg.rollout.decode_bucket,
            mesh=make_mesh(data, 1, tensor),
            rules="rollout",
            weight_version=version,
        )
        return sampler, None, None
    urls, server = list(cfg.rollout.urls), None
    if cfg.rollout.launch_local_server:
        url, server = start_local_server(
            cfg.model.checkpoint,
            max_batch=max_batch,
            weight_version=version,
            timeout_s=cfg.rollout.request_timeout_s,
            log_path=pathlib.Path(workdir) / SERVER_LOG,
        )
        urls.append(url)
    client = SGLangClient(urls, timeout_s=cfg.rollout.request_timeout_s, retries=cfg.rollout.retries)
    return client, client, server


class Rollouts:
    """The run's Policy (in-process JaxSampler, or SGLang servers) and how new weights reach it."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

        def model_fn():
            params = sampler_copy(ctx.state.params, ctx.cfg.rollout.sampler_param_dtype)
            return nnx.merge(ctx.graphdef, params, ctx.state.buffers)

        # A launched server starts from the checkpoint folder, labelled "base": the first sync pushes ours.
        version = self.version() if ctx.cfg.rollout.backend == "jax" else "base"
        self.policy, self.client, self.server = open_policy(
            ctx.cfg, ctx.model_cfg, self.processor, model_fn,
            version=version, workdir=ctx.workdir, max_batch=ctx.cfg.rollout.batch_size,
        )  # fmt: skip

    @property
    def processor(self):
        r = self.ctx.cfg.rollout
        return self.ctx.processor(r.model_min_pixels, r.model_max_pixels)

    def version(self) -> str:
        """The weight label of the current train state: optimizer updates applied."""
        return str(int(host(self.ctx.state.step)))

    def sync(self) -> None:
        """Brings the policy to the train state's weights when its version lags (after a step or resume)."""
        version = self.version()
        if self.policy.weight_version == version:
            return
        params = self.ctx.state.params
        if self.client is None:
            self.policy.update_weights(
                sampler_copy(params, self.ctx.cfg.rollout.sampler_param_dtype), version
            )
            return
        ctx = self.ctx
        self.client.push_weights(
            lambda out: hf_io.export_hf(
                params, ctx.model_cfg, out, extra_files_from=ctx.cfg.model.checkpoint
            ),
            version,
            ctx.workdir / PUSH_DIR,
        )

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()
