"""Test harness: 8 fake CPU devices, one thread, float32 matmuls at full precision, a tiny checkpoint.

Environment variables must be set before jax or torch is imported anywhere, hence at module top.
"""

import os

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
