"""Trajectory synthesis through an OpenAI-compatible chat endpoint (reference §7.1): seeds -> SFT JSONL.

Run (the API key is read from the environment variable named by api.key_env, never from the config):
  OPENAI_API_KEY=... python -m pixel_reasoner_jax.data.synthesize --config=configs/synth.py:gpt4o \
      --config.seeds=/data/seeds.jsonl --config.out_dir=/data/synth
  python -m pixel_reasoner_jax.data.synthesize --config=configs/synth.py:textual \
      --config.seeds=/data/seeds.jsonl --config.out_dir=/data/synth --config.api.base_url=http://127.0.0.1:30000/v1
Rerunning the same command resumes: finished seeds are never asked again.
Variants: gpt4o (default: the paper's pixel-space trajectories written by GPT-4o), textual (rejection-sampled
textual trajectories from a Qwen2.5-VL server, as the released data's textual part), tiny (local server, CPU
tests). Override any key with --config.<key>=<value>. These keys form their own tree (not configs/base.py):
synthesis is a separate program with no model, mesh or optimizer; its typed form is data/synth_config.py.
"""

import ml_collections
from ml_collections import config_dict

PIX = 28 * 28
VARIANTS = ("gpt4o", "textual", "tiny")


def get_config(arg: str = "gpt4o") -> ml_collections.ConfigDict:
    """Returns the locked synthesis ConfigDict of variant `arg`."""
    variant = (arg or "gpt4o").strip().lower()
    if variant not in VARIANTS:
        raise ValueError(f"config variant {arg!r} is unknown; expected one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seeds = config_dict.placeholder(
        str
    )  # seed file (JSONL / JSON list / parquet) or a V* annotation folder
    c.seed_format = "jsonl"  # "jsonl" (ours) | "vstar" | "webpage" (data/synth_seeds.py)
    c.data_root = config_dict.placeholder(
        str
    )  # relative seed media resolve here; default: the seed file's folder
    c.out_dir = config_dict.placeholder(
        str
    )  # <run_name>.jsonl, .state.jsonl, .report.json, crops/, selected/
    c.run_name = "sft"  # file stem of this run's outputs; several runs can share out_dir
    c.num_video_frames = 16  # frames of a video seed (the original's 16 pre-extracted frames, §4.2)
    c.max_seeds = 0  # first N seeds of the file (done ones included); 0 = all
    c.seed = 0  # draws the kind of each seed and the erroneous operations
    c.textual_attempts = 1  # requests per textual seed; the first right answer is kept (rejection sampling)
    c.log_every = 20  # finished seeds between progress lines

    c.api = a = ml_collections.ConfigDict()
    a.base_url = "https://api.openai.com/v1"
    a.model = "gpt-4o"  # the paper's writer of pixel-space trajectories
    a.key_env = "OPENAI_API_KEY"  # environment variable holding the key; "" = send none (local servers)
    a.max_tokens = 1500  # completion tokens per request
    a.temperature = 1.0  # not stated in the paper; the API default
    a.timeout_s = 120.0
    a.retries = 3  # the client's own retries (429 and 5xx with backoff) before a seed counts as api_error
    a.requests_per_minute = 60.0  # request starts per minute; 0 = unlimited
    a.concurrency = 4  # requests in flight
    a.image_max_side = 2048  # images sent to the API are shrunk to this side (GPT-4o's own first resize)
    a.detail = "high"  # OpenAI image detail: "high" | "low" | "auto" | "" (omit)

    c.cost = k = ml_collections.ConfigDict()
    # USD per 1k tokens; defaults are GPT-4o's list prices when this was written: set your own.
    k.prompt_per_1k = 0.0025
    k.completion_per_1k = 0.01
    k.budget = 0.0  # stop starting new seeds once the estimated cost reaches it; 0 = no limit

    # Kinds of trajectories (reference §7.1 and the paper's error-induced self-correction): image seeds
    # 30 % single pass, 20 % one wrong crop then the right one, 20 % two wrong crops, 30 % further zoom-in;
    # video seeds 90 % single selection, 10 % a wrong selection first. `textual` takes that share of all
    # seeds first (no operation, kept only when the answer is right).
    c.mix = m = ml_collections.ConfigDict()
    m.single = 0.3
    m.recrop1 = 0.2
    m.recrop2 = 0.2
    m.zoom2 = 0.3
    m.select = 0.9
    m.reselect = 0.1
    m.textual = 0.0

    # The visual operations as the training rollout runs them (§4.1, §4.2, §5): the SFT crops came from the
    # repo's executor (issue #20).
    c.ops = o = ml_collections.ConfigDict()
    o.crop_padding = "capped"  # "capped" min(0.1, 600/side) (released) | "fixed" 0.1
    o.crop_min_pixels = 4 * PIX
    o.crop_max_pixels = 1000 * PIX
    o.select_min_pixels = 4 * PIX
    o.select_max_pixels = 400 * PIX
    o.max_frames = 8
    o.min_crop_side = 28

    if variant == "textual":
        # The released data's textual part: Qwen2.5-VL-Instruct answers, kept when right (§7.1).
        c.run_name = "textual"
        c.mix.textual = 1.0
        c.textual_attempts = 4
        a.base_url = "http://127.0.0.1:30000/v1"
        a.model = "Qwen/Qwen2.5-VL-7B-Instruct"
        a.key_env = ""
        a.detail = ""
        a.requests_per_minute = 0.0
        a.concurrency = 16
        k.prompt_per_1k = 0.0
        k.completion_per_1k = 0.0
    elif variant == "tiny":
        a.base_url = "http://127.0.0.1:30000/v1"
        a.model = "tiny"
        a.key_env = ""
        a.detail = ""
        a.max_tokens = 16
        a.requests_per_minute = 0.0
        a.concurrency = 2
        a.timeout_s = 300.0
        a.image_max_side = 448
        c.mix.textual = 0.25
        c.log_every = 1
        o.crop_max_pixels = 16 * PIX
        o.select_max_pixels = 8 * PIX
    c.lock()
    return c
