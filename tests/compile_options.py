"""XLA options for tests that compare programs with each other: unoptimised XLA code compiles 2-3x faster on
CPU, and every comparison is between programs built alike."""

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
