"""The data pipeline: reading, cleaning, packing, splitting, loading, the pydocs corpus and the prepare CLI.

Oracles are independent of the code under test: expected documents are written out by hand, token streams are
rebuilt with `Tokenizer.encode` one document at a time, and loader tests use a token array whose values are their
own positions (tokens[i] == i), so every window says where it was cut from.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from minigpt2 import ConfigError, DataError, Tokenizer
from minigpt2 import sources
from minigpt2.atomic import staging_path
from minigpt2.cli import run_main
from minigpt2.cleaning import Cleaner, CleaningOptions, normalize_whitespace, strip_emoji, strip_html
from minigpt2.dataset import BatchLoader, PreparedDataset, iter_eval_batches
from minigpt2.prepare import ensure_prepared, main, prepare_dataset
from minigpt2.pydocs import build_pydocs, default_corpus, module_documents, stdlib_modules
from minigpt2.sources import Source

ROOT = Path(__file__).resolve().parent.parent
EOT = 50256
TOK = Tokenizer()


def packed(documents: list[str]) -> np.ndarray:
    """The expected token stream: <|endoftext|> before each document."""
    ids: list[int] = []
    for text in documents:
        ids += [EOT, *TOK.encode(text)]
    return np.array(ids, dtype=np.uint16)


def split_documents(tokens: np.ndarray) -> list[str]:
    assert len(tokens) and tokens[0] == EOT
    bounds = [*np.flatnonzero(tokens == EOT), len(tokens)]
    return [TOK.decode(tokens[a + 1:b].tolist()) for a, b in zip(bounds, bounds[1:])]


def check_prepared(out: Path, expected: list[str]) -> tuple[list[str], list[str]]:
    """`out` holds exactly `expected` (in order within each split), packed with no padding; returns the splits."""
    data = PreparedDataset(out)
    train, val = (split_documents(np.asarray(data.tokens(s))) for s in ("train", "val"))
    assert sorted(train + val) == sorted(expected)
    assert train == [d for d in expected if d in set(train)] and val == [d for d in expected if d in set(val)]
    assert np.array_equal(data.tokens("train"), packed(train))
    assert np.array_equal(data.tokens("val"), packed(val))
    counts = data.meta["counts"]
    assert counts["train_tokens"] + counts["val_tokens"] == sum(len(TOK.encode(d)) + 1 for d in expected)
    assert (counts["train_documents"], counts["val_documents"]) == (len(train), len(val))
    return train, val


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# -- reading and cleaning ----------------------------------------------------------------------------------------

MESSY = (b"Hello   world.  \r\nSecond line of doc one.\r\n\r\n"
         b"<p>Cafe\xcc\x81 &amp; cr\xc3\xa8me</p>\n\n"
         b"Bell\x07 and\x1b escape\n\n\n\n"
         b"Hello   world.  \nSecond line of doc one.\n\n   \n"
         b"x\xc2\xa0y\xe3\x80\x80z\n\n"
         b"if a < b and c > d: return <BLANKLINE>\n\n"
         b"<b></b>\n")
MESSY_CLEAN = ["Hello   world.\nSecond line of doc one.", "Café & crème", "Bell and escape", "x y z",
               "if a < b and c > d: return <BLANKLINE>"]


def test_txt_is_cleaned_deduplicated_and_packed(tmp_path):
    source = write(tmp_path / "messy.txt", MESSY)
    meta = prepare_dataset(source, tmp_path / "out", progress=False)
    check_prepared(tmp_path / "out", MESSY_CLEAN)
    counts = meta["counts"]
    assert counts["documents_read"] == 7 and counts["documents_empty"] == 1 and counts["duplicates_removed"] == 1
    assert counts["documents"] == 5 and counts["val_documents"] == 1  # max(1, round(5 * 0.1))
    assert counts["bytes_removed_duplicates"] == len(MESSY_CLEAN[0].encode())
    assert counts["padding_tokens"] == 0
    changed = {step: s["documents_changed"] for step, s in meta["cleaning"].items()}
    assert changed == {"html": 2, "unicode": 1, "control": 1, "whitespace": 4}
    assert meta["cleaning"]["control"]["chars_removed"] == 2
    assert meta["source"]["files"] == [{"path": "messy.txt", "bytes": len(MESSY), "documents": 7,
                                        "sha256": hashlib.sha256(MESSY).hexdigest()}]
    assert meta["tokenizer"]["eot_token"] == EOT and meta["dtype"] == "uint16"
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])  # Unix, Windows, classic Mac OS
def test_txt_paragraphs_split_at_blank_lines_whatever_the_line_ending(tmp_path, newline):
    """A file whose lines end with CR alone was one document: reading splits at LF only."""
    text = newline.join(["first line", "second line", "", "next paragraph", " ", "", "last", ""])
    source = write(tmp_path / "corpus.txt", text)
    prepare_dataset(source, tmp_path / "out", progress=False)
    check_prepared(tmp_path / "out", ["first line\nsecond line", "next paragraph", "last"])
    prepare_dataset(source, tmp_path / "raw", normalize_whitespace=False, progress=False)
    check_prepared(tmp_path / "raw", [f"first line{newline}second line", "next paragraph", "last"])


def test_cleaning_steps_can_be_switched_off(tmp_path):
    source = write(tmp_path / "messy.txt", MESSY)
    meta = prepare_dataset(source, tmp_path / "out", strip_html=False, normalize_unicode=False, drop_control=False,
                           normalize_whitespace=False, dedup=False, progress=False)
    expected = ["Hello   world.  \r\nSecond line of doc one.", "<p>Cafe\u0301 &amp; cr\u00e8me</p>",
                "Bell\x07 and\x1b escape", "Hello   world.  \nSecond line of doc one.", "x\u00a0y\u3000z",
                "if a < b and c > d: return <BLANKLINE>", "<b></b>"]
    assert expected[3] == expected[0].replace("\r", "")  # the duplicate differs before cleaning
    check_prepared(tmp_path / "out", expected)
    assert meta["cleaning"] == {} and meta["counts"]["duplicates_removed"] == 0


def test_cleaning_functions():
    assert strip_html('<div class="a">one</div><span>two</span> &lt;3 &copy=2 &#233;') == "\none\ntwo <3 &copy=2 é"
    assert strip_html("a<script>var x = '<p>';</script>b<!-- note -->c") == "abc"
    assert strip_html("List<int> and <module> and a<b") == "List<int> and <module> and a<b"
    assert normalize_whitespace("\n\n  indented\t \r\n\n\n\nnext\u2028line  \n") == "  indented\n\nnext\nline"
    assert strip_emoji("ok 👍🏽 fine 👩‍👩‍👧 end 🇫🇷!") == "ok fine end!"
    assert strip_emoji("naïve café") == "naïve café"
    # NEL (U+0085) is a C1 control and a line break: the control step keeps it for the whitespace step.
    assert Cleaner(CleaningOptions())("one\x85two\x1b three") == "one\ntwo three"
    # So are form feed and vertical tab (str.splitlines' line breaks): they were deleted, joining "page1page2".
    assert Cleaner(CleaningOptions())("page1\x0cpage2\x0bthree\n\x0c\nfour") == "page1\npage2\nthree\n\nfour"
    cleaner = Cleaner(CleaningOptions(strip_emoji=True))
    assert cleaner("<p>hi 🙂</p>") == "hi"
    assert cleaner.stats.to_dict()["emoji"] == {"documents_changed": 1, "chars_removed": 2}


def test_formats_and_folders(tmp_path):
    write(tmp_path / "r.jsonl", '{"body": "first record", "id": 1}\n\n{"body": "second\\nrecord"}\n')
    write(tmp_path / "r.json", '[\n  {"text": "a"},\n  {"text": "b \\u00e9", "x": [1, {"y": "]"}]}\n]\n')
    write(tmp_path / "r.csv", 'id,content\n1,"multi\nline, with comma"\n2,plain\n')
    write(tmp_path / "sep.txt", "one\n\nstill one<|endoftext|>two<|endoftext|>\nthree\n")
    folder = tmp_path / "folder"
    for name, text in {"b.txt": "bee", "sub/a.md": "# A\n\ntext", "c.TXT": "sea", ".hidden.txt": "no",
                       ".git/x.txt": "no", "skip.py": "no", "notes.json": "no"}.items():
        write(folder / name, text)
    cases = [("r.jsonl", {"text_field": "body"}, ["first record", "second\nrecord"]),
             ("r.json", {}, ["a", "b é"]),
             ("r.csv", {"csv_column": "content"}, ["multi\nline, with comma", "plain"]),
             ("sep.txt", {"separator": "<|endoftext|>"}, ["one\n\nstill one", "two", "three"]),
             ("folder", {}, ["bee", "sea", "# A\n\ntext"])]
    for name, options, expected in cases:
        prepare_dataset(tmp_path / name, tmp_path / f"out-{name}", progress=False, **options)
        check_prepared(tmp_path / f"out-{name}", expected)
    files = PreparedDataset(tmp_path / "out-folder").meta["source"]["files"]
    assert [f["path"] for f in files] == ["b.txt", "c.TXT", "sub/a.md"]


def test_linked_folders_are_read_once_each(tmp_path):
    """A folder linked into the corpus is read (it was skipped without a word); a link back up the tree, or a
    second link to a folder already read, adds nothing."""
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "far.txt", "far away")
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "near")
    (corpus / "linked").symlink_to(elsewhere, target_is_directory=True)
    (corpus / "z-again").symlink_to(elsewhere, target_is_directory=True)
    (corpus / "loop").symlink_to(corpus, target_is_directory=True)
    prepare_dataset(corpus, tmp_path / "out", progress=False)
    check_prepared(tmp_path / "out", ["near", "far away"])
    files = PreparedDataset(tmp_path / "out").meta["source"]["files"]
    assert [f["path"] for f in files] == ["a.txt", "linked/far.txt"]


def test_json_list_streams_in_small_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BLOCK", 7)  # every record straddles several buffer refills
    records = [{"text": f"record {i} " + "x" * (i * 5), "n": [i, {"t": "]},"}]} for i in range(12)]
    path = write(tmp_path / "big.json", json.dumps(records, indent=2))
    assert list(Source(path).documents()) == [r["text"] for r in records]
    lines = ["[", '{"text": "ok"},', '{"text": "fine"},', '{"text": "also fine"},', '{"text": oops},', "]"]
    bad = write(tmp_path / "bad.json", "\n".join(lines))
    with pytest.raises(DataError, match=r"bad\.json:5: invalid JSON"):
        list(Source(bad).documents())


@pytest.mark.parametrize("name, content, options, message", [
    ("bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": }\n', {}, r"bad\.jsonl:3: invalid JSON"),
    ("obj.json", '{"text": "a"}', {}, r"obj\.json:1: invalid JSON \(expected '\[' to open a list"),
    ("open.json", '[{"text": "a"},\n{"text": "b"}', {}, r"open\.json:2: invalid JSON \(the list is not closed"),
    ("deep.jsonl", '{"text": "a"}\n' + '[' * 100_000, {}, r"deep\.jsonl:2: JSON nested too deeply to read; fix or "
                                                         r"remove that line"),
    ("deep.json", '[{"text": "a"},\n' + '[' * 100_000, {}, r"deep\.json:2: invalid JSON \(nested too deeply to read\)"),
    ("nofield.json", '[{"text": "a"},\n {"body": "b"}]', {}, r"nofield\.json:2: record has no 'text' field "
                                                              r"\(its fields: 'body'\); pass --text-field"),
    ("nulltext.jsonl", '{"text": null}', {}, r"nulltext\.jsonl:1: field 'text' is null, not a string"),
    ("listtext.json", '[{"text": ["a"]}]', {}, r"listtext\.json:1: field 'text' is an array, not a string"),
    ("numbers.jsonl", '7', {}, r"numbers\.jsonl:1: expected a JSON object with a 'text' field, found a number"),
    ("surrogate.jsonl", '{"text": "a\\ud800b"}', {}, r"lone surrogate"),
    ("nocol.csv", "a,b\n1,2\n", {}, r"nocol\.csv: no column 'text' in the header row \(columns: 'a', 'b'\)"),
    ("short.csv", "a,text\n1\n", {}, r"short\.csv:2: the row has 1 fields"),
    ("blankfirst.csv", "\ntext\na\n", {}, r"blankfirst\.csv: line 1 is blank where the header row \(the column "
                                        r"names\) should be; remove the blank line"),
    ("semicolons.csv", "text;id\na;1\n", {}, r"semicolons\.csv: the header row 'text;id' has no commas; a \.csv "
                                            r"file's columns are separated by ','"),
    ("unclosed.csv", 'text\na\n"b\nc\n', {}, r"unclosed\.csv:3: a quoted field that starts in this row is never "
                                             r"closed, so it would take in every line after it; fix the stray '\"'"),
    ("closed_later.csv", 'text\na\n"b\nc "d" e\n', {}, r"closed_later\.csv:4: malformed CSV \(',' expected after "
                                                      r"'\"'\) \(in the row that starts on line 3\)"),
    ("latin.txt", b"ok\ncaf\xe9\n", {}, r"latin\.txt: invalid UTF-8 byte b'\\xe9' at byte offset 6"),
    ("utf16.txt", "hi".encode("utf-16"), {}, r"utf16\.txt is not text: NUL byte at byte offset 3"),
    ("image.png", b"\x89PNG", {}, r"image\.png: unsupported file type '\.png'"),
])
def test_bad_records_name_file_line_and_fix(tmp_path, name, content, options, message):
    path = write(tmp_path / name, content)
    with pytest.raises(DataError, match=message):
        list(Source(path, **options).documents())


def test_unreadable_input_is_a_read_error_not_a_write_error(tmp_path, monkeypatch):
    """An input that cannot be read (here: permission denied, as for a non-root user, or deleted mid-run) is named
    as the input; an OSError left to escape would be reported as a failed write to --out, or as a traceback."""
    locked = write(tmp_path / "locked.txt", "alpha\n\nbeta\n")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sources, "open", denied, raising=False)
    with pytest.raises(DataError, match=r"locked\.txt: cannot be read \(Permission denied\)"):
        prepare_dataset(locked, tmp_path / "out", progress=False)
    monkeypatch.undo()
    gone = write(tmp_path / "gone.md", "text")
    source = Source(gone)
    gone.unlink()
    with pytest.raises(DataError, match=r"gone\.md: cannot be read \(No such file or directory\)"):
        list(source.documents())
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_can_be_replaced_and_counted(tmp_path):
    source = write(tmp_path / "latin.txt", b"caf\xe9 cr\xe8me \xef\xbf\xbd kept\n\nsecond\n")
    meta = prepare_dataset(source, tmp_path / "out", errors="replace", progress=False)
    check_prepared(tmp_path / "out", ["caf\ufffd cr\ufffdme \ufffd kept", "second"])
    assert meta["counts"]["replaced_sequences"] == 2  # the U+FFFD already in the file is not counted
    surrogate = write(tmp_path / "s.jsonl", '{"text": "a\\ud800b"}\n{"text": "c"}\n')
    prepare_dataset(surrogate, tmp_path / "out2", errors="replace", progress=False)
    check_prepared(tmp_path / "out2", ["a\ufffdb", "c"])


# -- splitting, atomic outputs, caching ---------------------------------------------------------------------------

def test_split_counts_seed_and_workers(tmp_path):
    documents = [f"document number {i} says {'la ' * i}".strip() for i in range(40)]
    source = write(tmp_path / "docs.txt", "\n\n".join(documents))
    for fraction, n_val in ((0.1, 4), (0.5, 20), (0.01, 1), (0.99, 39)):
        meta = prepare_dataset(source, tmp_path / "out", val_fraction=fraction, progress=False)
        assert (meta["counts"]["train_documents"], meta["counts"]["val_documents"]) == (40 - n_val, n_val)
    splits = {}
    for seed, workers in ((1, 1), (1, 2), (2, 2)):
        prepare_dataset(source, tmp_path / f"s{seed}w{workers}", seed=seed, workers=workers, progress=False)
        splits[seed, workers] = check_prepared(tmp_path / f"s{seed}w{workers}", documents)
        for split in ("train", "val"):
            splits[seed, workers, split] = (tmp_path / f"s{seed}w{workers}" / f"{split}.bin").read_bytes()
    assert splits[1, 1] == splits[1, 2] and splits[1, 1, "train"] == splits[1, 2, "train"]
    assert splits[1, 1] != splits[2, 2]  # another seed, other validation documents
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare_dataset(source, tmp_path / "x", val_fraction=1.0, progress=False)


def test_failed_run_leaves_previous_dataset_intact(tmp_path):
    out = tmp_path / "out"
    prepare_dataset(write(tmp_path / "good.txt", "alpha\n\nbeta\n\ngamma\n"), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n' * 1000 + "{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1001"):
        prepare_dataset(bad, out, progress=False)
    with pytest.raises(DataError, match="too small for block_size 8"):
        prepare_dataset(tmp_path / "good.txt", out, block_size=8, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.txt", "out"]  # no scratch left over


def test_ensure_prepared_caches_by_content_and_options(tmp_path):
    source = write(tmp_path / "corpus.txt", "\n\n".join(f"paragraph {i} " * 20 for i in range(30)))
    cache = tmp_path / "cache"
    first = ensure_prepared(source, cache, block_size=16, progress=False)
    assert first.parent == cache and PreparedDataset(first).meta["counts"]["documents"] == 30
    assert ensure_prepared(first, cache) == first  # a prepared folder is used as it is

    stamp = (first / "meta.json").stat().st_mtime_ns
    assert ensure_prepared(source, cache, progress=False) == first
    assert (first / "meta.json").stat().st_mtime_ns == stamp  # reused, not prepared again
    other = ensure_prepared(source, cache, seed=5, progress=False)
    write(source, source.read_text() + "\n\none more paragraph")
    changed = ensure_prepared(source, cache, progress=False)
    assert len({first, other, changed}) == 3
    assert PreparedDataset(changed).meta["counts"]["documents"] == 31
    with pytest.raises(DataError, match="too small for block_size 100000"):
        ensure_prepared(first, cache, block_size=100000)
    with pytest.raises(ConfigError, match="unknown data option"):
        ensure_prepared(source, cache, colour="blue")


def test_prepared_dataset_validates_its_folder(tmp_path):
    with pytest.raises(DataError, match=r"is not a prepared dataset: it has no meta\.json, .*INPUT --out \S+`$"):
        PreparedDataset(tmp_path)
    out = tmp_path / "out"
    prepare_dataset(write(tmp_path / "a.txt", "one two\n\nthree four\n"), out, progress=False)
    tokens = PreparedDataset(out).tokens("train")
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    with open(out / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match=r"incomplete or was modified; .* --overwrite`$"):  # what the command needs
        PreparedDataset(out)


def test_a_meta_json_of_format_and_counts_alone_is_read_by_every_reader(tmp_path, capsys):
    """Token files made elsewhere in the same layout (nanoGPT's) with a meta.json of format and counts alone: the
    dataset, train's block-size check and prepare's refusal to replace it all read it, where the last two raised
    KeyError for the parts prepare.py adds. A count that is not a number is refused by name."""
    out = tmp_path / "out"
    source = write(tmp_path / "a.txt", "one two\n\nthree four\n")
    meta = prepare_dataset(source, out, progress=False)
    (out / "meta.json").write_text(json.dumps({"format": meta["format"], "counts": {
        "train_tokens": meta["counts"]["train_tokens"], "val_tokens": meta["counts"]["val_tokens"]}}))
    data = PreparedDataset(out)
    assert sorted(split_documents(np.asarray(data.tokens("train"))) + split_documents(np.asarray(data.tokens("val")))) \
        == ["one two", "three four"]
    with pytest.raises(DataError) as error:
        ensure_prepared(out, tmp_path / "cache", block_size=100)
    assert str(error.value) == (f"{out} is too small for block_size 100: a split has only 3 tokens and training "
                                "needs at least 101 in each (train and val); add text or use a smaller block size")
    assert run_cli([source, "--out", out], capsys) == (
        2, f"error: --out {out} already holds a prepared dataset (6 tokens); pass --overwrite to replace it, or "
           "choose another --out\n")
    (out / "meta.json").write_text(json.dumps({"format": meta["format"], "counts": {"train_tokens": 3,
                                                                                  "val_tokens": "many"}}))
    with pytest.raises(DataError) as error:
        PreparedDataset(out)
    assert str(error.value) == (f"{out / 'meta.json'} has no counts.val_tokens (a number); prepare it with `python "
                                f"data/prepare.py INPUT --out {out} --overwrite`")


def test_a_split_of_no_tokens_reads_as_empty(tmp_path):
    """meta.json may count 0 tokens in a split of token files made elsewhere; numpy cannot memory-map the empty
    file (ValueError), so the split reads as an empty array, which the loaders refuse in one line."""
    write(tmp_path / "train.bin", np.arange(10, dtype=np.uint16).tobytes())
    write(tmp_path / "val.bin", b"")
    write(tmp_path / "meta.json", json.dumps({"format": "minigpt2-tokens/1",
                                              "counts": {"train_tokens": 10, "val_tokens": 0}}))
    val = PreparedDataset(tmp_path).tokens("val")
    assert val.dtype == np.uint16 and val.shape == (0,)
    with pytest.raises(DataError, match="the split has 0 tokens"):
        next(iter_eval_batches(val, 2, 4))


def test_file_names_that_are_not_utf8_and_files_that_are_not_regular(tmp_path, capsys):
    """A file name with a Latin-1 byte prepares (meta.json writes the byte as \\xNN, where encoding the name to
    hash it raised); a named pipe in a folder is refused in one line, where reading it blocked forever."""
    folder = tmp_path / "docs"
    write(folder / "a.txt", "alpha one")
    Path(os.fsdecode(bytes(folder) + b"/caf\xe9.txt")).write_text("beta two")
    prepare_dataset(folder, tmp_path / "out", progress=False)
    check_prepared(tmp_path / "out", ["alpha one", "beta two"])
    assert [f["path"] for f in PreparedDataset(tmp_path / "out").meta["source"]["files"]] == ["a.txt", "caf\\xe9.txt"]
    os.mkfifo(folder / "pipe.txt")
    assert run_cli([folder, "--out", tmp_path / "out2"], capsys) == (
        2, f"error: {folder / 'pipe.txt'} is not a regular file (a pipe, socket or device); move it out of the way, "
           "or save its text to a file and prepare that\n")
    assert not (tmp_path / "out2").exists()


# -- the loader -------------------------------------------------------------------------------------------------

POSITIONS = np.arange(1000, dtype=np.uint16)  # tokens[i] == i: a window's first token is where it starts


def batches(loader: BatchLoader, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(steps)]


def test_windows_are_slices_of_the_tokens(tmp_path):
    out = tmp_path / "out"
    prepare_dataset(write(tmp_path / "a.txt", "\n\n".join(f"text {i} " * 30 for i in range(20))), out,
                    progress=False)
    tokens = PreparedDataset(out).tokens("train")
    x, y = BatchLoader(tokens, 4, 32, seed=1).next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        starts = [s for s in range(len(tokens) - 32) if np.array_equal(tokens[s:s + 32], row_x.numpy())]
        assert any(np.array_equal(tokens[s + 1:s + 33], row_y.numpy()) for s in starts)
    for mode in ("random", "epoch"):
        x, y = BatchLoader(POSITIONS, 8, 16, mode=mode).next_batch()
        assert torch.equal(x, x[:, :1] + torch.arange(16)) and torch.equal(y, x + 1)
        assert int(x.min()) >= 0 and int(y.max()) <= 999


def test_epoch_mode_visits_every_window_once():
    loader = BatchLoader(POSITIONS, 4, 16, mode="epoch", seed=3)
    n_windows = 999 // 16  # 62: windows of 17 tokens starting at multiples of 16
    starts = torch.cat([x[:, 0] for x, _ in batches(loader, 16)]).tolist()  # 64 windows: one epoch and 2 more
    assert sorted(starts[:n_windows]) == [16 * i for i in range(n_windows)]
    assert (loader.epoch, loader.position) == (1, 2)
    assert starts[:n_windows] != sorted(starts[:n_windows])  # shuffled
    again = torch.cat([x[:, 0] for x, _ in batches(BatchLoader(POSITIONS, 4, 16, mode="epoch", seed=3), 16)])
    assert again.tolist() == starts


@pytest.mark.parametrize("mode", ["random", "epoch"])
def test_ranks_share_the_global_batch(mode):
    single = BatchLoader(POSITIONS, 4, 16, mode=mode, seed=9)
    ranks = [BatchLoader(POSITIONS, 2, 16, mode=mode, seed=9, rank=r, world_size=2) for r in range(2)]
    for _ in range(20):
        x, y = single.next_batch()
        parts = [rank.next_batch() for rank in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        if mode == "epoch":
            assert not set(parts[0][0][:, 0].tolist()) & set(parts[1][0][:, 0].tolist())
    resumed = BatchLoader(POSITIONS, 4, 16, mode=mode, seed=0)  # 2 ranks x 2 resume as 1 x 4
    resumed.load_state_dict(ranks[0].state_dict())
    assert torch.equal(resumed.next_batch()[0], single.next_batch()[0])


@pytest.mark.parametrize("mode", ["random", "epoch"])
def test_resume_is_bit_identical(mode):
    uninterrupted = batches(BatchLoader(POSITIONS, 3, 16, mode=mode, seed=7), 40)  # epoch mode: 2 epochs
    first = BatchLoader(POSITIONS, 3, 16, mode=mode, seed=7)
    batches(first, 19)
    state = json.loads(json.dumps(first.state_dict()))
    assert len(json.dumps(state)) < 300
    restored = BatchLoader(POSITIONS, 3, 16, mode=mode, seed=12345)
    restored.load_state_dict(state)
    for (x, y), (x2, y2) in zip(uninterrupted[19:], batches(restored, 21)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # A loader that has served batches of its own seed resumes exactly too (its cached window order was kept).
    used = BatchLoader(POSITIONS, 3, 16, mode=mode, seed=12345)
    batches(used, 19)
    used.load_state_dict(state)
    for (x, y), (x2, y2) in zip(uninterrupted[19:], batches(used, 21)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ConfigError, match="block_size"):
        BatchLoader(POSITIONS, 3, 8, mode=mode).load_state_dict(state)


def test_eval_batches_and_loader_errors():
    full = list(iter_eval_batches(POSITIONS, 5, 16))
    assert [len(x) for x, _ in full] == [5] * 12 + [2]
    assert torch.cat([x[:, 0] for x, _ in full]).tolist() == [16 * i for i in range(62)]
    capped = list(iter_eval_batches(POSITIONS, 5, 16, max_batches=2))
    assert torch.cat([x[:, 0] for x, _ in capped]).tolist() == [16 * (i * 62 // 10) for i in range(10)]
    assert all(torch.equal(y, x + 1) for x, y in capped)
    with pytest.raises(DataError, match="fewer than block_size"):
        BatchLoader(POSITIONS[:16], 1, 16)
    with pytest.raises(ConfigError, match="rank"):
        BatchLoader(POSITIONS, 1, 16, rank=2, world_size=2)


# -- the pydocs corpus ------------------------------------------------------------------------------------------

MODULE = '''"""Module doc."""



def public(a, b=1):
    """Add things."""
    return a + b


def undocumented():
    return 1


def _private():
    """Private helper."""


class Thing(Base):
    """A thing."""

    @property
    def size(self):
        """The size."""
        return 3

    def plain(self):
        pass
'''


def test_pydocs_documents_and_module_selection(tmp_path):
    header = "# module: pkg.mod\n"
    assert list(module_documents("pkg.mod", MODULE)) == [
        header + '"""Module doc."""',
        header + 'def public(a, b=1):\n    """Add things."""\n    return a + b',
        header + 'def _private():\n    """Private helper."""',
        header + 'class Thing(Base):\n    """A thing."""',
        header + 'class Thing(Base):\n    @property\n    def size(self):\n        """The size."""\n        return 3',
    ]
    for name in ["a.py", "_b.py", "test_c.py", "pkg/__init__.py", "pkg/d.py", "test/e.py", "site-packages/f.py",
                 "_priv/g.py", "turtledemo/h.py", "x.txt"]:
        write(tmp_path / name, "")
    assert [m for m, _ in stdlib_modules(tmp_path)] == ["a", "pkg", "pkg.d"]


def test_pydocs_corpus_builds_from_the_running_python(tmp_path):
    started = time.perf_counter()
    out = build_pydocs(tmp_path / "pydocs", progress=False)
    assert time.perf_counter() - started < 60
    meta = PreparedDataset(out).meta
    assert 1_500_000 < meta["counts"]["tokens"] < 10_000_000
    texts = [json.loads(line)["text"] for line in (out / "pydocs.jsonl").read_text().splitlines()]
    assert any(t.startswith("# module: textwrap\n") for t in texts)
    assert not any(t.startswith(("# module: test.", "# module: _")) for t in texts)
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert default_corpus(out) == out and (out / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_a_failed_corpus_build_leaves_no_folder_behind(tmp_path, monkeypatch):
    """pydocs.jsonl is written before it is prepared: a preparation that then fails (a split too small for
    --block_size) removed neither it nor the folder made for it. One already there stays."""
    from minigpt2 import pydocs

    monkeypatch.setattr(pydocs, "stdlib_modules", lambda: [("mod", write(tmp_path / "mod.py", '"""A module."""\n'))])
    monkeypatch.setattr(pydocs, "pydoc_topics", lambda: iter(["# pydoc topic: one\ntext", "# pydoc topic: two\nmore"]))
    with pytest.raises(DataError, match="too small for block_size"):
        build_pydocs(tmp_path / "new" / "pydocs", block_size=1000, progress=False)
    assert not (tmp_path / "new").exists()
    kept = write(tmp_path / "old" / "pydocs.jsonl", '{"text": "an earlier build"}\n')
    with pytest.raises(DataError, match="too small for block_size"):
        build_pydocs(tmp_path / "old", block_size=1000, progress=False)
    assert kept.exists()


def test_an_interrupted_corpus_write_leaves_no_file_behind(tmp_path, monkeypatch):
    """The corpus file, like every file minigpt2 writes, appears whole or not at all (atomic.write_atomically)."""
    from minigpt2 import pydocs

    def broken_topics():
        yield "# pydoc topic: one\ntext"
        raise KeyboardInterrupt

    monkeypatch.setattr(pydocs, "pydoc_topics", broken_topics)
    target = tmp_path / "pydocs.jsonl"
    target.write_text("the previous corpus\n")
    with pytest.raises(KeyboardInterrupt):
        pydocs.write_documents(target, progress=False)
    assert target.read_text() == "the previous corpus\n" and sorted(tmp_path.iterdir()) == [target]


# -- the command line -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Run every bad-input case through `python data/prepare.py` at once (they are independent processes).

    Each case replaces (--overwrite) its own copy of a prepared dataset, to check that a failure leaves it as it was.
    """
    tmp = tmp_path_factory.mktemp("cli")
    good = write(tmp / "good.txt", "\n\n".join(f"good paragraph {i}" for i in range(20)))
    prepare_dataset(good, tmp / "baseline", progress=False)
    inputs = {
        "missing path": (tmp / "nope.txt", []),
        "empty file": (write(tmp / "empty.txt", b""), []),
        "empty folder": (write(tmp / "folder" / "script.py", "x = 1").parent, []),
        "smaller than one block": (write(tmp / "small.txt", "a b c\n\nd e f\n"), ["--block-size", "256"]),
        "binary file": (write(tmp / "blob.txt", bytes(range(256)) * 4), []),
        "invalid JSON": (write(tmp / "bad.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n'), []),
        "record without field": (write(tmp / "nofield.jsonl", '{"body": "a"}\n'), []),
        "CSV without column": (write(tmp / "nocol.csv", "title,body\nx,y\n"), []),
        "invalid UTF-8": (write(tmp / "latin.txt", b"na\xefve\n"), []),
        "unwritable output": (good, ["--out", str(good / "sub")]),
        "dangling link in folder": (write(tmp / "linked" / "a.txt", "fine").parent, []),
    }
    (tmp / "linked" / "gone.txt").symlink_to(tmp / "deleted.txt")
    processes = {}
    for case, (source, extra) in inputs.items():
        out = tmp / f"out-{len(processes)}"
        shutil.copytree(tmp / "baseline", out)
        command = [sys.executable, str(ROOT / "data" / "prepare.py"), str(source), "--out", str(out), "--overwrite",
                   *extra]
        processes[case] = (out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                 cwd=tmp))
    ok_out = tmp / "ok"
    processes["ok"] = (ok_out, subprocess.Popen([sys.executable, "-m", "minigpt2.prepare", str(good), "--out",
                                                 str(ok_out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                text=True, cwd=ROOT))
    results = {}
    for case, (out, process) in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        results[case] = (process.returncode, stdout, stderr, out)
    baseline = {p.name: p.read_bytes() for p in (tmp / "baseline").iterdir()}
    return results, baseline, tmp


@pytest.mark.parametrize("case, expected", [
    ("missing path", ["nope.txt does not exist", "pass a .txt"]),
    ("empty file", ["empty.txt is empty", "add text"]),
    ("empty folder", ["folder contains no .txt or .md files", "add some"]),
    ("smaller than one block", ["small.txt is too small for block_size 256", "smaller block size"]),
    ("binary file", ["blob.txt is not text: NUL byte at byte offset 0", "convert it to UTF-8"]),
    ("invalid JSON", ["bad.jsonl:3: invalid JSON", "fix or remove that line"]),
    ("record without field", ["nofield.jsonl:1: record has no 'text' field", "--text-field NAME"]),
    ("CSV without column", ["nocol.csv: no column 'text'", "--csv-column NAME"]),
    ("invalid UTF-8", ["latin.txt: invalid UTF-8 byte b'\\xef' at byte offset 2", "--errors replace"]),
    ("unwritable output", ["good.txt is a file, not a folder", "choose another --out"]),
    ("dangling link in folder", ["gone.txt: cannot be read (No such file or directory)", "remove it from the input"]),
])
def test_cli_bad_input_is_one_line_exit_2(cli_runs, case, expected):
    results, baseline, tmp = cli_runs
    code, stdout, stderr, out = results[case]
    assert code == 2, stderr
    assert "Traceback" not in stderr and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for part in expected:
        assert part in lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == baseline
    assert not [p for p in tmp.iterdir() if p.name.startswith(".tmp-")]


def test_cli_prepares_and_summarises(cli_runs):
    code, _, stderr, out = cli_runs[0]["ok"]
    assert code == 0, stderr
    assert "20 read" in stderr and "0 padding" in stderr
    check_prepared(out, [f"good paragraph {i}" for i in range(20)])


def test_cli_in_process_usage_errors(tmp_path, capsys):
    single = write(tmp_path / "one.txt", "just one paragraph\nover two lines\n")
    two = [str(write(tmp_path / "two.txt", "first\n\nsecond\n")), "--out", str(tmp_path / "o")]
    record = write(tmp_path / "one.jsonl", '{"text": "the only record"}\n')
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for argv, message in [([str(single), "--out", str(tmp_path / "o")], "after the split; separate documents with "
                                                                         "blank lines (or --separator)"),
                          ([str(record), "--out", str(tmp_path / "o" / "deeper")], "after the split; add more documents "
                                                                                   "(a folder's files, a .json/.jsonl "
                                                                                   "file's records"),
                          ([str(single)], "--out DIR is required"),
                          (two + ["--val-fraction", "0"], "error: --val_fraction must be between 0 and 1"),
                          (two + ["--seed", "-1"], "error: --seed must be a non-negative integer"),  # numpy's ValueError
                          (two + ["--workers", "-1"], "error: --workers must be at least 1"),  # ThreadPoolExecutor's
                          (two + ["--block_size", "0"], "error: --block_size must be at least 1"),
                          ([*two[:2], str(tmp_path / "dangling")], f"error: output {tmp_path / 'dangling'} is a "
                                                                     f"link to {tmp_path / 'nowhere'}, which does not "
                                                                     "exist; create that folder, or choose another "
                                                                     "--out"),
                          (two + ["--separator", "---"], "error: argument --separator: expected one argument (a value "
                                                         "that starts with '-' goes as --separator=VALUE)"),
                          (["--out", str(single)], "cannot create output folder"),  # the pydocs corpus
                          ([str(single), "--out", ""], "argument --out: is empty; give a path"),  # an unset $OUT
                          (["", "--out", str(tmp_path / "o")], "argument INPUT: is empty; give a path")]:
        with pytest.raises(SystemExit) as exit_info:
            run_main(main, argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (by relative path) with its bytes: equal snapshots mean nothing was touched."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the prepare command in this process: its exit status and what it printed to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def test_cli_refuses_a_csv_whose_stray_quote_would_merge_rows(tmp_path, capsys):
    """A '"' opening data row 11 of 100 and never closed would make rows 11-100 one document; the command names
    the line where the quote opens (the header is line 1) and writes nothing."""
    rows = [f"row number {i}" for i in range(1, 101)]
    rows[10] = '"' + rows[10]
    table = write(tmp_path / "t.csv", "text\n" + "\n".join(rows) + "\n")
    code, err = run_cli([table, "--out", tmp_path / "out", "--quiet"], capsys)
    assert (code, err) == (2, f"error: {table}:12: a quoted field that starts in this row is never closed, so it "
                              "would take in every line after it; fix the stray '\"', or write a quote inside a "
                              "quoted field as '\"\"'\n")
    assert not (tmp_path / "out").exists()


def test_cli_names_a_path_the_system_refuses(tmp_path, capsys):
    """A path component over 255 bytes makes the first check that touches it raise OSError (as a folder the user
    cannot enter does); INPUT and --out are each named in one line, not in a traceback."""
    source = write(tmp_path / "a.txt", "alpha\n\nbeta\n")
    long = tmp_path / ("x" * 300)
    for argv, named in [([long / "in.txt", "--out", tmp_path / "out"], long / "in.txt"),
                        ([source, "--out", long / "out"], long / "out")]:
        assert run_cli(argv, capsys) == (2, f"error: {named}: File name too long; check the path and its "
                                            "permissions\n")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_replace_a_prepared_dataset(tmp_path, capsys):
    """Without --overwrite, an --out holding a prepared dataset (or any file of one) is refused before any work."""
    source = write(tmp_path / "a.txt", "alpha\n\nbeta\n\ngamma\n")
    out = tmp_path / "out"
    tokens = prepare_dataset(source, out, progress=False)["counts"]["tokens"]
    write(out / "notes.md", "the user's own file")
    before = snapshot(tmp_path)
    refusal = (f"error: --out {out} already holds a prepared dataset (from {source.resolve()}, {tokens:,} tokens); "
               "pass --overwrite to replace it, or choose another --out\n")
    assert run_cli([source, "--out", out], capsys) == (2, refusal)
    assert run_cli(["--out", out], capsys) == (2, refusal)  # the pydocs corpus would replace it too
    assert snapshot(tmp_path) == before

    (out / "meta.json").unlink()  # what is left may be the user's own files of those names: refused as well
    before = snapshot(tmp_path)
    assert run_cli([source, "--out", out, "--quiet"], capsys) == (
        2, f"error: --out {out} already holds train.bin, val.bin (an incomplete prepared dataset, or files of the "
           "same names); pass --overwrite to replace them, or choose another --out\n")
    assert snapshot(tmp_path) == before


def test_cli_without_input_leaves_a_built_corpus_and_refuses_reading_options(tmp_path, capsys):
    """`prepare` without INPUT over a corpus it built there before says so and does nothing (the same Python would
    build the same bytes); options for reading an INPUT are refused there, as they would be ignored."""
    out = tmp_path / "pydocs"
    write(out / "pydocs.jsonl", '{"text": "def f():\\n    return 1"}\n{"text": "class A:\\n    pass"}\n')
    tokens = prepare_dataset(out / "pydocs.jsonl", out, strip_html=False, progress=False)["counts"]["tokens"]
    before = snapshot(tmp_path)
    assert run_cli(["--out", out], capsys) == (
        0, f"the bundled corpus is already built in {out} ({tokens:,} tokens); pass --overwrite to build it again\n")
    assert run_cli(["--out", out, "--separator", "|"], capsys) == (
        2, "error: --separator applies to an INPUT file; without INPUT the bundled corpus is built, which reads none: "
           "leave it out\n")
    assert snapshot(tmp_path) == before


def test_cli_without_input_builds_the_corpus_with_the_options_given(tmp_path, capsys):
    """The split and cleaning flags reach the bundled corpus's preparation (they used to be ignored without INPUT);
    a corpus built with other options than those asked is refused without --overwrite, not reported as built."""
    out, same = tmp_path / "pydocs", tmp_path / "same"
    flags = ["--val_fraction", "0.2", "--seed", "7", "--dedup", "false"]
    assert run_cli(["--out", out, *flags, "--quiet"], capsys) == (0, "")
    built = PreparedDataset(out).meta["options"]
    assert (built["val_fraction"], built["seed"], built["dedup"], built["strip_html"]) == (0.2, 7, False, False)
    # The same documents prepared by the library with those options: the same token files.
    prepare_dataset(out / "pydocs.jsonl", same, val_fraction=0.2, seed=7, dedup=False, strip_html=False,
                    progress=False)
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (same / name).read_bytes()

    before = snapshot(out)
    assert run_cli(["--out", out, "--seed", "7"], capsys) == (
        2, f"error: --out {out} holds the bundled corpus built with --val_fraction 0.2 --dedup false, not "
           "--val_fraction 0.1 --dedup true; pass --overwrite to build it again with --val_fraction 0.1 --dedup "
           "true\n")
    code, err = run_cli(["--out", out, *flags, "--block_size", "100000000"], capsys)
    assert code == 2 and "too small for block_size 100000000" in err
    tokens = PreparedDataset(out).meta["counts"]["tokens"]
    assert run_cli(["--out", out, "--dedup", "false", "--val-fraction", "0.2", "--seed", "7"], capsys) == (
        0, f"the bundled corpus is already built in {out} ({tokens:,} tokens); pass --overwrite to build it again\n")
    assert snapshot(out) == before


@pytest.mark.parametrize(("flags", "message"), [
    (["--val_fraction", "0"], "--val_fraction must be between 0 and 1 (exclusive), got 0.0"),
    (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (["--block_size", "0"], "--block_size must be at least 1, got 0"),
    (["--workers", "0"], "--workers must be at least 1 (or left unset for all cores), got 0"),
])
def test_cli_without_input_refuses_a_setting_no_corpus_takes_before_any_work(tmp_path, capsys, monkeypatch, flags,
                                                                             message):
    """A value that cannot be valid is named as it is for an INPUT: over a corpus already built it was taken for
    another build (advised to --overwrite, or reported as built), and with --overwrite, or into a new folder, the
    standard library was read and pydocs.jsonl written before prepare_dataset refused it."""
    out = tmp_path / "pydocs"
    write(out / "pydocs.jsonl", '{"text": "def f():\\n    return 1"}\n{"text": "class A:\\n    pass"}\n')
    prepare_dataset(out / "pydocs.jsonl", out, strip_html=False, progress=False)
    before = snapshot(tmp_path)
    monkeypatch.setattr("minigpt2.pydocs.stdlib_modules", lambda: pytest.fail("the standard library was read"))
    for extra in ([], ["--overwrite"]):
        assert run_cli(["--out", out, *flags, *extra], capsys) == (2, f"error: {message}\n")
    assert run_cli(["--out", tmp_path / "new", *flags], capsys) == (2, f"error: {message}\n")
    assert snapshot(tmp_path) == before and not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match=message.split(" ")[0]):
        build_pydocs(tmp_path / "new", **{flags[0].removeprefix("--"): int(flags[1])}, progress=False)
    assert not (tmp_path / "new").exists()


def test_cli_overwrite_replaces_the_dataset_and_keeps_other_files(tmp_path, capsys):
    """A folder of the user's files gets the dataset beside them; --overwrite replaces only the dataset's files."""
    out = tmp_path / "out"
    write(out / "notes.md", "the user's own file")
    first = write(tmp_path / "first.txt", "one\n\ntwo\n\nthree\n")
    assert run_cli([first, "--out", out, "--quiet"], capsys) == (0, "")
    check_prepared(out, ["one", "two", "three"])
    second = write(tmp_path / "second.txt", "four\n\nfive\n")
    assert run_cli([second, "--out", out, "--overwrite", "--quiet"], capsys) == (0, "")
    check_prepared(out, ["four", "five"])
    assert (out / "notes.md").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.txt", "out", "second.txt"]  # no scratch left over


def test_replacing_a_dataset_never_leaves_a_mix_that_passes_as_one(tmp_path, monkeypatch):
    """Replacing a dataset renames three files into place. New .bin files of the old ones' sizes pass every check
    of a meta.json, so at each rename the folder must be the old dataset, the new one, or refused (no meta.json);
    an exception between the renames (Ctrl-C) must put the old dataset back."""
    old = [f"cat number {n}" for n in ("one", "two", "three", "four", "five", "six", "seven", "eight")]
    new = [document.replace("cat", "dog") for document in old]
    out = tmp_path / "out"
    prepare_dataset(write(tmp_path / "old.txt", "\n\n".join(old) + "\n"), out, progress=False)
    before = snapshot(out)
    new_source = write(tmp_path / "new.txt", "\n\n".join(new) + "\n")

    def documents() -> list[str] | str:
        try:
            data = PreparedDataset(out)
        except DataError:
            return "refused"
        return sorted(split_documents(np.asarray(data.tokens("train"))) + split_documents(np.asarray(data.tokens("val"))))

    real_replace = os.replace
    seen: list[list[str] | str] = []
    interrupt_at = [0]  # the rename to interrupt (1 = the first); 0: none

    def replace(source, target):
        if out in (Path(source).parent, Path(target).parent):  # the commit's renames, into and out of --out
            seen.append(documents())
            if len(seen) == interrupt_at[0]:
                raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    prepare_dataset(new_source, out, progress=False)
    check_prepared(out, new)
    assert {name: len(data) for name, data in snapshot(out).items() if name.endswith(".bin")} == \
        {name: len(data) for name, data in before.items() if name.endswith(".bin")}  # the case no check catches
    assert seen[0] == sorted(old) and set(map(str, seen[1:])) == {"refused"}, seen
    for rename in range(1, len(seen) + 1):
        interrupt_at[0] = 0
        shutil.rmtree(out)
        prepare_dataset(tmp_path / "old.txt", out, progress=False)
        seen.clear()
        interrupt_at[0] = rename
        with pytest.raises(KeyboardInterrupt):
            prepare_dataset(new_source, out, progress=False)
        assert snapshot(out) == before, rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.txt", "old.txt", "out"]  # no scratch left over


@pytest.mark.parametrize("input_name, flags, message", [
    ("a.txt", ["--text_field", "body"], "--text_field applies to .jsonl/.json input only, and {input} is a .txt file"),
    ("a.txt", ["--text-field", "text"], "--text_field applies to .jsonl/.json input only, and {input} is a .txt file"),
    ("a.csv", ["--text_field", "body"], "--text_field applies to .jsonl/.json input only, and {input} is a .csv file"),
    ("a.jsonl", ["--separator", "|"], "--separator applies to .txt input only, and {input} is a .jsonl file"),
    ("docs", ["--separator", "|"], "--separator applies to .txt input only, and {input} is a folder (each of its "
                                   "files is one document)"),
    ("a.json", ["--csv-column", "body"], "--csv_column applies to .csv input only, and {input} is a .json file"),
], ids=["text_field-txt", "text_field-default-txt", "text_field-csv", "separator-jsonl", "separator-folder",
        "csv_column-json"])
def test_cli_refuses_a_reading_option_the_input_does_not_read(tmp_path, capsys, input_name, flags, message):
    """A flag that the input's kind does not read (even given its default value) would be silently ignored: it is
    a one-line error instead, checked before the output folder."""
    inputs = {"a.txt": "one\n\ntwo\n", "a.csv": "text\none\ntwo\n", "a.jsonl": '{"text": "one"}\n{"text": "two"}\n',
              "a.json": '[{"text": "one"}, {"text": "two"}]', "docs/a.md": "one", "docs/b.md": "two"}
    for name, content in inputs.items():
        write(tmp_path / name, content)
    prepare_dataset(tmp_path / "a.txt", tmp_path / "out", progress=False)
    before = snapshot(tmp_path)
    code, err = run_cli([tmp_path / input_name, "--out", tmp_path / "out", "--quiet", *flags], capsys)
    assert (code, err) == (2, f"error: {message.format(input=tmp_path / input_name)}; leave it out\n")
    assert snapshot(tmp_path) == before


def test_cli_reading_options_apply_to_their_input(tmp_path, capsys):
    """Each reading flag still works on the input it is for, and one left unset takes prepare_dataset's default."""
    records = write(tmp_path / "r.jsonl", '{"body": "first"}\n{"body": "second"}\n')
    assert run_cli([records, "--out", tmp_path / "j", "--text-field", "body", "--quiet"], capsys) == (0, "")
    check_prepared(tmp_path / "j", ["first", "second"])
    table = write(tmp_path / "t.csv", "body\nfirst\nsecond\n")
    assert run_cli([table, "--out", tmp_path / "c", "--csv_column", "body", "--quiet"], capsys) == (0, "")
    check_prepared(tmp_path / "c", ["first", "second"])
    text = write(tmp_path / "s.txt", "first|second\n")
    assert run_cli([text, "--out", tmp_path / "s", "--separator", "|", "--quiet"], capsys) == (0, "")
    check_prepared(tmp_path / "s", ["first", "second"])
    assert PreparedDataset(tmp_path / "s").meta["options"]["text_field"] == "text"  # prepare_dataset's default


def test_programmatic_preparation_still_replaces_without_asking(tmp_path):
    """The refusal is the command's: train.py's automatic preparation rebuilds a stale cache, and prepare_dataset
    (which build_pydocs calls) replaces an earlier dataset, as before."""
    paragraphs = [" ".join([f"paragraph {i}"] * 10) for i in range(20)]
    source = write(tmp_path / "corpus.txt", "\n\n".join(paragraphs))
    cache = tmp_path / ".prepared"  # where train.py puts the preparation of --data FILE
    first = ensure_prepared(source, cache, block_size=8, progress=False)
    with open(first / "train.bin", "ab") as f:  # a damaged (or half-copied) cache
        f.write(b"\0\0")
    assert ensure_prepared(source, cache, block_size=8, progress=False) == first
    check_prepared(first, paragraphs)
    prepare_dataset(write(tmp_path / "other.txt", "new\n\ndata\n"), first, progress=False)
    check_prepared(first, ["new", "data"])


def test_sigterm_while_preparing_exits_cleanly_and_leaves_nothing(tmp_path):
    """As Ctrl-C does: the staging folder (a copy of every token so far) is removed, the exit status is 143."""
    rng = np.random.default_rng(0)
    words = np.array(["token", "window", "packed", "corpus", "batch", "layer", "head", "cache"])
    text = "\n\n".join(" ".join(rng.choice(words, 60)) for _ in range(60_000))  # ~25 MB: seconds to tokenise
    big = write(tmp_path / "big.txt", text)
    process = subprocess.Popen([sys.executable, "-m", "minigpt2.prepare", str(big), "--out", str(tmp_path / "o"),
                                "--workers", "1"], stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".tmp-o-*/all.bin")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "preparing ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert (process.returncode, stderr) == (143, "terminated\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


def test_the_next_preparation_deletes_what_a_killed_one_left(tmp_path):
    """SIGKILL leaves the scratch folder (a copy of every token so far: as large as the corpus); it stayed for good.
    The next preparation of the same --out deletes it, and keeps the scratch folder of a preparation still running."""
    text = "\n\n".join(f"paragraph {i} " + "word " * 50 for i in range(40_000))  # seconds to tokenise
    big = write(tmp_path / "big.txt", text)
    running = staging_path(tmp_path, "o")  # one of this process, which runs
    running.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "minigpt2.prepare", str(big), "--out", str(tmp_path / "o"),
                                "--workers", "1"], stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(f".tmp-o-*-{process.pid}-*/all.bin")) and process.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "preparing ended before it could be killed"
    process.kill()
    process.wait(timeout=60)
    [left] = tmp_path.glob(f".tmp-o-*-{process.pid}-*")
    prepare_dataset(write(tmp_path / "small.txt", "one\n\ntwo\n\nthree"), tmp_path / "o", progress=False)
    assert not left.exists() and running.is_dir()
    check_prepared(tmp_path / "o", ["one", "two", "three"])


def test_preparing_data_does_not_import_torch():
    """Preparing a corpus needs numpy and tiktoken only; torch's import alone takes seconds on a cold start."""
    code = "import sys, minigpt2.prepare; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
