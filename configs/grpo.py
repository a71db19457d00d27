"""GRPO with curiosity bonus and operation penalty: the recipe of reference §8.2/§9 and a CPU-sized `tiny`.

Run:
  python -m pixel_reasoner_jax.main --config=configs/grpo.py:7b --workdir=/runs/grpo7b \
      --config.model.checkpoint=/ckpt/PixelReasoner-WarmStart \
      --config.data.rl_path=/data/PixelReasoner-RL-Data/release.parquet \
      --config.data.eval_path=/data/VStar-EvalData-PixelReasoner/vstar.parquet
  python -m pixel_reasoner_jax.main --config=configs/grpo.py:tiny --workdir=/tmp/grpo_tiny  # CPU, minutes
External SGLang servers: --config.rollout.backend=sglang --config.rollout.sglang_urls=http://h1:30000,...
Variants: tiny | 3b | 7b (default). Override any key with --config.<section>.<key>=<value>.
"""

try:
    from configs import base
except ImportError:  # loaded by path from outside the repository root
    import importlib.util
    import pathlib

    _spec = importlib.util.spec_from_file_location(
        "configs_base", pathlib.Path(__file__).with_name("base.py")
    )
    base = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(base)


def _apply_tiny_grpo(c) -> None:
    """The README's CPU job: SFT warm start on terse color-query tool trajectories, then GRPO (every 7B
    code path runs: masked multi-turn SFT, crops executed in rollouts, curiosity/penalty shaping, the
    JaxSampler, checkpoints, HF export, plots). After the warm start the narrow model tries crop calls but
    few are well-formed; the aim, GRPO accuracy rising through tool use on 2 cores, is not reached (README).

    Most of a tiny step is the 152k-entry vocabulary: sizes below keep the trained positions per sample
    at 64, the prompt in one 640-token bucket and the decode length fixed.
    """
    d = c.data
    d.synthetic_family = "color"
    # Half as wide with tied embeddings: a tiny step is mostly the 152k vocabulary projection (models/tiny).
    c.model.tiny_size = "narrow"
    d.num_sft = 64
    d.num_rl = 64
    # Originals are kept at 224 px so a crop of a small target stays above the 28 px minimum side; the
    # model still sees every image at <= 112 px (rollout.model_max_pixels).
    d.image_max_pixels = 64 * base.PIX
    d.max_seq_len = 640
    d.seq_buckets = (640,)
    r = c.rollout
    r.max_new_tokens = 64  # a call is about 50 tokens, an answer about 10
    r.decode_bucket = 64  # one decode length: one compiled decode program per row bucket
    r.prompt_max_len = 576
    r.max_total_tokens = 640
    # The recipe's top_k 40 / top_p 0.95 (base config): the sampler draws them among lax.top_k's candidates,
    # ~9 ms per decode step of 16 rows on a CPU (a bisection over the 152k vocabulary took ~75).
    r.batch_size = 16  # every episode of a rollout in one sampler batch
    # The paper's temperatures (1.0, 0.9) stay: at 0.3 or 0.6 more sampled calls were well-formed, but the
    # sampler's and the trainer's log-probs then differed by ~0.1 per token (rollout/logprob_gap; 0.009
    # at 1.0), a mismatch to understand before lowering it.
    # Adam at 1e-2 (warmup 5 %): 80 SFT steps of 8 trajectories take the narrow model's token loss from
    # 11.9 to ~0.45 (2.2 after 32 steps), where sampled calls start to be well-formed; the 64-wide
    # preset after 32 steps (loss ~0.8) wrote none (measured; see the README).
    c.optim.lr = 1e-2
    c.optim.warmup_ratio = 0.05
    s = c.sft
    s.steps = 80
    s.batch_size = 8
    s.micro_batches = 1
    s.epochs = 1
    g = c.grpo
    g.steps = 15
    g.group_size = 4
    g.prompts_per_rollout = 4
    g.train_batch_size = 16  # one optimizer step per rollout
    g.micro_batches = 1
    g.replay_capacity = 64
    c.log.checkpoint_every = 8
    c.log.plots_every = 8
    c.log.rollouts_every = 5  # rollouts/step_*/ at loop steps 80, 85, 90: `eval.viewer` renders them


def get_config(arg: str = "7b"):
    """Returns the locked GRPO ConfigDict of variant `arg` ("tiny", "3b" or "7b")."""
    variant = base.parse_variant(arg)
    c = base.base_config()  # the base values are the 7B GRPO recipe
    c.mode = "grpo"
    c.model.hf_id = base.HF_IDS_7B["grpo"]
    base.apply_variant(c, variant)
    if variant == "tiny":
        _apply_tiny_grpo(c)
    c.lock()
    return c
