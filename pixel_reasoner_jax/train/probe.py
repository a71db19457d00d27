"""The call probe (`log.call_probe`): how likely the policy is to open its answer with a tool call, read
without sampling.

RaPR counts sampled rollouts: with 32 episodes per step (the CPU jobs) one step's value has a standard
error of ~0.08 at RaPR 0.25, so a trend shows only over many steps. The probe takes the first
`log.call_probe` RL prompts, built exactly as the rollouts build them (Episode.start), appends the
`<tool_call>` token as a one-token response and reads its probability in the trainer's own log-prob
program, under the parameters a rollout batch starts training from: once per rollout batch, logged on each
of its loop steps (one step per rollout in the CPU jobs; with grpo.steps_per_rollout > 1 the value repeats
until the next batch). The mean over the prompts is the expected share of responses that open
with a call: the quantity RaPR samples, for policies that call before writing any text (the CPU jobs' terse
warm start, configs/trap.py). A released-style policy writes its analysis first, so there the probe reads
~0 whatever its RaPR.
"""

from collections.abc import Sequence

import numpy as np

from pixel_reasoner_jax.data.records import RLRecord
from pixel_reasoner_jax.models.config import ModelConfig
from pixel_reasoner_jax.processing.batch import Example, build_example
from pixel_reasoner_jax.processing.tokenizer import QwenTokenizer
from pixel_reasoner_jax.processing.vision import ImageProcessorConfig
from pixel_reasoner_jax.rollout.episode import Episode, EpisodeConfig


def call_probe_examples(
    records: Sequence[RLRecord],
    tok: QwenTokenizer,
    ep_cfg: EpisodeConfig,
    proc: ImageProcessorConfig,
    model_cfg: ModelConfig,
) -> list[Example]:
    """One Example per record: its rollout prompt, then `<tool_call>` as the only trained token.

    Raises:
      ValueError: a prompt leaves no room for a response token (rollout.max_total_tokens).
    """
    out = []
    for rec in records:
        ep = Episode.start(rec, tok, ep_cfg, None, proc, episode_id=f"probe-{rec.qid}")
        if ep.done:
            raise ValueError(f"call probe: the prompt of {rec.qid!r} leaves no room for a response token")
        req = ep.next_request()
        ids = np.array([*req.input_ids, tok.tool_call], np.int32)
        mask = np.zeros(ids.size, np.int8)
        mask[-1] = 1
        out.append(
            build_example(ids, mask, np.zeros(ids.size, np.float32), req.media, proc, model_cfg, rec.qid)
        )
    return out


def p_call(trained_logprobs: Sequence[np.ndarray]) -> float:
    """The mean probability of the probed token from each example's trained log-probs (one value each)."""
    lp = np.array([float(np.asarray(v).reshape(-1)[0]) for v in trained_logprobs], np.float64)
    return float(np.exp(lp).mean())
