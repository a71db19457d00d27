"""Target hardware of a plan: Cloud TPU slice names, NVIDIA nodes and simulated CPU devices parsed into
device grids, memory per device and headroom, and the deviceless device lists that AOT compiles against.

One table (`TPU_GENERATIONS`) maps what users type (`v5p-16`, `v6e-32`, `h100-8`, `cpu:8`) to the topology
strings of `jax.experimental.topologies`; nothing here needs the target hardware.
"""

import dataclasses
import os
import pathlib
import re

# Cloud TPU generations: the topology prefix libtpu takes, Cloud names' unit (TensorCores per chip: v4 and
# v5p count 2 per chip, v5e and v6e 1), HBM per chip (Cloud TPU system-architecture pages), chip grids, and
# the TPU VM's host RAM per chip (v4: 407 GB per 4 chips, v5p: 448 GB per 4, v5e: 512 GiB per 8, v6e:
# ct6e-standard-8t's 1,440 GB per 8), which offloaded residuals (remat "offload_*") use.
TPU_GENERATIONS = {
    "v4": dict(prefix="v4", cores_per_chip=2, hbm=32 * 2**30, dims=3, host=407 * 10**9 // 4),
    "v5p": dict(prefix="v5p", cores_per_chip=2, hbm=95 * 2**30, dims=3, host=448 * 10**9 // 4),
    "v5e": dict(prefix="v5e", cores_per_chip=1, hbm=16 * 2**30, dims=2, host=512 * 2**30 // 8),
    "v5litepod": dict(prefix="v5e", cores_per_chip=1, hbm=16 * 2**30, dims=2, host=512 * 2**30 // 8),
    "v6e": dict(prefix="v6e", cores_per_chip=1, hbm=32 * 2**30, dims=2, host=1440 * 10**9 // 8),
}
# Chip grids by chip count: 2-D slices (v5e, v6e) and 3-D tori (v4, v5p), as Cloud TPU builds them.
GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
GRIDS_3D = {
    1: (1, 1, 1),
    2: (1, 1, 2),
    4: (2, 2, 1),
    8: (2, 2, 2),
    16: (2, 2, 4),
    32: (2, 4, 4),
    64: (4, 4, 4),
}
GRIDS_3D.update({n: (4, 4, n // 16) for n in (128, 256, 512)})

# NVIDIA nodes: XLA's GpuTargetConfigProto of each part (specs/, copied from openxla/xla), GPUs per node, and
# host RAM per GPU of the usual 8-GPU machine (a3-highgpu-8g: 1,872 GB; a3-ultragpu-8g: 2,952 GB).
GPU_SPECS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
GPU_HOST = {"h100": 1872 * 10**9 // 8, "h200": 2952 * 10**9 // 8}
GPUS_PER_NODE = 8
SPECS_DIR = pathlib.Path(__file__).with_name("specs")

# Share of each device's memory a plan may not use: TPU keeps ~10 % for the runtime and program buffers;
# GPU keeps 25 %: NCCL and cuBLAS workspaces and allocator fragmentation are not in XLA's numbers, and
# fusion/GEMM choices made without autotuning can differ from a compile on the device.
HEADROOM = {"tpu": 0.10, "gpu": 0.25, "cpu": 0.10}
# Share of each device's host RAM that offloaded residuals may use: the rest holds the process, the data
# pipeline, rollout buffers and the checkpoint's host copies.
HOST_OFFLOAD_SHARE = 0.5


class TopologyError(ValueError):
    """A topology name that is not one of the accepted forms."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed target.

    Attributes:
      name: what the user typed.
      platform: "tpu" | "gpu" | "cpu".
      num_devices: JAX devices of the target (TPU: one per chip, or per TensorCore on v4 without megacore).
      chips: physical chips (GPUs, TPU chips; the device count for cpu).
      memory_per_chip: HBM bytes of one chip (host memory share for cpu).
      topology: the string `topologies.get_topology_desc` takes ("v5p:2x2x2", "1x2x8"; "" for cpu).
      spec_file: GpuTargetConfigProto text file (gpu only).
      host_memory_per_chip: host RAM bytes per chip (cpu: 0, its device memory is host memory already).
    """

    name: str
    platform: str
    num_devices: int
    chips: int
    memory_per_chip: int
    topology: str = ""
    spec_file: str = ""
    host_memory_per_chip: int = 0

    @property
    def headroom(self) -> float:
        return HEADROOM[self.platform]


def _gpu_memory(spec_file: str) -> int:
    text = (SPECS_DIR / spec_file).read_text(encoding="utf-8")
    found = re.search(r"device_memory_size:\s*(\d+)", text)
    if not found:
        raise TopologyError(f"{spec_file} has no device_memory_size")
    return int(found.group(1))


def parse_topology(name: str) -> Topology:
    """`v4-8`, `v5e-N` / `v5litepod-N`, `v5p-N` (N = TensorCores), `v6e-N`, `h100-N`, `h200-N` (N GPUs,
    nodes of 8), `cpu:N` (simulated host devices).

    Raises:
      TopologyError: the name, and what was expected, when it is none of these or N does not make a slice.
    """
    if not isinstance(name, str) or not name.strip():
        raise TopologyError(f"topology must be a non-empty name like v5p-16, h100-8 or cpu:8, got {name!r}")
    text = name.strip().lower()
    cpu = re.fullmatch(r"cpu:(\d+)", text)
    if cpu:
        n = int(cpu.group(1))
        if n < 1:
            raise TopologyError(f"topology {name!r}: cpu:N needs N >= 1")
        return Topology(name, "cpu", n, n, _host_memory() // n)
    found = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not found:
        raise TopologyError(
            f"topology {name!r} is not <generation>-<N> (v5p-16, v6e-32, h100-8) or cpu:<N>; known "
            f"generations: {sorted(TPU_GENERATIONS) + sorted(GPU_SPECS)}"
        )
    gen, n = found.group(1), int(found.group(2))
    if gen in GPU_SPECS:
        if n < 1 or (n > GPUS_PER_NODE and n % GPUS_PER_NODE):
            raise TopologyError(
                f"topology {name!r}: {gen}-N needs 1 <= N <= {GPUS_PER_NODE} or whole {GPUS_PER_NODE}-GPU "
                f"nodes (a multiple of {GPUS_PER_NODE})"
            )
        hosts, per_host = (1, n) if n <= GPUS_PER_NODE else (n // GPUS_PER_NODE, GPUS_PER_NODE)
        spec = GPU_SPECS[gen]
        return Topology(name, "gpu", n, n, _gpu_memory(spec), f"1x{hosts}x{per_host}", spec, GPU_HOST[gen])
    if gen not in TPU_GENERATIONS:
        raise TopologyError(
            f"topology {name!r}: unknown generation {gen!r}; expected one of "
            f"{sorted(TPU_GENERATIONS) + sorted(GPU_SPECS)} or cpu:<N>"
        )
    g = TPU_GENERATIONS[gen]
    grids = GRIDS_3D if g["dims"] == 3 else GRIDS_2D
    chips, rest = divmod(n, g["cores_per_chip"])
    if rest or chips not in grids:
        unit = "TensorCores (2 per chip)" if g["cores_per_chip"] == 2 else "chips"
        sizes = sorted(c * g["cores_per_chip"] for c in grids)
        raise TopologyError(f"topology {name!r}: {gen}-N counts {unit}; N must be one of {sizes}")
    grid = "x".join(str(d) for d in grids[chips])
    # Devices per chip are known once libtpu describes the slice (v4 may show 2 per chip); see devices().
    return Topology(
        name, "tpu", chips, chips, g["hbm"], f"{g['prefix']}:{grid}", host_memory_per_chip=g["host"]
    )


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def devices(topo: Topology) -> list:
    """The target's devices: deviceless descriptions for TPU / GPU, local CPU devices for cpu.

    TPU needs libtpu (`pip install -r requirements-tpu.txt`); GPU needs the CUDA plugin
    (`requirements-gpu.txt`) and JAX_PLATFORMS=cpu on a host without a GPU. cpu:N needs N host devices
    (`jax.config.update("jax_num_cpu_devices", N)` before JAX starts; `plan` does it).

    Raises:
      RuntimeError: the backend the target needs is not installed or not usable, saying what to install.
    """
    import jax  # imported here: the CLI sets JAX's device count and platforms before JAX starts

    if topo.platform == "cpu":
        found = jax.devices("cpu")
        if len(found) < topo.num_devices:
            raise RuntimeError(
                f"topology {topo.name!r} needs {topo.num_devices} CPU devices, JAX has {len(found)}: set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={topo.num_devices} before JAX starts"
            )
        return found[: topo.num_devices]
    from jax.experimental import topologies  # reason: only deviceless plans need it

    if topo.platform == "tpu":
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's probe for a local TPU
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        # No chip is opened: skip libtpu's one-process-per-host lock so plans can run beside a TPU job.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            desc = topologies.get_topology_desc(topology_name=topo.topology, platform="tpu")
        except Exception as e:  # libtpu missing or the grid unknown: say which
            raise RuntimeError(
                f"topology {topo.name!r} ({topo.topology}) needs libtpu: pip install -r requirements-tpu.txt "
                f"in a separate environment ({type(e).__name__}: {e})"
            ) from e
        return list(desc.devices)
    spec = (SPECS_DIR / topo.spec_file).read_text(encoding="utf-8")
    try:
        desc = topologies.get_topology_desc(platform="cuda", topology=topo.topology, target_config=spec)
    except Exception as e:
        raise RuntimeError(
            f"topology {topo.name!r} ({topo.topology}) needs the CUDA plugin (pip install -r "
            f"requirements-gpu.txt) and JAX_PLATFORMS=cpu on a host without a GPU ({type(e).__name__}: {e})"
        ) from e
    return list(desc.devices)


def memory_per_device(topo: Topology, num_devices: int) -> int:
    """HBM bytes of one JAX device: a chip's memory split over the devices it shows (v4 without megacore
    shows two per chip)."""
    return topo.memory_per_chip * topo.chips // max(topo.chips, num_devices)
