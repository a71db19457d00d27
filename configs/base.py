"""Every run-config key, declared once, with the paper's 7B recipe as the default value.

Mode files (sft.py, grpo.py, eval.py) start from `base_config()` and apply one variant with `apply_variant`.

Curiosity bonus and operation penalty (`reward.form`, reference/pixel_reasoner.md §9.2). RaPR = share of a
prompt's G rollouts that used a visual operation; r = accuracy in {0, 1}; shaped = r + bonus + penalty.

| | "paper" (the default) | "code" |
|---|---|---|
| bonus, rollouts with tools | alpha*max(H - RaPR, 0) | alpha*max(H - RaPR, 0)/(s*RaPR); s 2 image, 1.5 video |
| penalty | beta*min(N - n, 0) | beta*min(N - n, 0), i.e. -0.05*(n - 1) for n >= 1 |
| n and RaPR count | valid visual operations | every tool call, errored ones included |
| alpha, H, beta, N | 0.5, 0.3, 0.05, 1 | 0.25, 0.3, 0.05, 1 |
| source | the paper; verl-tool PixelReasonerRewardManager | released experience_maker.py, `_generate_vllm` |

`reward.alpha/H/beta/N` left unset take the chosen form's constants (`train/rewards.FORM_CONSTANTS`), so
`--config.reward.form=code` alone reproduces the released code; a value you set applies to either form.
"""

import os

import ml_collections
from ml_collections import config_dict

# Pixel limits in the reference are written as k * 784: one merged 2x2 block of 14-px patches (28 x 28 px).
PIX = 28 * 28
VARIANTS = ("tiny", "3b", "7b")
# Hugging Face ids each 7B mode starts from (reference §1); informative, the run loads `model.checkpoint`.
HF_IDS_7B = {
    "sft": "Qwen/Qwen2.5-VL-7B-Instruct",
    "grpo": "TIGER-Lab/PixelReasoner-WarmStart",  # RL starts from its checkpoint-246 (§1)
    "eval": "TIGER-Lab/PixelReasoner-RL-v1",
}
HF_ID_3B = "Qwen/Qwen2.5-VL-3B-Instruct"  # no 3B Pixel Reasoner release exists: every 3b mode starts here
# The user's cache folder (XDG), as pip and Hugging Face use; `~` is expanded when the run starts.
DEFAULT_COMPILE_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or "~/.cache", "pixel_reasoner_jax", "jax_cache"
)


def _str():
    """An optional string: None until set, and still overridable from the command line."""
    return config_dict.placeholder(str)


def base_config() -> ml_collections.ConfigDict:
    """All keys with the 7B GRPO recipe (reference §3.1, §5, §8.2, §9, §10) as their values.

    Section numbers in the comments refer to /work/shared/reference/pixel_reasoner.md; paper symbols
    (G, alpha, H, beta, N, eps) are named where they exist.
    """
    c = ml_collections.ConfigDict()
    c.mode = "grpo"  # "sft" | "grpo" | "eval"; set by the mode file
    c.variant = "7b"  # "tiny" | "3b" | "7b"; set by the mode file
    c.seed = 42  # parameter init (tiny), sampling and dropout-free RNG streams
    c.workdir = _str()  # the --workdir flag wins over this
    # Persistent XLA compilation cache shared by all runs of this user: a second run loads its programs
    # instead of compiling them. "" = off; env JAX_COMPILATION_CACHE_DIR, when set, wins.
    c.compile_cache_dir = DEFAULT_COMPILE_CACHE
    # glibc malloc on CPU runs (pixel_reasoner_jax/hostmem.py): "auto" keeps freed memory for reuse when the
    # run computes on the CPU (XLA's per-step buffers are otherwise zero-filled again by the kernel at every
    # step: 1/3 of a CPU step measured) | "reuse" always | "system" never (glibc's defaults)
    c.host_malloc = "auto"

    c.model = m = ml_collections.ConfigDict()
    m.checkpoint = _str()  # local HF folder; unset + variant tiny = generate one under workdir/tiny_ckpt
    m.hf_id = HF_IDS_7B["grpo"]
    m.dtype = "bfloat16"  # compute dtype: "float32" | "bfloat16"
    # Master weights stay float32 (DeepSpeed bf16 keeps fp32 masters, §8.2): an update of lr 1e-6 is far
    # below bf16's relative precision (~4e-3) and would round to nothing on bf16 weights.
    m.param_dtype = "float32"
    # "none" | "full" | "dots" (keep matmul outputs) | "dots_attention" (and the attention kernels' forward
    # outputs: cuDNN / splash do not run again in the backward) | "offload_dots" / "offload_dots_attention"
    # (the same, kept in host memory); the original checkpoints gradients (§8)
    m.remat = "full"
    # The vision tower's own policy: "same" (as model.remat) or one of model.remat's. With remat=dots a
    # GRPO sample's 65,536 patch rows would keep every vision matmul output; "full" there saves the memory
    # where the decoder's dots save the most recompute (benchmarks/PLANS.md).
    m.vision_remat = "same"
    m.freeze_vision = False  # §8.2 does not freeze; SFT does (§8.1)
    # "auto" (cudnn on GPU with bf16, splash on TPU, rows on CPU) | "dense" (masked reference) | "blocked"
    # (tiled online softmax, memory O(T)) | "rows" (causal query row blocks, unrolled: fastest on CPU) |
    # "splash" | "splash_fused" (splash with its fused backward kernel: fewer FLOPs, a transient unreduced dq)
    # | "cudnn" | "xla" (jax.nn.dot_product_attention); models/layers.py
    m.attention = "auto"
    # "scan" (`lax.scan` over the stacked layers) | "unroll" (one traced copy per layer: on CPU 6 % faster
    # per step at 12 layers, 1.75x the compile time, no gain at 2 layers; benchmarks/CPU_SPEED.md)
    m.layer_loop = "scan"
    # How weight gradients are formed: "auto" ("transposed" on CPU, "xla" elsewhere) | "xla" (autodiff's
    # product over the tokens) | "transposed" (the input transposed first: XLA CPU runs that product 1.7x
    # faster); same gradients up to float rounding. models/layers.py WEIGHT_GRADS, benchmarks/CPU_SPEED.md
    m.weight_grad = "auto"
    m.logprob_chunk = 1024  # tokens per chunk of the scanned log-prob/entropy pass (never B x T x V logits)
    # Widths of the trained-position index (only those positions reach the vocabulary projection): buckets
    # per octave up to one chunk, multiples of the chunk past it (train/steps.loss_bucket). 4 = at most 25 %
    # padding; 1 = powers of two (up to 100 %, fewer distinct step programs to compile).
    m.logprob_bucket_steps = 4
    # Architecture of the generated checkpoint (variant tiny without model.checkpoint): models/tiny.SIZES.
    m.tiny_size = "tiny"
    m.tiny_init = "hf"  # models/tiny.INITS: "hf" (N(0, 0.02)) | "fan_in" (linear weights N(0, 1/fan_in))

    c.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = 1  # -1 = the rest of the devices (at most one axis)
    mesh.fsdp = -1  # ZeRO-3-like parameter sharding (the original actor uses DeepSpeed ZeRO-3, §8.2)
    mesh.tensor = 1
    mesh.rollout_tensor = 1  # tensor parallelism of the in-process sampler (vLLM tp 1 in §8.2)

    c.data = d = ml_collections.ConfigDict()
    # Data paths: comma-separated parquet / JSONL / JSON files and folders (a folder = those files in it).
    d.sft_path = _str()  # PixelReasoner-SFT-Data JSON list (§7.1)
    d.rl_path = _str()  # PixelReasoner-RL-Data `release.parquet` (§7.2)
    d.eval_path = _str()  # the *-EvalData-PixelReasoner parquets, same schema (§7.3)
    d.data_root = _str()  # relative image/video paths resolve against this; unset: each file's own folder
    d.seed = 49  # data order (`data_seed` 49 of sft.sh, §8.1)
    d.synthetic = False  # generate a data folder under workdir/synthetic; conflicts with any path above
    d.num_sft = 64
    d.num_rl = 64
    d.num_eval = 32
    d.image_size = 896  # synthetic canvas side in pixels
    d.synthetic_seed = 0
    # data/synthetic.FAMILIES: "mixed" (every scene and kind) | "color" (tiny GRPO demo) | "trap" (configs/trap.py)
    d.synthetic_family = "mixed"
    d.sft_loss_mask = "final_turns"  # the original's positional rule (§8.1) | "per_turn" (record flags)
    d.num_video_frames = 16  # frames per video query (§4.2, §6)
    d.image_min_pixels = 4 * PIX  # originals in training rollouts (§5)
    d.image_max_pixels = 2000 * PIX
    d.eval_image_min_pixels = 256 * PIX  # originals in eval (§5, `eval_maxpixel` 8000, issue #32)
    d.eval_image_max_pixels = 8000 * PIX
    d.video_frame_max_pixels = 512 * PIX  # per frame, train and eval (§5)
    d.sft_image_min_pixels = 3136  # SFT processor (§5): min 3136, max 5120*784
    d.sft_image_max_pixels = 5120 * PIX
    d.sft_video_frame_max_pixels = 420 * 360  # qwen_module resets video frames to 151,200 px (§7.1)
    # Training sequences: rollouts stop above 12088 tokens (§3.1); SFT does not truncate (§8.1).
    d.max_seq_len = 12288
    d.seq_buckets = (2048, 4096, 8192, 12288)
    d.patch_buckets = (4096, 8192, 16384, 32768, 65536)  # total patches per sample, padded up
    d.num_workers = 8

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-6  # `${lr}e-7` with lr=10 (§8.2)
    o.warmup_ratio = 0.03  # warmup ceil(3% of max_steps) (§8.2)
    o.min_lr_ratio = 0.5  # cosine_with_min_lr, min_lr 0.5*lr (§8.2)
    o.schedule = "cosine"  # "cosine" | "linear" | "constant" (after warmup)
    o.weight_decay = 0.0
    o.b1 = 0.9  # Adam betas (0.9, 0.95) (§8.2)
    o.b2 = 0.95
    o.eps = 1e-8  # DeepSpeed Adam default
    o.grad_clip = 1.0  # global grad-norm clip; 0 = off

    c.sft = s = ml_collections.ConfigDict()
    # sft mode: -1 = epochs * ceil(records / batch_size); grpo mode: warm-start steps, 0 = none.
    s.steps = 0
    s.batch_size = 16  # per-device 1 x grad-accum 2 x 8 GPUs (§8.1)
    s.micro_batches = 2  # gradient-accumulation steps
    s.epochs = 5  # sft.sh (§8.1)
    s.checkpoint_every = 0  # steps; 0 = once per epoch (HF save_strategy "epoch", §8.1)
    s.keep_checkpoints = 5  # every epoch's checkpoint (HF Trainer keeps all 5)

    c.rollout = r = ml_collections.ConfigDict()
    r.backend = "jax"  # "jax" (in-process sampler) | "sglang" (external servers, the original's vLLM role)
    # SGLang servers: "http://h1:30000,http://h2:30000", or "@/path/urls.txt" (one URL a line, # comments)
    r.sglang_urls = _str()
    r.launch_local_server = False  # start the in-repo SGLang-compatible server for this run
    r.template = "vcot"  # user-turn template: "vcot" (tools) | "notool" (textual baseline) (§2.3)
    # Prompt strings, here and in synthetic SFT data: "released" (§2) | "terse" (CPU demos: tools/prompts.TERSE)
    r.prompt_style = "released"
    r.temperature = 1.0  # first turn (§8.2)
    r.temperature_after_tool = 0.9  # turns after a tool result (§8.2)
    r.top_p = 0.95
    r.top_k = 40  # -1 = off
    r.max_new_tokens = 2048  # per turn (`--max_out_tokens`, §3.1)
    r.prompt_max_len = 2048  # `--prompt_max_len` (§3.1)
    r.max_total_tokens = 12088  # force stop when prompt + output > 12*1024 - 200 (§3.1)
    r.max_tool_calls = 3  # a call requested after more than 3 calls stops the episode (<= 4 executed)
    r.max_images = 16  # force stop above 16 images (`max_imgnum`, §3.1)
    r.crop_min_pixels = 4 * PIX  # crops resized into [4, 1000]*784 (§4.1, §5)
    r.crop_max_pixels = 1000 * PIX
    r.select_min_pixels = 4 * PIX  # selected frames resized into [4, 400]*784 (§4.2, §5)
    r.select_max_pixels = 400 * PIX
    r.crop_padding = "capped"  # "capped" min(0.1, 600/side) (released) | "fixed" 0.1 (current code) (§4.1)
    r.max_frames = 8  # frames per select_frames call (§4.2)
    r.min_crop_side = 28  # a crop must be > 28 px per side (§4.1)
    # target_image after a video query returned images (§4.1, §12.4): "original" = the original's list
    # [[video], sel1, ...], t >= 2 (what released checkpoints learned) | "observed" = as select numbers them
    r.video_crop_index = "original"
    # What the model sees: the original's vLLM re-resize (MIN_PIXELS default, README MAX_PIXELS, §5). The
    # trainer tokenizes with the same limits, so sampler and trainer agree (pitfall §12.8).
    r.model_min_pixels = 256 * PIX
    r.model_max_pixels = 4014080
    r.request_timeout_s = 600.0  # a /generate slower than this counts as a server failure
    r.retries = 3  # resubmissions of one request to other servers after server failures
    r.server_wait_s = 600.0  # how long a request waits for any server in rotation before the run fails
    r.health_backoff_s = 1.0  # first /health probe of a failed server; doubles after each failed probe
    r.health_max_backoff_s = 30.0
    r.batch_size = 128  # episodes decoded together (memory-bound choice, not in the reference)
    r.decode_bucket = 128  # decode lengths round up to a multiple (fewer compiled shapes)
    # dtype of the in-process sampler's weight copy (resident beside the train state): bf16 as the original's
    # vLLM serves it, half the float32 masters' memory. Every layer casts its weights to model.dtype before
    # use, so with bf16 compute the sampled tokens are the same as from a float32 copy.
    r.sampler_param_dtype = "bfloat16"

    c.grpo = g = ml_collections.ConfigDict()
    g.steps = -1  # -1 = num_episodes * (prompts * G // train_batch_size) (§8.2 max_steps)
    g.num_episodes = 3  # passes over the prompts (`nepoch=3`, §8.2)
    g.group_size = 8  # G (`--n_samples_per_prompt`, §8.2)
    g.prompts_per_rollout = 512  # `rbuffer` (§8.2) => 4096 samples, 16 optimizer steps per rollout
    g.train_batch_size = 256  # samples per optimizer step (`bsz`, §8.2)
    # Accumulation steps: the original's per-GPU micro batch is 4 samples (multi-node); on 8 devices that
    # is 256 / (8 * 4) = 8 micro-batches.
    g.micro_batches = 8
    g.eps_low = 0.2  # eps_low / eps_high of the clipped ratio ("according to DAPO", §8.2)
    g.eps_high = 0.35
    g.kl_coef = 0.0  # no reference model, no KL (§8.2)
    g.entropy_coef = 0.0
    g.tis_cap = 0.0  # truncated importance weight against the sampler's log-probs; 0 = off
    # Temperature of the trainer's log-probs (old, current, reference): "raw" = log-softmax of the raw
    # logits whatever the sampling temperature (the original's actor; turns after a tool observation are
    # sampled at 0.9) | "sampled" = each token at its turn's sampling temperature, so the ratio, TIS and
    # `rollout/logprob_gap` compare one distribution with itself.
    g.logprob_temperature = "raw"
    # The original divides by a constant 200 (bug §12.5); token-mean is what it meant.
    g.loss_agg = "token-mean"
    g.advantage = "mean"  # r - group mean, no std division (`group`, §8.2)
    # "refill" (`--filter True`, the README run) | "ssr" (`--filter SSR`: trains on half the rollout batch,
    # fresh informative samples first, then replayed ones; so half the steps per rollout) | "none" (§9.3)
    g.filter = "refill"
    g.uniform_tol = 0.01  # a group is uniform if mean |r - mean r| < 0.01 (§9.3)
    g.replay_capacity = 0  # SSR deque maxlen; 0 = the rollout batch, prompts_per_rollout * G (§9.3)
    g.epochs_per_rollout = 1  # `max_epochs 1` (§8.2)
    g.max_staleness = 0  # rollout batches a sample may lag the policy; 0 = synchronous (the original)
    # LR of the sft.steps warm-start updates of grpo mode; the optim schedule (warmup, decay) then spans the
    # GRPO updates alone. 0 = one schedule spans both phases (the recipe warm-starts from a separately
    # trained SFT checkpoint, sft.steps = 0). Schedule: "constant" at warm_start_lr, or "cosine" from
    # warm_start_lr down to optim.lr.
    g.warm_start_lr = 0.0
    g.warm_start_schedule = "constant"
    # GRPO after a warm start begins with zeroed Adam moments, as the original's RL job begins with a new
    # optimizer on the SFT job's weights; False carries the warm start's moments over.
    g.warm_start_fresh_moments = True

    c.reward = rw = ml_collections.ConfigDict()
    rw.form = "paper"  # "paper" | "code": the two shapes in the module docstring's table (§9.2)
    rw.curiosity = True
    rw.penalty = True
    # Unset = the form's own constant (table above); a value set here applies to either form.
    rw.alpha = config_dict.placeholder(float)  # alpha: bonus scale (paper 0.5, code 0.25)
    rw.H = config_dict.placeholder(float)  # H: target RaPR (0.3 in both)
    rw.beta = config_dict.placeholder(float)  # beta: penalty per extra operation (0.05 in both)
    rw.N = config_dict.placeholder(int)  # N: free visual operations (1 in both)
    # Answer checker of the accuracy reward (pixel_reasoner_jax/answers.py): "original" = the seed's
    # rule_reward verdict for verdict (math_verify, no box required, -1 for an unparsable response; what
    # RL-v1 trained with, §9.1) | "strict" = our own matcher on the last \boxed{} answer.
    rw.scoring = "original"
    # "strict" only: True = a \boxed{} answer is required (what the original meant; bug §12.2 made it
    # False); False = fall back to <answer>...</answer>, then "Answer:". "original" never requires a box.
    rw.require_boxed = True
    rw.zero_after_failed_call = True  # a correct answer right after a failed call scores 0 (§9.1)

    c.eval = e = ml_collections.ConfigDict()
    e.benchmarks = "vstar,tallyqa,infovqa,mvbench"  # §10
    # Answer checker of eval accuracy: "original" (the seed's rule_reward, so numbers compare with the
    # paper, §10) | "strict" (our boxed matcher, with reward.require_boxed). ANLS is scored either way.
    e.scoring = "original"
    e.every = 64  # optimizer steps between evals in grpo mode: every 4 rollouts x 16 steps (§8.2); 0 = off
    e.greedy = True  # T 0, top_p 1, top_k -1 (§8.2 eval sampling)
    e.temperature = 0.6  # `val_temperature`, only when greedy is False
    e.num_samples = 1  # samples per query (pass@k needs greedy False)
    # eval_vlm_new.sh: `--max_out_tokens` 2048 per turn (experience_maker's default), `--prompt_max_len`
    # 10000 + `--generate_max_len` 8192 = 18192 tokens of vLLM context, and the loop's force stop: no call
    # runs once a turn ends above 12*1024-200 tokens (§3.1; the same code in training and eval).
    e.max_new_tokens = 2048  # per turn
    e.prompt_max_len = 10000
    e.max_total_tokens = 18192  # the whole conversation (expanded image pads included)
    e.call_token_limit = 12088  # a call requested above this many tokens is not executed
    e.batch_size = 64  # `eval_bsz` (§10)
    e.crop_min_pixels = 256 * PIX  # eval crops [256, 5120]*784 (§5)
    e.crop_max_pixels = 5120 * PIX
    e.resize_selected = False  # selected frames are not resized in eval (§5)
    e.model_min_pixels = 401408  # eval MIN_PIXELS / MAX_PIXELS (§5, §10)
    e.model_max_pixels = 4014080

    c.log = lg = ml_collections.ConfigDict()
    lg.every = 1  # optimizer steps between metric lines
    lg.plots_every = 50  # steps between PNG plot refreshes; 0 = only at the end
    lg.tensorboard = True
    lg.checkpoint_every = 16  # grpo: every rollout = 16 optimizer steps (§8.2)
    lg.keep_checkpoints = 3
    # grpo: every this many loop steps, the first `rollout_groups` groups of the rollout batch (turns, images,
    # crops, verdicts, shaped reward, advantage) go to workdir/rollouts/step_<N>/ for eval.viewer; 0 = off.
    lg.rollouts_every = 16
    lg.rollout_groups = 2
    lg.progress = True
    # grpo: log `probe/p_call`, the probability that the response opens with <tool_call>, averaged over the
    # first this-many RL prompts, read once per rollout batch (train/probe.py: RaPR without sampling noise);
    # 0 = off. Each read is one log-prob pass of grpo.train_batch_size rows: meant for the CPU jobs.
    lg.call_probe = 0
    return c


def apply_cpu_quarters(c: ml_collections.ConfigDict, *, family: str) -> None:
    """Sizes shared by the CPU GRPO demos on the quarters scenes (configs/grpo.py:tiny, configs/trap.py):
    the narrow tiny model, 56 px views, the terse prompt, one sequence and one patch bucket, SFT then one
    optimizer step per rollout of 4 prompts x G=8."""
    c.model.tiny_size = "narrow"  # half the vocabulary-projection cost of "tiny", which dominates each step
    # Linear weights at the gain a 7B model has (models/tiny.INITS): with the Hub's 0.02 the 32-wide model
    # passed what its vision tower saw to the answer too weakly to learn to read a crop in minutes.
    c.model.tiny_init = "fan_in"
    # A one-line system prompt and the bare question (tools/prompts.TERSE): ~140 tokens per crop trajectory
    # instead of ~540, so the few visual tokens are not buried under the tool block at the start.
    c.rollout.prompt_style = "terse"
    d = c.data
    d.synthetic_family = family
    d.num_sft = 128
    d.num_rl = 128
    d.num_eval = 8
    d.image_size = 448
    # The original is kept at 448 px so crops cut real detail; the model sees every image at 56 px: the full
    # view is 4 visual tokens (one per quarter), a crop of a square shows it large. Small views keep the
    # vision tower and the sequences cheap.
    d.image_max_pixels = d.eval_image_max_pixels = 256 * PIX
    d.sft_image_max_pixels = 4 * PIX
    # One sequence bucket and one patch bucket, so each program compiles for few shapes; a crop trajectory
    # is ~140 tokens, two calls and crops ~200. Patch buckets count rows per sample: at most 3 images of 16
    # patches.
    d.max_seq_len = 256
    d.seq_buckets = (256,)
    d.patch_buckets = (64,)

    c.optim.lr = 1e-2  # high: the narrow model must learn the call format in a few dozen SFT steps
    c.optim.warmup_ratio = 0.0
    c.optim.schedule = "constant"
    s = c.sft
    s.batch_size = 8
    s.micro_batches = 1
    s.epochs = 1

    r = c.rollout
    r.max_new_tokens = 64  # a call is 49 tokens, an answer 6
    r.decode_bucket = 16
    r.max_total_tokens = 256
    r.prompt_max_len = 192
    r.max_tool_calls = 1  # at most two crops: bounds the sequence (the paper's free operations N is 1)
    r.batch_size = 16  # episodes in flight: at most 16 requests per sampler call
    r.model_max_pixels = r.crop_max_pixels = 4 * PIX

    g = c.grpo
    g.group_size = 8
    g.prompts_per_rollout = 4
    g.train_batch_size = 32  # one optimizer step per rollout: on-policy
    g.micro_batches = 2
    g.filter = "refill"  # the original's `--filter True`


def parse_variant(arg: str | None) -> str:
    """Returns the variant named by the text after the colon of `--config=configs/x.py:<arg>`."""
    variant = (arg or "7b").strip().lower()
    if variant not in VARIANTS:
        raise ValueError(f"config variant {arg!r} is unknown; expected one of {VARIANTS}")
    return variant


def apply_variant(c: ml_collections.ConfigDict, variant: str) -> None:
    """Applies the mode-independent part of a variant in place (the mode files add their own parts)."""
    c.variant = variant
    if variant == "3b":
        c.model.hf_id = HF_ID_3B
    elif variant == "tiny":
        _apply_tiny(c)


def _apply_tiny(c: ml_collections.ConfigDict) -> None:
    """CPU-sized run: generated tiny checkpoint, synthetic data, small images and short turns."""
    c.seed = 0
    c.model.hf_id = "tiny (generated)"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.model.attention = "auto"
    c.model.logprob_chunk = 128
    # Powers of two below the chunk: a short run on small batches sees more distinct trained counts, and
    # each extra width is a compile that costs more than its padding saves (README command, same samples:
    # 7:45 with 1, 8:17 with 4: 183 against 186 programs, 110 against 147 s of compiling).
    c.model.logprob_bucket_steps = 1
    # data = -1 makes the same file run on one CPU device and on the 8 fake devices of the tests.
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rollout_tensor = 1

    d = c.data
    d.synthetic = True
    d.num_sft = 32
    d.num_rl = 32
    d.num_eval = 8
    d.image_size = 224
    d.synthetic_seed = 0
    d.num_video_frames = 16
    # Small images keep the vision tower cheap: at most 16 * 784 px = 64 patches = 16 tokens per image.
    d.image_min_pixels = 4 * PIX
    d.image_max_pixels = 16 * PIX
    d.eval_image_min_pixels = 4 * PIX
    d.eval_image_max_pixels = 16 * PIX
    d.video_frame_max_pixels = 4 * PIX
    d.sft_image_min_pixels = 4 * PIX
    d.sft_image_max_pixels = 16 * PIX
    d.sft_video_frame_max_pixels = 4 * PIX
    # The system prompt with the tool block is about 350 tokens; 1024 leaves room for a few turns.
    d.max_seq_len = 1024
    d.seq_buckets = (512, 1024)
    d.patch_buckets = (256, 1024, 4096)
    d.num_workers = 0

    c.optim.lr = 1e-4
    c.optim.warmup_ratio = 0.1

    c.rollout.max_new_tokens = 24
    c.rollout.prompt_max_len = 768
    c.rollout.max_total_tokens = 1024
    c.rollout.crop_min_pixels = 4 * PIX
    c.rollout.crop_max_pixels = 16 * PIX
    c.rollout.select_min_pixels = 4 * PIX
    c.rollout.select_max_pixels = 8 * PIX
    c.rollout.model_min_pixels = 4 * PIX
    c.rollout.model_max_pixels = 16 * PIX
    c.rollout.request_timeout_s = 120.0
    c.rollout.batch_size = 16
    c.rollout.decode_bucket = 8
    c.rollout.sampler_param_dtype = "float32"  # CPU runs keep one dtype: sampler and trainer agree exactly

    e = c.eval
    # Every name: the synthetic eval set by default, and real benchmark rows when data.eval_path is given.
    e.benchmarks = "vstar,tallyqa,infovqa,mvbench,synthetic"
    e.every = 0
    e.max_new_tokens = 24
    e.prompt_max_len = 768
    e.max_total_tokens = 1024
    e.call_token_limit = 1024
    e.batch_size = 8
    e.crop_min_pixels = 4 * PIX
    e.crop_max_pixels = 16 * PIX
    e.model_min_pixels = 4 * PIX
    e.model_max_pixels = 16 * PIX

    c.log.plots_every = 4
    c.log.checkpoint_every = 4
    c.log.keep_checkpoints = 2
