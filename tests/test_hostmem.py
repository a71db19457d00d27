"""hostmem: glibc's malloc keeps freed memory for reuse on CPU runs (no fresh zero-filled pages per step)."""

import subprocess
import sys

import pytest

from pixel_reasoner_jax import hostmem

# A child process allocates, touches and frees a 256 MiB block twice (as XLA does with a program's
# temporaries at every call) and prints the page faults of the second round.
_CHILD = """
import ctypes, resource, sys
from pixel_reasoner_jax import hostmem
print(hostmem.configure(sys.argv[1]))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
def round_trip():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(ctypes.c_void_p(p))
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_round_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(hostmem._glibc() is None, reason="glibc only (the setting is a no-op elsewhere)")
def test_reuse_serves_the_second_big_block_without_page_faults():
    kept, faults = _second_round_faults("reuse")
    assert kept == "True"
    assert faults < 100  # the block comes back from the heap, already mapped
    kept, faults = _second_round_faults("system")
    assert kept == "False"
    assert faults > 10_000  # glibc mmaps it anew: 65,536 pages of 4 KiB (fewer with huge pages)


def test_auto_follows_the_platform(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert hostmem.accelerator_expected()
    assert hostmem.configure("auto") is False  # leaves an accelerator host's malloc alone
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not hostmem.accelerator_expected()
    assert hostmem.configure("system") is False
    with pytest.raises(ValueError, match="host_malloc"):
        hostmem.configure("tcmalloc")


def test_auto_without_platforms_needs_a_plugin_and_a_device_node(monkeypatch, tmp_path):
    """With JAX_PLATFORMS unset, an installed accelerator plugin counts only where the host has the device."""
    monkeypatch.setattr(hostmem, "_configured_platforms", lambda: "")
    monkeypatch.setattr(hostmem, "_plugin_installed", lambda: True)
    assert not hostmem.accelerator_expected(str(tmp_path))  # a CUDA plugin on a CPU-only machine
    for node in ("nvidia0", "kfd", "accel0"):
        (tmp_path / node).touch()
        assert hostmem.accelerator_expected(str(tmp_path)), node
        (tmp_path / node).unlink()
    (tmp_path / "nvidiactl").touch()  # the driver's control node alone is no GPU
    assert not hostmem.accelerator_expected(str(tmp_path))
    monkeypatch.setattr(hostmem, "_plugin_installed", lambda: False)
    (tmp_path / "nvidia0").touch()
    assert not hostmem.accelerator_expected(str(tmp_path))
