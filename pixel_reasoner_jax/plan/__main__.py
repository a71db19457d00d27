"""`python -m pixel_reasoner_jax.plan --config=configs/grpo.py:7b --topology=v5p-16 --out=plan.json`.

Owns the planner's command line: target setup before JAX starts, the plan's JSON and its stdout table.
Exit status 0 when every program fits with the target's headroom, 1 when one does not, 2 on bad input.
"""

import datetime
import json
import pathlib
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from pixel_reasoner_jax.config import ConfigError, from_config_dict
from pixel_reasoner_jax.plan import topology as tp


def _define_flags() -> None:
    """The command line's flags, defined only when this module runs as the program: importing it (tests
    use `make_plan` and `table`) must not collide with the `--config` flag of `pixel_reasoner_jax.main`."""
    config_flags.DEFINE_config_file("config", None, "run config file[:variant], e.g. configs/grpo.py:7b")
    flags.DEFINE_string(
        "topology",
        None,
        "v4-8, v5e-N / v5litepod-N, v5p-N (TensorCores), v6e-N, h100-N, h200-N (GPUs), cpu:N",
    )
    flags.DEFINE_string("out", None, "write the plan as JSON here")


EXIT_NO_FIT = 1
EXIT_INPUT = 2
GIB = 2**30


def prepare(topo: tp.Topology) -> None:
    """JAX settings a target needs, applied before JAX's backends start."""
    jax.config.update("jax_platforms", "cpu")  # deviceless TPU/GPU plans compile from the CPU client too
    if topo.platform == "cpu":
        jax.config.update("jax_num_cpu_devices", topo.num_devices)


def make_plan(cfg, topo: tp.Topology, log=print, compiler_options=None, text_only=False) -> dict:
    """The JSON plan of run config `cfg` on `topo` (programs.plan_recipe: the per-program fields, options)."""
    from pixel_reasoner_jax.plan import programs  # reason: imports the model stack after `prepare`

    target = programs.Target(topo, tp.devices(topo))
    recipe = programs.plan_recipe(
        cfg, target, log=log, compiler_options=compiler_options, text_only=text_only
    )
    return {
        "topology": topo.name,
        "platform": topo.platform,
        "target": topo.topology,
        "devices": len(target.devices),
        "memory_per_device_bytes": target.memory,
        "headroom": topo.headroom,
        "budget_per_device_bytes": target.budget,
        "host_budget_per_device_bytes": target.host_budget,  # for residuals offloaded by remat "offload_*"
        "planned_on": datetime.date.today().isoformat(),  # plans.md marks plans older than the code as stale
        "jax": jax.__version__,
        **recipe,
    }


def table(plan: dict) -> str:
    """The plan as a fixed-width text table, one row per program."""
    head = (
        f"{plan['mode']} {plan['variant']} on {plan['topology']} ({plan['devices']} devices, "
        f"{plan['memory_per_device_bytes'] / GIB:.1f} GiB each, budget {plan['budget_per_device_bytes'] / GIB:.1f} "
        f"GiB after {plan['headroom']:.0%} headroom); mesh {plan['mesh']}, attention {plan['attention']}, "
        f"remat {plan['remat']}"
    )
    cols = f"{'program':<9}{'args':>8}{'temp':>8}{'peak':>8}{'resid.':>8}{'total':>8}{'host':>8}{'TFLOP/dev':>11}{'x 6NT':>7}  fits"
    rows = [head, cols]
    for name, p in plan["programs"].items():
        sizes = "".join(
            f"{p[k] / GIB:8.2f}" if k in p else " " * 8
            for k in (
                "argument_bytes",
                "temp_bytes",
                "peak_bytes",
                "resident_bytes",
                "total_bytes",
                "host_bytes",
            )
        )
        ratio = f"{p['flops'] / p['model_flops']:7.2f}" if p.get("model_flops") else " " * 7
        tflops = f"{p['flops'] / 1e12:11.1f}" if "flops" in p else " " * 11
        verdict = "yes" if p["fits"] else "NO" + (f" ({p['error']})" if "error" in p else "")
        rows.append(f"{name:<9}{sizes}{tflops}{ratio}  {verdict}")
    rows.append(
        f"fits: {'yes' if plan['fits'] else 'NO'} (GiB per device; total = peak + resident; host = offloaded "
        f"residuals in host memory, budget {plan.get('host_budget_per_device_bytes', 0) / GIB:.1f})"
    )
    return "\n".join(rows)


def main(argv) -> int:
    del argv
    try:
        topo = tp.parse_topology(flags.FLAGS.topology or "")
        cfg = from_config_dict(flags.FLAGS.config)
    except (tp.TopologyError, ConfigError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return EXIT_INPUT
    prepare(topo)
    try:
        plan = make_plan(cfg, topo, log=lambda s: print(s, file=sys.stderr))
    except (RuntimeError, ValueError) as e:  # a missing backend, or a batch the mesh cannot split
        print(f"plan: {e}", file=sys.stderr)
        return EXIT_INPUT
    print(table(plan))
    if flags.FLAGS.out:
        pathlib.Path(flags.FLAGS.out).write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
    return 0 if plan["fits"] else EXIT_NO_FIT


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["config", "topology"])
    app.run(lambda argv: sys.exit(main(argv)))
