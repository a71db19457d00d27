"""Qwen2.5-VL in Flax NNX: config, vision tower, decoder, full model, HF checkpoint I/O, tiny checkpoints.

Shape alphabet used in einsum strings and shape-suffixed locals across the package:
  B batch, T query tokens, S key/value tokens, D text width, F mlp width, N query heads, K kv heads,
  G = N/K query heads per kv head, H head dim, V vocab, P patches, M merged tokens (P/4), C patch vector
  (3*2*14*14 = 1176), E vision width, I images, R = 3 rope sections (t, h, w), L layers.
"""
