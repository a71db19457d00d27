"""Test harness: 8 fake CPU devices, one thread, float32 matmuls at full precision, a tiny checkpoint, and
one persistent compilation cache for the whole run.

Environment variables must be set before jax or torch is imported anywhere, hence at module top.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_multi_thread_eigen=false"
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# One persistent XLA compilation cache per test run, in this process and every process a test starts (they
# inherit the environment): the toy GRPO jobs of several test files, their resumed copies and the processes of
# one launch compile the same programs, and the second build of a program then loads it instead (~40 s of CPU
# per toy trainer). The environment wins over the config's compile_cache_dir, so no test writes to the user's
# cache; set JAX_COMPILATION_CACHE_DIR to a folder of yours to keep the programs from one run to the next.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="pixel_reasoner_jax_test_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
# Programs that compile faster than this are cheaper to rebuild than to read back (main.CACHE_MIN_COMPILE_S).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random Qwen2.5-VL checkpoint folder in the Hugging Face layout, built once per run."""
    from pixel_reasoner_jax.models import tiny

    out = tmp_path_factory.mktemp("tiny_ckpt")
    tiny.write_tiny_checkpoint(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tok(tiny_ckpt):
    """The tiny checkpoint's tokenizer (the real Qwen2 BPE), loaded once per run."""
    from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer

    return QwenTokenizer.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="session")
def proc(tiny_ckpt):
    """The tiny checkpoint's image-processor settings, loaded once per run."""
    from pixel_reasoner_jax.processing.vision import ImageProcessorConfig

    return ImageProcessorConfig.from_pretrained(tiny_ckpt)


@pytest.fixture(autouse=True, scope="session")
def _torch_one_thread():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(scope="session")
def toy_grpo_config(tiny_ckpt):
    """Builds a validated GRPO RunConfig on 8 one-color toy prompts: a 44-token "notool" prompt, 2 sampled
    tokens, one 48-token bucket, so every rollout and step of the tiny checkpoint takes well under a second.

    Call it as `toy_grpo_config(workdir, **{"grpo.steps": 4, ...})`; data goes to workdir/data, the run to
    workdir/run.
    """
    import dataclasses

    import toy_grpo

    from configs import grpo as grpo_config
    from pixel_reasoner_jax import main as entry
    from pixel_reasoner_jax.config import validate

    def make(workdir, **overrides):
        rl_path = toy_grpo.write_data(workdir / "data")
        c = grpo_config.get_config("tiny")
        settings = {**toy_grpo.SETTINGS, "data.rl_path": str(rl_path)}
        for dotted, value in {**settings, **overrides}.items():
            section, key = dotted.split(".")
            setattr(getattr(c, section), key, value)
        cfg = entry.build_config(c, str(workdir / "run"))
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=str(tiny_ckpt)))
        validate(cfg, jax.device_count())
        return entry.prepare_assets(cfg)

    return make


# Files that take minutes (measured: the trap's two training runs ~5 min, the tiny job's and the two-process
# runs 2-3 min each) go first. The suite runs on two worker processes, each handed whole files in this
# order (pyproject's addopts: --dist loadfile --no-loadscope-reorder): a long file started last would run
# alone at the end while the other worker sits idle.
SLOW_FILES_FIRST = (
    "test_trap_direction.py",
    "test_main.py",
    "test_distributed.py",
    "test_grpo_async.py",
    "test_grpo_loop.py",
    "test_model_parity.py",
    "test_grpo_learns.py",
    "test_steps.py",
    "test_sampler.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
