"""pixel_reasoner_jax: Pixel Reasoner (pixel-space reasoning + curiosity-driven RL) in JAX/Flax NNX.

Qwen2.5-VL port, visual-operation rollouts, SFT and GRPO on a device mesh. See README.md and DESIGN.md.
"""

__version__ = "0.1.0"
