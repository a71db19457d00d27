"""Test helpers for rollouts: a scripted Policy, synthetic media and records, and a checkpoint that has
memorised one tool-using episode so that its greedy policy replays it (crop, crop of the crop, answer).
"""

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from pixel_reasoner_jax.data.records import RLRecord
from pixel_reasoner_jax.rollout.policy import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationRequest,
    GenerationResult,
    Policy,
)


def call_text(name: str, arguments: str, closed: bool = False) -> str:
    """An assistant turn that calls `name`; `arguments` is the raw JSON text (it may be malformed on
    purpose). Unclosed turns stop on </tool_call>, as the sampler does with the default stop ids."""
    end = "<|im_end|>" if closed else ""
    return (
        f'Let me look closer.\n<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>{end}'
    )


def crop_text(bbox: Sequence[float], target: int = 1, closed: bool = False) -> str:
    return call_text("crop_image", f'{{"bbox_2d": {list(bbox)}, "target_image": {target}}}', closed)


def select_text(frames: Sequence[int], closed: bool = False) -> str:
    return call_text("select_frames", f'{{"target_frames": {list(frames)}}}', closed)


ANSWER = "The answer is \\boxed{B}.<|im_end|>"


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of uniform noise: every crop of it differs from every other crop."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def record(qid: str, question: str = "Which letter is in the corner?", video: bool = False) -> RLRecord:
    """A query record; tests pass its media to Episode.start directly, so `images` is never read."""
    return RLRecord(
        qid=qid, question=question, images=["unused.png"], is_video=video, answer="B", benchmark="synthetic"
    )


@dataclasses.dataclass(frozen=True)
class Scripted:
    """One scripted turn: its text, and a finish reason that overrides the derived one (e.g. "abort")."""

    text: str
    finish_reason: str | None = None


class ScriptedPolicy(Policy):
    """Answers each request with the next scripted text of its episode, tokenized with the real tokenizer.

    Requests are matched to scripts by their rid `<episode_id>/turn<k>`. Like a real sampler it stops
    after the first stop id (kept in the output), cuts at max_new_tokens (finish "length"), and returns
    one log-prob per id (fake but distinct: -(call + 1) / 100 - j / 1000 for the j-th id of a call).

    Attributes:
      requests: every request received, in order.
      results: rid -> the result returned for it.
      batch_sizes: number of requests per generate call.
    """

    def __init__(self, tok, scripts: Mapping[str, Sequence[str | Scripted]], *, bump_versions: bool = False):
        self.tok = tok
        self.scripts = {
            k: [s if isinstance(s, Scripted) else Scripted(s) for s in v] for k, v in scripts.items()
        }
        self.bump_versions = bump_versions
        self.requests: list[GenerationRequest] = []
        self.results: dict[str, GenerationResult] = {}
        self.batch_sizes: list[int] = []
        self._version = "v0"

    @property
    def weight_version(self) -> str:
        return self._version

    def _one(self, request: GenerationRequest) -> GenerationResult:
        episode_id, _, turn = request.rid.rpartition("/turn")
        script = self.scripts[episode_id][int(turn)]
        ids = self.tok.encode(script.text)
        stops = set(request.sampling.stop_token_ids)
        first_stop = next((j for j, i in enumerate(ids) if i in stops), None)
        if first_stop is not None:
            ids = ids[: first_stop + 1]
        finish, matched = (FINISH_STOP, ids[-1]) if first_stop is not None else (FINISH_LENGTH, None)
        if len(ids) > request.sampling.max_new_tokens:
            ids = ids[: request.sampling.max_new_tokens]
            finish, matched = FINISH_LENGTH, None
        call = len(self.requests)
        logprobs = tuple(-(call + 1) / 100 - j / 1000 for j in range(len(ids)))
        return GenerationResult(
            output_ids=tuple(ids),
            logprobs=logprobs,
            finish_reason=script.finish_reason or finish,
            matched_stop=matched,
            weight_version=self._version,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.batch_sizes.append(len(requests))
        out = []
        for r in requests:
            res = self._one(r)
            self.requests.append(r)
            self.results[r.rid] = res
            out.append(res)
        if self.bump_versions:
            self._version = f"v{len(self.batch_sizes)}"
        return out


# ------------------------------------------------------------------------------------------ memorise

MEMO_IMAGE_SIZE = (112, 84)
MEMO_BBOX = "[0,0,0.7,0.7]"
# Crop, crop of the crop, answer; the turns stop on </tool_call> (the <|im_end|> after them is appended with
# mask 0) and on <|im_end|>. Compact JSON: fewer tokens to fit, and fewer places where the same token is
# followed by different tokens, which a random two-layer model can only tell apart by training attention.
MEMO_SCRIPT = tuple(
    f'<tool_call>{{"name":"crop_image","arguments":{{"bbox_2d":{MEMO_BBOX},"target_image":{t}}}}}</tool_call>'
    for t in (1, 2)
) + ("\\boxed{B}<|im_end|>",)
# Greedy decoding (KV cache) and the teacher-forced forward differ by float rounding (~1e-6 in the
# log-probs); fitting to p(target) > 0.9 rather than to a bare argmax keeps every greedy choice far
# from a tie, so the memorised episode replays exactly.
MEMO_MIN_LOGPROB = math.log(0.9)


def greedy_config():
    """Episode limits of the memorised checkpoint's runs: greedy every turn, and small enough for CPU.

    The memorised episode (two calls, then the answer; 587 expanded tokens; turns <= 33 tokens) fits all of
    them. The caps bound what a deviating episode (another image or question) can cost: three turns at most
    (a call after more than one executed call ends it), <= 40 new tokens per turn, <= 760 tokens in all
    (one 768 sequence bucket), and crops of at most 84x84 px (36 patch rows).
    """
    from pixel_reasoner_jax.rollout.episode import EpisodeConfig
    from pixel_reasoner_jax.tools.ops import OpsConfig

    return EpisodeConfig(
        temperature=0.0,
        temperature_after_tool=0.0,
        max_new_tokens=40,
        max_total_tokens=760,
        max_tool_calls=1,
        ops=OpsConfig(crop_max_pixels=84 * 84),
    )


def memo_episode(
    tok, proc, cfg, *, episode_id: str = "memo", image: Image.Image | None = None, question=None
):
    """A started episode on the memorised query (or on another image / question)."""
    from pixel_reasoner_jax.rollout.episode import Episode, PromptMedia

    image = image if image is not None else noise_image(*MEMO_IMAGE_SIZE, seed=7)
    rec = record(episode_id) if question is None else record(episode_id, question)
    return Episode.start(rec, tok, cfg, None, proc, media=PromptMedia(images=(image,)), episode_id=episode_id)


@dataclasses.dataclass(frozen=True)
class Memorized:
    """The fitted checkpoint and what it was fitted to.

    Attributes:
      path: HF checkpoint folder whose greedy policy replays `trajectory`.
      trajectory: the scripted episode (its ids are the fit's targets).
      steps: optimizer steps taken; seconds: wall time of the fit and export.
      min_logprob: smallest log-prob of a target token under the exported weights.
    """

    path: str
    trajectory: object
    steps: int
    seconds: float
    min_logprob: float


def memorize_checkpoint(base_ckpt, out_dir, *, max_steps: int = 400, lr: float = 5e-3) -> Memorized:
    """Fits a copy of `base_ckpt` to the scripted episode MEMO_SCRIPT, then exports it to `out_dir`.

    Teacher forcing on the episode's expanded sequence: the loss is the mean negative log-prob of the
    sampled tokens (batch.loss_mask), computed by models.qwen25vl.token_logprobs on their positions only;
    optax adam over every parameter, until each target has log-prob > MEMO_MIN_LOGPROB.

    Raises:
      RuntimeError: the fit did not reach the threshold within max_steps.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from pixel_reasoner_jax.models import hf_io
    from pixel_reasoner_jax.models.config import ModelConfig
    from pixel_reasoner_jax.models.qwen25vl import token_logprobs
    from pixel_reasoner_jax.processing.batch import collate
    from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
    from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
    from pixel_reasoner_jax.rollout.episode import run_episodes
    from pixel_reasoner_jax.rollout.trajectory import expand_trajectory

    t0 = time.perf_counter()
    tok = QwenTokenizer.from_pretrained(base_ckpt)
    proc = ImageProcessorConfig.from_pretrained(base_ckpt)
    mcfg = ModelConfig.from_pretrained(base_ckpt)
    [traj] = run_episodes(
        ScriptedPolicy(tok, {"memo": MEMO_SCRIPT}), [memo_episode(tok, proc, greedy_config())]
    )
    if traj.status != "answered" or traj.num_valid_calls != 2:
        raise RuntimeError(
            f"the scripted episode ended {traj.status!r} with {traj.num_valid_calls} valid calls"
        )
    ex = expand_trajectory(traj, proc, mcfg)
    b = collate([ex], pad_id=tok.endoftext, vision_cfg=mcfg.vision, seq_buckets=(ex.length,))
    where = np.flatnonzero(b.loss_mask[0])
    targets = jnp.asarray(b.targets[:, where])
    inputs = (b.input_ids, b.positions, b.attention_mask, b.pixel_values, b.vision_inputs)

    model = hf_io.load_model(base_ckpt)
    # The untied embedding table and the vision tower stay fixed: the lm_head and the decoder suffice, and
    # each frozen table saves a dense 152k x D gradient and its Adam update per step.
    trainable = nnx.All(
        nnx.Param, nnx.Not(nnx.PathContains("embed_tokens")), nnx.Not(nnx.PathContains("visual"))
    )
    graphdef, params, rest = nnx.split(model, trainable, ...)
    opt = optax.adam(lr)

    def target_logprobs(p):
        m = nnx.merge(graphdef, p, rest)
        hidden, _ = m.hidden_states(*inputs)
        return token_logprobs(m, hidden[:, where], targets)[0][0]

    def loss(p):
        lp = target_logprobs(p)
        return -lp.mean(), lp

    @jax.jit
    def train(p, opt_state):
        (_, lp), g = jax.value_and_grad(loss, has_aux=True)(p)
        updates, opt_state = opt.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, lp

    opt_state = opt.init(params)
    steps = 0
    for steps in range(max_steps + 1):  # noqa: B007 - the count is reported
        new, new_state, lp = train(params, opt_state)  # lp: the log-probs under `params`
        if float(lp.min()) > MEMO_MIN_LOGPROB:
            break
        params, opt_state = new, new_state
    else:
        raise RuntimeError(f"memorisation reached min log-prob {float(lp.min()):.3f} after {max_steps} steps")
    hf_io.export_hf(nnx.merge(graphdef, params, rest), mcfg, out_dir, extra_files_from=base_ckpt)
    return Memorized(os.fspath(out_dir), traj, steps, time.perf_counter() - t0, float(lp.min()))
