"""GPT-2's tokenizer: byte-level BPE, run by tiktoken from the rank file shipped inside this package.

How GPT-2 turns text into ids, in three steps:

1. **Pre-tokenise.** A regular expression cuts the text into chunks: contractions (`'s`, `'ll`), runs of letters or of
   digits with at most one leading space, runs of other symbols, and whitespace. BPE never merges across chunks, so
   " dogs" (one run of letters) can be one token, but "dog." never is: the "." is a chunk of its own.
2. **Bytes.** Each chunk is taken as its UTF-8 bytes. Every one of the 256 byte values is a token (ranks 0-255), so
   any string, in any script, with emoji, can be encoded: nothing is ever "unknown". (A lone surrogate, which has no
   UTF-8 form, is encoded as U+FFFD, the replacement character.)
3. **Merge by rank.** Repeatedly join the adjacent pair whose concatenation has the lowest rank in the table, until
   no joined pair is in the table. The rank of the final pieces is their token id.

The table (`assets/gpt2.tiktoken`) lists every token but one, the 256 single bytes included, as `base64(bytes)
rank`; it is tiktoken's `r50k_base`. Id 50256 is the special `<|endoftext|>`, which marks document boundaries and is
not in the file.

The Hub and transformers describe the same tokenizer differently: `vocab.json` maps each token to its id, with bytes
spelled through a printable-unicode alphabet, and `merges.txt` lists the merges in rank order. `save_pretrained`
derives both from the ranks, so transformers can load our tokenizer and encode exactly as we do.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken

from .atomic import write_text_atomically
from .config import EOT_ID
from .errors import CheckpointError, DataError

RANKS_FILE = "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TEXT = "<|endoftext|>"  # its id, EOT_ID, is part of the model's config too (bos/eos of generation)
# GPT-2's pre-tokenisation pattern: contractions | letters | digits | other symbols | whitespace (the `(?!\S)` leaves
# the last space of a run to prefix the next word, so " the" stays one token after a run of spaces).
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def load_ranks(path: str | os.PathLike[str] | None = None) -> dict[bytes, int]:
    """Read `base64(token) rank` lines into {token bytes: rank}, after checking the file's sha256."""
    if path is None:
        path = Path(__file__).parent / "assets" / RANKS_FILE
    where = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:  # part of the package: only a broken installation lacks it
        raise CheckpointError(f"{where}: cannot read GPT-2's BPE rank file ({exc.strerror}); reinstall minigpt2") \
            from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise CheckpointError(f"{where} has sha256 {digest}, expected {RANKS_SHA256}: the BPE rank file is "
                              "corrupted; reinstall minigpt2")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(name="minigpt2-gpt2", pat_str=PATTERN, mergeable_ranks=load_ranks(),
                             special_tokens={EOT_TEXT: EOT_ID})


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, used by vocab.json/merges.txt.

    Printable Latin-1 bytes stand for themselves; the others (control bytes, space, ...) are mapped, in order, to
    code points from 256 upward, so that a token's spelling never contains whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _bpe_split(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """Run BPE on `token` using only merges ranked below the token itself: the last two parts are its merge."""
    max_rank = ranks[token]
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best is None:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


class Tokenizer:
    """GPT-2's byte-level BPE tokenizer (50,257 tokens), fully offline.

    >>> tok = Tokenizer()
    >>> tok.encode("Hello world")
    [15496, 995]
    >>> tok.decode([15496, 995])
    'Hello world'
    """

    eot_token: int = EOT_ID
    eot_text: str = EOT_TEXT

    def __init__(self) -> None:
        self._enc = _encoding()

    @property
    def vocab_size(self) -> int:
        """Number of token ids, `<|endoftext|>` included (50257)."""
        return self._enc.n_vocab

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`.

        The literal string `<|endoftext|>` inside `text` is ordinary text (several tokens) unless `allow_special`
        is True, in which case it becomes the special id 50256. Text from users or the web must not be able to
        inject document boundaries by accident.
        """
        if allow_special:
            return self._enc.encode(text, allowed_special={EOT_TEXT})
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False,
                     num_threads: int = 8) -> list[list[int]]:
        """`encode` over many texts, in parallel threads (tiktoken releases the GIL)."""
        if allow_special:
            return self._enc.encode_batch(list(texts), num_threads=num_threads, allowed_special={EOT_TEXT})
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int], *, errors: str = "replace") -> str:
        """Text of `ids`. Token boundaries can split a UTF-8 character; such bytes decode per `errors`.

        An id outside the vocabulary is a DataError naming it.
        """
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids` (useful for streaming text whose characters span tokens).

        An id outside the vocabulary is a DataError naming it.
        """
        ids = list(ids)
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError):  # tiktoken's errors for an unknown id, and for one beyond 64 bits or < 0
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise DataError(f"token id {bad} is outside GPT-2's vocabulary of {self.vocab_size} ids (0 to "
                            f"{self.vocab_size - 1}); the ids come from another tokenizer, or from a model whose "
                            "vocabulary is larger than the tokenizer's") from None

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Write vocab.json, merges.txt and tokenizer_config.json, the Hub's GPT-2 tokenizer layout."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        ranks = load_ranks()
        spell = byte_to_unicode()
        by_rank = sorted(ranks.items(), key=lambda item: item[1])
        vocab = {"".join(spell[b] for b in token): rank for token, rank in by_rank}
        vocab[EOT_TEXT] = EOT_ID
        merges = ["#version: 0.2"]
        for token, rank in by_rank:
            if len(token) > 1:
                left, right = _bpe_split(token, ranks)
                merges.append("".join(spell[b] for b in left) + " " + "".join(spell[b] for b in right))
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": 1024,
            "bos_token": EOT_TEXT,
            "eos_token": EOT_TEXT,
            "unk_token": EOT_TEXT,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
        }
        write_text_atomically(out / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        write_text_atomically(out / "merges.txt", "\n".join(merges) + "\n")
        write_text_atomically(out / "tokenizer_config.json", json.dumps(config, indent=2))
