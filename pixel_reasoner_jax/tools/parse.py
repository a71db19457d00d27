"""Tool-call parsing and dispatch: model text -> ToolCall | ToolCallError -> ToolResult.

`execute` never raises; a malformed or failing call becomes an `Execution error` observation.
"""

import dataclasses
import json
import logging
import traceback
from collections.abc import Callable
from typing import Any

from pixel_reasoner_jax.tools import ops
from pixel_reasoner_jax.tools.ops import OpsConfig, ToolResult, VisualState, error_result, show

TOOL_START = "<tool_call>"
TOOL_END = "</tool_call>"
IM_END = "<|im_end|>"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A well-formed call: the tool name and its argument dict, as the model wrote them.

    `extra_keys` are the call object's keys besides "name" and "arguments": the original read only those
    two (`json.loads`, then `["name"]`, `["arguments"]`), so the others are ignored and counted.
    """

    name: str
    arguments: dict[str, Any]
    extra_keys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ToolCallError:
    """A call that could not be read; `message` says why and becomes the error observation."""

    message: str


def is_tool_call_turn(text: str) -> bool:
    """The original's rule: a turn requests a tool iff, without <|im_end|>, it ends with </tool_call>."""
    return text.replace(IM_END, "").endswith(TOOL_END)


def parse_tool_call(text: str) -> ToolCall | ToolCallError:
    """Reads the LAST `<tool_call>{json}</tool_call>` of `text` (newlines inside the tags optional).

    A missing closing tag takes the rest of the text, as the original's split did.
    """
    if not isinstance(text, str):
        return ToolCallError(
            f"Execution Error: expected the response text as a string, got {type(text).__name__}."
        )
    start = text.rfind(TOOL_START)
    if start < 0:
        return ToolCallError(f"Execution Error: No {TOOL_START} block found in the response.")
    body = text[start + len(TOOL_START) :]
    end = body.find(TOOL_END)
    if end >= 0:
        body = body[:end]
    body = body.strip()
    try:
        obj = json.loads(body)
    except RecursionError:
        return ToolCallError("Execution Error: The tool call is nested too deeply to be read as JSON.")
    except ValueError as e:  # JSONDecodeError, and ints longer than Python's digit limit
        return ToolCallError(f"Execution Error: The tool call is not valid JSON ({e}): {show(body)}")
    if not isinstance(obj, dict):
        return ToolCallError(
            'Execution Error: The tool call must be a JSON object {"name": ..., "arguments": {...}}, got '
            f"{type(obj).__name__}: {show(obj)}"
        )
    if "name" not in obj:
        return ToolCallError(f'Execution Error: The tool call has no "name": {show(obj)}')
    if not isinstance(obj["name"], str):
        return ToolCallError(
            f'Execution Error: The tool call "name" must be a string, got {show(obj["name"])}'
        )
    if "arguments" not in obj:
        return ToolCallError(f'Execution Error: The tool call has no "arguments": {show(obj)}')
    if not isinstance(obj["arguments"], dict):
        return ToolCallError(
            f'Execution Error: The tool call "arguments" must be a JSON object, got {show(obj["arguments"])}'
        )
    extra = tuple(str(k) for k in obj if k not in ("name", "arguments"))
    return ToolCall(obj["name"], obj["arguments"], extra)


@dataclasses.dataclass(frozen=True)
class ToolSpec:
    """A registered tool: its function fn(state, cfg=..., name=..., **arguments) and argument names."""

    fn: Callable[..., ToolResult]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


_CROP = ToolSpec(ops.crop_image, ("bbox_2d", "target_image"))
# `crop_image_normalized` (the repo's current name) and `zoom_in` (an unused class of the original) are
# aliases: the released models call `crop_image`, and the bbox rule reads both coordinate kinds anyway.
CROP_TOOLS = ("crop_image", "crop_image_normalized", "zoom_in")
TOOLS: dict[str, ToolSpec] = {
    **dict.fromkeys(CROP_TOOLS, _CROP),
    "select_frames": ToolSpec(ops.select_frames, ("target_frames",)),
}

# Exceptions that escaped a tool and were turned into error results by execute's last guard. Any entry is
# a bug in this package (tests assert the list stays empty); it is bounded so a long run cannot grow it.
_UNEXPECTED: list[str] = []
_UNEXPECTED_LIMIT = 100
_GUARD_ERROR = "\nExecution error:\n{message}\n"  # the guard's own copy, in case cfg is what broke


def unexpected_errors() -> list[str]:
    """Tracebacks of exceptions execute's final guard caught (most recent last), as a copy."""
    return list(_UNEXPECTED)


def clear_unexpected_errors() -> None:
    """Forgets the recorded unexpected exceptions."""
    _UNEXPECTED.clear()


def _names(keys) -> str:
    return ", ".join(f"`{k}`" for k in sorted(map(str, keys)))


def _dispatch(call: Any, state: VisualState, cfg: OpsConfig) -> ToolResult:
    if isinstance(call, ToolCallError):
        return error_result(call.message, None, cfg)
    if not isinstance(call, ToolCall):
        return error_result(
            f"Execution Error: expected a ToolCall or ToolCallError, got {type(call).__name__}.", None, cfg
        )
    name = call.name
    spec = TOOLS.get(name) if isinstance(name, str) else None
    if spec is None:
        return error_result(
            f"Execution Error: Unknown tool {show(name)}. Available tools: `{cfg.crop_tool_name}`, `select_frames`.",
            name if isinstance(name, str) else None,
            cfg,
        )
    args = call.arguments
    if not isinstance(args, dict):
        return error_result(
            f"Execution Error: `{name}` arguments must be a JSON object, got {show(args)}.", name, cfg
        )
    missing = [k for k in spec.required if k not in args]
    if missing:
        return error_result(
            f"Execution Error: `{name}` is missing required argument(s) {_names(missing)}; it takes "
            f"{_names(spec.required + spec.optional)}.",
            name,
            cfg,
        )
    # The original read its arguments by key (`args['bbox_2d']`, ...), so released checkpoints that add a
    # key (e.g. "reason") had it ignored; so do we, and count it.
    known = spec.required + spec.optional
    extra = tuple(str(k) for k in args if k not in known)
    result = spec.fn(state, cfg=cfg, name=name, **{k: v for k, v in args.items() if k in known})
    return dataclasses.replace(result, ignored_keys=extra)


def execute(call: ToolCall | ToolCallError, state: VisualState, cfg: OpsConfig | None = None) -> ToolResult:
    """Runs a parsed call on `state`; every failure becomes an error ToolResult, nothing is raised.

    Expected failures (bad JSON, unknown tool, missing/wrong arguments, bad indices) are handled where
    they arise. The last guard below catches anything else, so one bad rollout cannot kill a training run,
    and records it in `unexpected_errors()` so that tests see such bugs.
    """
    cfg = OpsConfig() if cfg is None else cfg
    try:
        result = _dispatch(call, state, cfg)
        if isinstance(call, ToolCall) and call.extra_keys:
            result = dataclasses.replace(result, ignored_keys=tuple(call.extra_keys) + result.ignored_keys)
        return result
    except Exception as e:  # the final guard: see the docstring
        tb = traceback.format_exc()
        if len(_UNEXPECTED) < _UNEXPECTED_LIMIT:
            _UNEXPECTED.append(tb)
        log.error("tool execution raised unexpectedly:\n%s", tb)
        message = f"Execution Error: internal error while running the tool: {type(e).__name__}"
        name = getattr(call, "name", None)
        return ToolResult(
            False, _GUARD_ERROR.format(message=message), [], message, name if isinstance(name, str) else None
        )
