"""The offline-built Qwen2 tokenizer: real ids, known encodings, round trips, transformers parity, file checks."""

import json
import shutil
import unicodedata

import pytest
from tokenizers import Tokenizer

from pixel_reasoner_jax.processing import tokenizer as tk

CORPUS = [
    "Hello world",
    "\n",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say WE'VE done it, don't you think? She'd've.",
    "3.14159 1,000,000 2025-11-25 0x1F 1e-5 -42 +7 12345678901234567890",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A:\n\tpass\n",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\r\nwindows\r\n\r\nnewlines\n\n\n\n  indented",
    "中文分词测试：你好，世界！日本語のテキスト。한국어 텍스트.",
    "Arabic: مرحبا بالعالم — Hindi: नमस्ते दुनिया — Greek: Γειά σου Κόσμε",
    "Emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and symbols ∑∫√∞ ≤ ≥ ≠",
    "caf\u00e9 vs cafe\u0301 (composed vs decomposed), Å vs A\u030a, ﬁ ligature",
    "put your final answer within \\boxed{\\frac{1}{2}} and $x^2 + y^2 = z^2$",
    '{"name": "crop_image", "arguments": {"bbox_2d": [0.1, 0.2, 0.3, 0.4], "target_image": 1}}',
    "aaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!???...,,,;;;---___===",
    "https://example.com/path?query=1&other=two#frag user@mail.org",
    "",
    " ",
    "\u00a0non-breaking\u2003em space\u200bzero width",
]

TEXT_WITH_ADDED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n<|im_start|>assistant\n"
    'Let me look.<tool_call>\n{"name": "crop_image"}\n</tool_call><|im_end|><|endoftext|>'
)


@pytest.fixture(scope="module")
def tok():
    return tk.QwenTokenizer.build()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tk.write_tokenizer_files(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def hf_tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def vocab():
    with open(tk.bpe_files_dir() / "vocab.json", encoding="utf-8") as f:
        return json.load(f)


def test_added_tokens_have_the_real_ids(tok):
    assert len(tk.ADDED_TOKENS) == 22
    for tid, content, _ in tk.ADDED_TOKENS:
        assert tok.token_to_id(content) == tid
        assert tok.encode(content) == [tid]
        assert tok.id_to_token(tid) == content
    assert (tok.im_start, tok.im_end, tok.endoftext) == (151644, 151645, 151643)
    assert (tok.vision_start, tok.vision_end, tok.image_pad, tok.video_pad) == (
        151652,
        151653,
        151655,
        151656,
    )
    assert (tok.tool_call, tok.tool_call_end) == (151657, 151658)
    assert len(tok) == 151665
    # BPE ids stop right below the first added token: 151643 entries, ids 0..151642.
    assert tok.id_to_token(151642) is not None and tok.id_to_token(151665) is None


def test_known_encodings_match_vocab_json(tok, vocab):
    # Byte-level BPE writes a space as 'Ġ' (U+0120) and a newline as 'Ċ' (U+010A).
    assert vocab["Hello"] == 9707 and vocab["\u0120world"] == 1879
    assert tok.encode("Hello world") == [vocab["Hello"], vocab["\u0120world"]] == [9707, 1879]
    assert tok.encode("\n") == [vocab["\u010a"]] == [198]
    # "\n\n" is one pre-token (\s*[\r\n]+) and one vocab entry.
    assert tok.encode("\n\n") == [vocab["\u010a\u010a"]]
    # The regex splits digits one by one, so numbers never merge.
    assert tok.encode("2025") == [vocab["2"], vocab["0"], vocab["2"], vocab["5"]]
    # Role headers of the chat template.
    assert tok.encode("user\n") == [vocab["user"], vocab["\u010a"]]
    assert tok.encode("assistant\n") == [vocab["assistant"], 198] == [77091, 198]
    assert tok.encode("system") == [vocab["system"]] == [8948]
    # A contraction is its own pre-token: "'s" after a word.
    assert tok.encode("it's") == [vocab["it"], vocab["'s"]]


def test_matches_an_independent_serialisation(tok):
    # The same package ships Qwen3's tokenizer.json, written by the Qwen team's tooling from the same BPE
    # files (Qwen3 only adds tokens above 151664): a second opinion on normaliser, regex and byte level.
    other = Tokenizer.from_file(str(tk.bpe_files_dir() / "tokenizer.json"))
    for text in [*CORPUS, TEXT_WITH_ADDED]:
        assert tok.encode(text) == other.encode(text, add_special_tokens=False).ids, text


@pytest.mark.parametrize("text", CORPUS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < 151643 for i in ids)
    # The NFC normaliser composes characters, so decoding gives the NFC form of the input.
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_added_tokens_inside_text(tok):
    ids = tok.encode(TEXT_WITH_ADDED)
    assert ids[0] == 151644 and ids[-2:] == [151645, 151643]
    assert ids.count(151655) == 1 and ids.count(151657) == 1 and ids.count(151658) == 1
    assert tok.decode(ids) == TEXT_WITH_ADDED
    plain = tok.decode(ids, skip_special_tokens=True)
    # The 14 special tokens disappear; the tool-call tags are not special and stay.
    assert "<|im_start|>" not in plain and "<|image_pad|>" not in plain and "<|endoftext|>" not in plain
    assert '<tool_call>\n{"name": "crop_image"}\n</tool_call>' in plain
    assert plain.startswith("system\nYou are a helpful assistant.\nuser\nWhat?\nassistant\nLet me look.")


def test_transformers_loads_the_folder_with_identical_ids(tok, hf_tok):
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.eos_token_id == 151645
    assert hf_tok.pad_token == "<|endoftext|>" and hf_tok.pad_token_id == 151643
    assert hf_tok.bos_token is None and hf_tok.unk_token is None
    assert hf_tok.model_max_length == 131072
    assert len(hf_tok) == len(tok) == 151665
    for text in [*CORPUS, TEXT_WITH_ADDED]:
        ids = hf_tok.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text), text
        assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert hf_tok.convert_ids_to_tokens(151657) == "<tool_call>"


def test_from_pretrained_reads_the_written_folder(tok, folder):
    loaded = tk.QwenTokenizer.from_pretrained(folder)
    for text in CORPUS[:6]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.image_pad == 151655


def test_written_files(folder):
    names = {p.name for p in folder.iterdir()}
    expected = {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.json"}
    assert expected <= names
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["bos_token"] is None and cfg["unk_token"] is None
    assert cfg["model_max_length"] == 131072 and cfg["chat_template"] == tk.CHAT_TEMPLATE
    dec = cfg["added_tokens_decoder"]
    assert sorted(int(k) for k in dec) == list(range(151643, 151665))
    assert [dec[str(i)]["special"] for i in range(151643, 151665)] == [True] * 14 + [False] * 8
    assert json.loads((folder / "chat_template.json").read_text())["chat_template"] == tk.CHAT_TEMPLATE
    tj = json.loads((folder / "tokenizer.json").read_text())
    assert [t["id"] for t in tj["added_tokens"]] == list(range(151643, 151665))
    assert tj["normalizer"]["type"] == "NFC" and tj["decoder"]["type"] == "ByteLevel"
    # vocab.json and merges.txt are copied byte for byte.
    assert (folder / "merges.txt").read_bytes() == (tk.bpe_files_dir() / "merges.txt").read_bytes()


def test_sha_mismatch_and_missing_files_fail_clearly(tmp_path):
    src = tk.bpe_files_dir()
    shutil.copy(src / "vocab.json", tmp_path / "vocab.json")
    merges = (src / "merges.txt").read_bytes()
    (tmp_path / "merges.txt").write_bytes(merges.replace(b"\ni n\r\n", b"\ni m\r\n", 1))
    with pytest.raises(tk.TokenizerFilesError, match=r"merges\.txt has sha256 .* expected b8e04af9"):
        tk.build_tokenizer(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(tk.TokenizerFilesError, match=r"missing Qwen2 tokenizer file .*merges\.txt"):
        tk.build_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tk.QwenTokenizer.from_pretrained(tmp_path)


def test_encode_rejects_non_text(tok):
    with pytest.raises(TypeError, match="encode expects a str, got list"):
        tok.encode([1, 2])
