"""The Qwen2.5-VL chat template in code, at token level: messages -> ids, loss mask and vision slots.

Token-exact with `tokenizer.CHAT_TEMPLATE` rendered by transformers; plus the multi-turn episode pieces.
"""

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pixel_reasoner_jax.processing.tokenizer import DEFAULT_SYSTEM, QwenTokenizer
from pixel_reasoner_jax.processing.vision import MERGE, num_image_tokens
from pixel_reasoner_jax.tools.prompts import PromptTemplates, system_prompt

IMAGE, VIDEO = "image", "video"
ROLES = ("system", "user", "assistant", "tool")
_VISION_STRINGS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


@dataclasses.dataclass(frozen=True)
class VisionSlot:
    """Where one image or video sits in the token sequence.

    Attributes:
      kind: "image" or "video".
      index: 0-based among items of the same kind (row of image_grids / video_grids).
      message: index of the message holding the item (-1 for observation parts).
      start: position of the first pad token.
      length: pad tokens (grid-derived when expanded, 1 when collapsed).
    """

    kind: str
    index: int
    message: int
    start: int
    length: int


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A tokenized conversation.

    Attributes:
      input_ids: (T,) int32.
      loss_mask: (T,) int8, 1 on assistant content tokens and their <|im_end|>.
      slots: vision items in sequence order.
      image_grids, video_grids: (I, 3) / (V, 3) int64 grid_thw of the items, in order.
      expanded: True when each pad run holds the grid's token count, False for one pad per item.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    slots: tuple[VisionSlot, ...]
    image_grids: np.ndarray
    video_grids: np.ndarray
    expanded: bool


def _grids(grids, what: str) -> np.ndarray:
    arr = np.asarray(grids, dtype=np.int64).reshape(-1, 3) if len(grids) else np.zeros((0, 3), np.int64)
    if arr.shape[0] != len(grids):
        raise ValueError(f"{what} must be a sequence of (t, h, w) triples, got {grids!r}")
    return arr


class _Builder:
    """Accumulates ids and mask; text runs are encoded whole when an id token interrupts them.

    Why this is token-exact: the rendered text is cut only at the tokens emitted here as ids (<|im_start|>,
    <|im_end|>, vision blocks). Those are added tokens, so the real tokenizer cuts the rendered string at the
    same places; each text run between them is encoded whole (never piece by piece), so BPE and the
    pre-tokenizer regex see exactly the characters they see in the rendered string.
    """

    def __init__(self, tok: QwenTokenizer, image_grids, video_grids, expand: bool, merge_size: int):
        self.tok = tok
        self.ids: list[int] = []
        self.mask: list[int] = []
        self.slots: list[VisionSlot] = []
        self._text: list[tuple[str, int]] = []
        self.grids = {IMAGE: _grids(image_grids, "image_grids"), VIDEO: _grids(video_grids, "video_grids")}
        self.used = {IMAGE: 0, VIDEO: 0}
        self.expand = expand
        self.merge_size = merge_size

    def text(self, s: str, m: int = 0) -> None:
        if s:
            self._text.append((s, m))

    def token(self, tid: int, m: int = 0, count: int = 1) -> None:
        self._flush()
        self.ids.extend([tid] * count)
        self.mask.extend([m] * count)

    def vision(self, kind: str, where: str, message: int) -> None:
        k = self.used[kind]
        grids = self.grids[kind]
        if k >= len(grids):
            raise ValueError(
                f"{where} holds {kind} item number {k + 1} but only {len(grids)} {kind} grids were given"
            )
        n = num_image_tokens(grids[k], self.merge_size) if self.expand else 1
        pad = self.tok.image_pad if kind == IMAGE else self.tok.video_pad
        self.token(self.tok.vision_start)
        self.slots.append(VisionSlot(kind, k, message, len(self.ids), n))
        self.token(pad, count=n)
        self.token(self.tok.vision_end)
        self.used[kind] += 1

    def _flush(self) -> None:
        if not self._text:
            return
        s = "".join(t for t, _ in self._text)
        flags = {m for _, m in self._text}
        if len(flags) == 1:
            ids = self.tok.encode(s)
            self.mask.extend([flags.pop()] * len(ids))
        else:
            # A token straddling a mask boundary (e.g. "\n\n" when assistant content starts with "\n")
            # is trained: it carries content characters.
            char_mask = np.concatenate([np.full(len(t), m, np.int8) for t, m in self._text])
            ids, offsets = self.tok.encode_with_offsets(s)
            for a, b in offsets:
                a = min(a, len(s) - 1)
                self.mask.append(int(char_mask[a : max(b, a + 1)].max()))
        self.ids.extend(ids)
        self._text = []

    def check_all_used(self) -> None:
        for kind in (IMAGE, VIDEO):
            if self.used[kind] != len(self.grids[kind]):
                raise ValueError(
                    f"{len(self.grids[kind])} {kind} grids were given but the conversation has "
                    f"{self.used[kind]} {kind} items"
                )

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        self._flush()
        return np.asarray(self.ids, dtype=np.int32), np.asarray(self.mask, dtype=np.int8)


def _item_kind(item: Any, where: str) -> str:
    """Classifies a content item the way the template does: image, then video, then text."""
    if not isinstance(item, Mapping):
        # The template would test `'image' in item` as a substring of a bare string: refuse instead.
        raise ValueError(f"{where}: content items must be dicts, got {type(item).__name__}: {item!r}")
    if item.get("type") == IMAGE or IMAGE in item or "image_url" in item:
        return IMAGE
    if item.get("type") == VIDEO or VIDEO in item:
        return VIDEO
    if "text" in item:
        return "text"
    raise ValueError(f"{where}: content item {dict(item)!r} is not an image, video or text item")


def _check_text(s: Any, where: str) -> str:
    if not isinstance(s, str):
        raise ValueError(f"{where}: text must be a str, got {type(s).__name__}")
    for v in _VISION_STRINGS:
        if v in s:
            # The pads of a literal vision token would not belong to any image: the count check could not
            # hold, so refuse instead of producing an unusable sequence.
            raise ValueError(f"{where}: text contains the vision token {v}; use an image/video item instead")
    return s


def _content(b: _Builder, content: Any, m: int, where: str, message: int, counters: dict, vision_id: bool):
    if content is None:
        return
    if isinstance(content, str):
        b.text(_check_text(content, where), m)
        return
    if not isinstance(content, Sequence):
        raise ValueError(f"{where}: content must be a str or a list of items, got {type(content).__name__}")
    for j, item in enumerate(content):
        w = f"{where} item {j}"
        kind = _item_kind(item, w)
        if kind == "text":
            b.text(_check_text(item["text"], w), m)
            continue
        counters[kind] += 1
        if vision_id:
            b.text(f"Picture {counters[kind]}: " if kind == IMAGE else f"Video {counters[kind]}: ", 0)
        b.vision(kind, where, message)


def _call_text(call: Mapping[str, Any], where: str) -> str:
    fn = call.get("function", call)
    if "name" not in fn or "arguments" not in fn:
        raise ValueError(f"{where}: a tool call needs 'name' and 'arguments', got {dict(call)!r}")
    args = fn["arguments"]
    # Same serialisation as the template's tojson filter in transformers (json.dumps, ensure_ascii=False).
    args_text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return '\n<tool_call>\n{"name": "' + fn["name"] + '", "arguments": ' + args_text + "}\n</tool_call>"


def tool_block(tools: Sequence[str | Mapping[str, Any]] | None) -> str:
    """The text appended to the system message when tools are offered ('' for none)."""
    return system_prompt(PromptTemplates(system=""), tools=tuple(tools)) if tools else ""


def encode_conversation(
    tok: QwenTokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    image_grids: Sequence = (),
    video_grids: Sequence = (),
    add_generation_prompt: bool,
    tools: Sequence[str | Mapping[str, Any]] | None = None,
    expand: bool = True,
    assistant_loss: Sequence[bool] | None = None,
    add_vision_id: bool = False,
    merge_size: int = MERGE,
) -> Encoded:
    """Tokenizes a Qwen/OpenAI-form conversation as the chat template would, without re-tokenizing images.

    Args:
      tok: the Qwen tokenizer.
      messages: dicts with `role` (system, user, assistant, tool) and `content` (str, None, or a list of
        {"type": "text"|"image"|"video", ...} items); assistant messages may carry OpenAI `tool_calls`.
      image_grids, video_grids: grid_thw per image / video item, in conversation order.
      add_generation_prompt: end with `<|im_start|>assistant\\n`.
      tools: tool names (see tools/prompts.py) or schema dicts; their block is appended to the system text.
      expand: write t*h*w/merge**2 pads per item (model input); False writes one pad (SGLang input).
      assistant_loss: per assistant message, whether it is trained; None trains all of them.
      add_vision_id: prefix "Picture k: " / "Video k: " to each item, as the template's option does.
      merge_size: spatial merge size of the vision tower.

    Raises:
      ValueError: an unknown role, bad content, more vision items than grids (naming the message) or fewer,
        or an assistant_loss of the wrong length.
    """
    if not messages:
        raise ValueError("encode_conversation needs at least one message, got none")
    n_assistant = sum(1 for msg in messages if msg.get("role") == "assistant")
    if assistant_loss is None:
        assistant_loss = [True] * n_assistant
    elif len(assistant_loss) != n_assistant:
        raise ValueError(
            f"assistant_loss has {len(assistant_loss)} entries but the conversation has {n_assistant} "
            "assistant messages"
        )
    b = _Builder(tok, image_grids, video_grids, expand, merge_size)
    counters = {IMAGE: 0, VIDEO: 0}
    block = tool_block(tools)
    if messages[0].get("role") != "system":
        b.token(tok.im_start)
        b.text("system\n" + DEFAULT_SYSTEM + block)
        b.token(tok.im_end)
        b.text("\n")
    turn = 0
    for i, msg in enumerate(messages):
        where = f"message {i}"
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: role must be one of {ROLES}, got {role!r}")
        content = msg.get("content")
        if role == "tool":
            if not isinstance(content, str):
                raise ValueError(f"{where}: a tool message needs str content, got {type(content).__name__}")
            if i == 0 or messages[i - 1].get("role") != "tool":
                b.token(tok.im_start)
                b.text("user")
            b.text("\n<tool_response>\n" + _check_text(content, where) + "\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1].get("role") != "tool":
                b.token(tok.im_end)
                b.text("\n")
            continue
        m = 0
        if role == "assistant":
            m = int(bool(assistant_loss[turn]))
            turn += 1
        calls = msg.get("tool_calls") or []
        b.token(tok.im_start)
        b.text(role)
        if content or not calls:
            b.text("\n")
        _content(b, content, m, where, i, counters, add_vision_id)
        if i == 0 and role == "system":
            b.text(block)
        for call in calls:
            b.text(_call_text(call, where), m)
        b.token(tok.im_end, m)
        b.text("\n")
    if add_generation_prompt:
        b.token(tok.im_start)
        b.text("assistant\n")
    b.check_all_used()
    ids, mask = b.arrays()
    return Encoded(ids, mask, tuple(b.slots), b.grids[IMAGE], b.grids[VIDEO], expand)


def generation_prompt_ids(tok: QwenTokenizer) -> np.ndarray:
    """`<|im_start|>assistant\\n` as ids (int32)."""
    return np.asarray([tok.im_start, *tok.encode("assistant\n")], dtype=np.int32)


def observation_ids(
    tok: QwenTokenizer,
    parts: Sequence[str | Mapping[str, Any]],
    image_grids: Sequence = (),
    video_grids: Sequence = (),
    *,
    expand: bool = True,
    closed: bool = True,
    merge_size: int = MERGE,
) -> np.ndarray:
    """Ids appended after an assistant turn: the tool result as a user turn, then the generation prompt.

    Episode protocol (reference/sglang.md §5), all with loss mask 0:
      - turn ended with a generated <|im_end|> (closed=True):
        "\n" <|im_start|> "user\n" + parts + <|im_end|> "\n" <|im_start|> "assistant\n"
      - turn stopped on </tool_call> without <|im_end|> (closed=False): the same, preceded by <|im_end|>
        (mask 0: the policy did not produce it).
    Text parts are encoded together with the "user\n" header (Pixel Reasoner's observations start with
    "\n", which merges with it into one "\n\n" token), so prompt + generated ids + these ids equal the
    template rendering of the conversation with the observation as a user message.

    Args:
      tok: the Qwen tokenizer.
      parts: texts and image/video items in order, e.g. ["\\nHere is the cropped image (...):",
        {"type": "image"}].
      image_grids, video_grids: grid_thw of the parts' items, in order.
      expand: grid-derived pad runs (True) or one pad per item (False).
      closed: whether the assistant turn already ends with <|im_end|>; if not, it is added here.
      merge_size: spatial merge size of the vision tower.

    Returns:
      (n,) int32 ids; they all carry loss mask 0.

    Raises:
      ValueError: bad parts, or the number of vision items differs from the grids given.
    """
    b = _Builder(tok, image_grids, video_grids, expand, merge_size)
    if not closed:
        b.token(tok.im_end)
    b.text("\n")
    b.token(tok.im_start)
    b.text("user\n")
    items = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    _content(b, items, 0, "observation", -1, {IMAGE: 0, VIDEO: 0}, False)
    b.token(tok.im_end)
    b.text("\n")
    b.token(tok.im_start)
    b.text("assistant\n")
    b.check_all_used()
    return b.arrays()[0]


def expand_pads(
    ids: np.ndarray,
    mask: np.ndarray,
    image_grids: Sequence = (),
    video_grids: Sequence = (),
    *,
    image_pad: int = 151655,
    video_pad: int = 151656,
    merge_size: int = MERGE,
) -> tuple[np.ndarray, np.ndarray]:
    """Collapsed ids (one pad per item) -> expanded ids (t*h*w/merge**2 pads per item); mask follows.

    Raises:
      ValueError: pads that are already runs, or pad counts that differ from the grids given.
    """
    ids = np.asarray(ids)
    mask = np.asarray(mask)
    if ids.shape != mask.shape or ids.ndim != 1:
        raise ValueError(f"ids and mask must be 1-D of one shape, got {ids.shape} and {mask.shape}")
    grids = {image_pad: _grids(image_grids, "image_grids"), video_pad: _grids(video_grids, "video_grids")}
    positions = np.flatnonzero(np.isin(ids, (image_pad, video_pad)))
    adjacent = positions[1:][np.diff(positions) == 1]
    if adjacent.size:
        raise ValueError(
            f"ids hold a run of pads ending at position {int(adjacent[0])}; expand_pads expects one pad per item"
        )
    for pad, name in ((image_pad, "image"), (video_pad, "video")):
        count = int((ids == pad).sum())
        if count != len(grids[pad]):
            raise ValueError(f"ids hold {count} {name} pads but {len(grids[pad])} {name} grids were given")
    repeats = np.ones(len(ids), dtype=np.int64)
    for pad in (image_pad, video_pad):
        where = np.flatnonzero(ids == pad)
        repeats[where] = [num_image_tokens(g, merge_size) for g in grids[pad]]
    return np.repeat(ids, repeats).astype(ids.dtype), np.repeat(mask, repeats).astype(mask.dtype)
