"""The tokenizer against transformers' GPT-2 tokenizer loaded from the files we export."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import minigpt2
from minigpt2 import CheckpointError, DataError, Tokenizer
from minigpt2.tokenizer import EOT_ID, RANKS_FILE, load_ranks

TEXTS = [
    "Hello world",
    "   leading spaces and    runs of  spaces\n\n\n\ttabs\t\there  \n",
    "I'm sure they'll say it's what we've done, isn't it? DON'T SHOUT",
    "1234567890 3.14159 1,000,000 -42 2026-11-21 0x1F",
    "naïve café résumé Ünïcödé Ωμέγα Москва",
    "日本語のテキストと中文文本 한국어",
    "emoji 🤗🚀👩‍👩‍👧 flags 🇫🇷 and ZWJ",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # comment\n",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "",
    " ",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "combining e\u0301 vs precomposed é",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    ours = Tokenizer()
    directory = tmp_path_factory.mktemp("tokenizer")
    ours.save_pretrained(directory)
    theirs = AutoTokenizer.from_pretrained(directory)
    return ours, theirs


def test_exported_tokenizer_is_complete(tokenizers):
    ours, theirs = tokenizers
    assert len(theirs) == 50257 == len(ours)
    assert theirs.convert_tokens_to_ids("<|endoftext|>") == EOT_ID


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizers, text):
    ours, theirs = tokenizers
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == theirs.decode(ids) == text


def test_batch_encoding_equals_single(tokenizers):
    ours, theirs = tokenizers
    assert ours.encode_batch(TEXTS) == [theirs.encode(t) for t in TEXTS]


def test_decode_of_split_characters(tokenizers):
    ours, theirs = tokenizers
    ids = ours.encode("🤗 ok")
    partial = ids[:1]  # the emoji's bytes span several tokens: the first alone is invalid UTF-8
    # transformers spells that token "ðŁ" in GPT-2's byte alphabet: "ð" is byte F0 itself, "Ł" (U+0141, 256 + 65)
    # the 66th unprintable byte, 9F; together the first two of the emoji's four bytes, F0 9F A4 97.
    assert theirs.convert_ids_to_tokens(partial) == ["ðŁ"]
    assert ours.decode_bytes(partial) == b"\xf0\x9f" == "🤗".encode()[:2]
    assert b"".join(ours.decode_bytes([i]) for i in ids) == "🤗 ok".encode()
    assert ours.decode(partial) == theirs.decode(partial)
    assert "\ufffd" in ours.decode(partial)


@pytest.mark.parametrize("bad", [50257, 50304, -1, 2**64])
@pytest.mark.parametrize("method", ["decode", "decode_bytes"])
def test_ids_outside_the_vocabulary_are_a_clear_error(tokenizers, bad, method):
    """50304: the vocabulary GPT-2 models are often padded to, whose extra ids no tokenizer can decode."""
    ours, _ = tokenizers
    with pytest.raises(DataError, match=rf"^token id {bad} is outside GPT-2's vocabulary of 50257 ids \(0 to 50256\)"):
        getattr(ours, method)([15496, bad, 995])


def test_endoftext_is_special_only_when_asked(tokenizers):
    ours, theirs = tokenizers
    text = "end<|endoftext|>start"
    plain = ours.encode(text)
    assert EOT_ID not in plain
    assert ours.decode(plain) == text
    special = ours.encode(text, allow_special=True)
    assert special == ours.encode("end") + [EOT_ID] + ours.encode("start")
    assert special == theirs.encode(text)  # transformers always treats it as special


def test_rank_file_hash_is_checked(tmp_path):
    good = (Path(minigpt2.__file__).parent / "assets" / RANKS_FILE).read_bytes()
    assert len(load_ranks()) == 50256
    corrupted = tmp_path / RANKS_FILE
    corrupted.write_bytes(good.replace(b" 50255", b" 50254"))
    with pytest.raises(CheckpointError, match="sha256 .* expected 306cd27f"):
        load_ranks(corrupted)
    # A missing file is an installation to repair too, where it was "check the path and its permissions".
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / 'gone'))}: cannot read GPT-2's BPE rank "
                                              r"file \(No such file or directory\); reinstall minigpt2$"):
        load_ranks(tmp_path / "gone")
