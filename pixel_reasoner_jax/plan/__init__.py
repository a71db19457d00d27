"""Ahead-of-time planner: which TPU slice or GPU node a recipe fits, with which micro-batch and remat,
from XLA's per-device buffer assignment of every program compiled without the target hardware.
"""
