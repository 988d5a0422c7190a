"""Preparing a dataset: text in, packed token files out.

    source -> documents -> clean -> drop empty and duplicate -> tokenise -> <|endoftext|> doc <|endoftext|> doc ...
           -> split by document -> train.bin, val.bin (uint16) + meta.json

Why pack: the classic recipe pads every line of `data.txt` to 512 tokens, so a 20-token line costs 512 tokens of
disk and compute, 96% of it padding. Here documents are written end to end, each preceded by `<|endoftext|>`; there
is no padding at all, and training reads windows of any length from anywhere in the stream (see `dataset.py`).

How it streams. Documents are read one at a time (`sources.py`), cleaned (`cleaning.py`) and gathered into batches
of about 1 MiB of text. While the main thread cleans batch k + 1, a background thread tokenises batch k with
tiktoken, which releases the GIL and spreads a batch over `workers` threads, so every core has work. Token ids go
straight to a scratch file; only per-document lengths (8 bytes each) and dedup fingerprints stay in memory.

How it splits. Once the number of documents N is known, max(1, round(N * val_fraction)) of them (never all) are
drawn for validation with `seed`, and the scratch file is copied, in chunks, into train.bin and val.bin in the
original order. Splitting by document keeps any one document out of both splits.

How it fails. Everything is written to a scratch folder beside the output and moved into place with atomic renames
(meta.json last) only when the whole run succeeded. A failed or interrupted run removes its scratch folder and leaves
an earlier prepared dataset in the output folder untouched. A run killed outright (SIGKILL, out of memory) cannot
clean up: the next preparation of the same output folder deletes the scratch folders of processes that no longer run.
"""

from __future__ import annotations

import errno
import hashlib
import dataclasses
import inspect
import json
import os
import re
import shutil
import sys
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from .atomic import removed_if_failed, staging_path
from .cleaning import Cleaner, CleaningOptions, Deduplicator
from .cli import add_dataclass_flags, add_flag, make_parser, parse_path, run_main
from .dataset import FORMAT, PREPARED_FILES, TOKEN_DTYPE, PreparedDataset, is_prepared
from .errors import ConfigError, DataError, OutputFolderError, PrepareOptionError
from .sources import ERROR_MODES, Source
from .tokenizer import RANKS_SHA256, Tokenizer

OUTPUT_FILES = ("train.bin", "val.bin", "meta.json")  # moved into place in this order: meta.json last
# The reading options that only some inputs read (by file suffix; a folder's files are read whole, so none).
SPLIT_OPTIONS = ("val_fraction", "seed", "errors")  # prepare_dataset's options besides reading and cleaning
INPUT_OPTIONS = {"text_field": (".jsonl", ".json"), "csv_column": (".csv",), "separator": (".txt",)}
BATCH_CHARS = 1 << 20  # text per tokenisation batch: big enough to amortise thread hand-offs, small in memory
SPLIT_CHUNK = 1 << 24  # tokens copied per step when splitting the scratch file
MAX_LISTED_FILES = 1000  # meta.json lists source files one by one up to this many (always hashes all of them)
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def prepare_dataset(source: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, text_field: str = "text",
                    csv_column: str = "text", separator: str | None = None, val_fraction: float = 0.1,
                    seed: int = 1337, errors: str = "strict", strip_html: bool = True,
                    normalize_unicode: bool = True, drop_control: bool = True, strip_emoji: bool = False,
                    normalize_whitespace: bool = True, dedup: bool = True, block_size: int | None = None,
                    workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Read, clean, tokenise and pack `source` into `out_dir`/{train.bin, val.bin, meta.json}; return the meta.

    source: a .txt/.md/.json/.jsonl/.csv file or a folder of .txt/.md files (see `sources.py`).
    text_field / csv_column: where the text is in JSON records / CSV rows. separator: splits a .txt file into
    documents (default: blank lines). errors: "strict" (invalid UTF-8 is an error) or "replace" (U+FFFD).
    strip_html ... dedup: the cleaning steps (see `cleaning.py`). val_fraction, seed: the document split.
    block_size: if given, each split must hold at least block_size + 1 tokens (one training window), else DataError.
    workers: tokeniser threads (default: all cores). progress: show a progress bar and print a summary to stderr.
    """
    check_settings(val_fraction=val_fraction, seed=seed, block_size=block_size, workers=workers)
    workers = workers or os.cpu_count() or 1
    options = CleaningOptions(strip_html=strip_html, normalize_unicode=normalize_unicode, drop_control=drop_control,
                              strip_emoji=strip_emoji, normalize_whitespace=normalize_whitespace, dedup=dedup)
    reader = Source(source, text_field=text_field, csv_column=csv_column, separator=separator, errors=errors)
    out = Path(out_dir)
    started = time.perf_counter()
    with removed_if_failed(out), _Staging(out) as scratch:
        packer = _Packer(reader, options, workers)
        packer.run(scratch / "all.bin", progress)
        lengths = np.frombuffer(packer.lengths, dtype=np.int64)
        is_val = _choose_val(len(lengths), val_fraction, seed, reader)
        train_tokens, val_tokens = _split(scratch / "all.bin", lengths, is_val, scratch)
        if block_size is not None:
            _check_block_size(min(train_tokens, val_tokens), block_size, reader.path, val_fraction)
        meta = {
            "format": FORMAT,
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "layout": "each document is preceded by <|endoftext|>; documents are packed end to end, no padding",
            "tokenizer": {"name": "gpt2", "ranks_sha256": RANKS_SHA256, "vocab_size": Tokenizer().vocab_size,
                          "eot_token": Tokenizer.eot_token},
            "source": _describe_source(reader),
            "options": {"text_field": text_field, "csv_column": csv_column, "separator": separator,
                        "val_fraction": val_fraction, "seed": seed, "errors": errors, **options.to_dict()},
            "counts": {**packer.counts, "train_documents": int(len(lengths) - is_val.sum()),
                       "val_documents": int(is_val.sum()), "train_tokens": train_tokens, "val_tokens": val_tokens,
                       "padding_tokens": 0},
            "cleaning": packer.cleaner.stats.to_dict(),
        }
        (scratch / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _commit(scratch, out)
    if progress:
        print(format_summary(meta, out, time.perf_counter() - started), file=sys.stderr)
    return meta


def check_settings(*, val_fraction: float | None = None, seed: int | None = None, block_size: int | None = None,
                   workers: int | None = None) -> None:
    """ConfigError for a split or run setting that no input makes valid (None: not given, so its default).

    Checked before any work: numpy takes only non-negative seeds, and tiktoken needs a thread.
    """
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ConfigError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if block_size is not None and block_size < 1:
        raise ConfigError(f"--block_size must be at least 1, got {block_size}")
    if seed is not None and seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1 (or left unset for all cores), got {workers}")


class _Packer:
    """Streams documents through cleaning, dedup and tokenisation into one scratch token file."""

    def __init__(self, reader: Source, options: CleaningOptions, workers: int) -> None:
        self.reader = reader
        self.cleaner = Cleaner(options)
        self.dedup = Deduplicator() if options.dedup else None
        self.workers = workers
        self.tokenizer = Tokenizer()
        self.lengths = array("q")  # tokens per document, <|endoftext|> included
        self.counts = {"documents_read": 0, "documents_empty": 0, "duplicates_removed": 0, "documents": 0,
                       "tokens": 0, "text_bytes_read": 0, "text_bytes_kept": 0, "bytes_removed_cleaning": 0,
                       "bytes_removed_duplicates": 0, "replaced_sequences": 0}

    def run(self, path: Path, progress: bool) -> None:
        # disable=None: no bar when stderr is not a terminal (logs, CI); leave=False: the summary replaces it.
        bar = tqdm(total=self.reader.total_bytes, unit="B", unit_scale=True, desc="preparing", file=sys.stderr,
                   disable=None if progress else True, leave=False)
        with open(path, "wb") as out, ThreadPoolExecutor(max_workers=1) as background, bar:
            pending: Future[list[list[int]]] | None = None
            for batch in _batches(self.reader.documents()):
                texts = self._clean(batch)
                # Tokenise this batch in the background while the loop reads and cleans the next one.
                job = background.submit(self.tokenizer.encode_batch, texts, num_threads=self.workers)
                if pending is not None:
                    self._write(pending.result(), out)
                pending = job
                bar.update(self.reader.bytes_read - bar.n)
                bar.set_postfix(docs=self.counts["documents"], tokens=self.counts["tokens"], refresh=False)
            if pending is not None:
                self._write(pending.result(), out)
        counts = self.counts
        counts["bytes_removed_duplicates"] = self.dedup.bytes_removed if self.dedup else 0
        counts["duplicates_removed"] = self.dedup.duplicates if self.dedup else 0
        counts["bytes_removed_cleaning"] = (counts["text_bytes_read"] - counts["text_bytes_kept"]
                                            - counts["bytes_removed_duplicates"])
        counts["replaced_sequences"] = sum(f.replaced for f in self.reader.files)
        if counts["documents"] == 0:
            raise self._no_documents()

    def _clean(self, batch: list[str]) -> list[str]:
        kept = []
        for raw in batch:
            self.counts["documents_read"] += 1
            self.counts["text_bytes_read"] += len(raw.encode("utf-8"))
            text = self.cleaner(raw)
            if not text.strip():
                self.counts["documents_empty"] += 1
                continue
            data = text.encode("utf-8")
            if self.dedup is not None and self.dedup.is_duplicate(data):
                continue
            self.counts["text_bytes_kept"] += len(data)
            kept.append(text)
        return kept

    def _write(self, token_lists: list[list[int]], out: BinaryIO) -> None:
        flat: list[int] = []
        for ids in token_lists:
            flat.append(Tokenizer.eot_token)
            flat.extend(ids)
            self.lengths.append(len(ids) + 1)
        out.write(np.array(flat, dtype=TOKEN_DTYPE).tobytes())
        self.counts["documents"] += len(token_lists)
        self.counts["tokens"] += len(flat)

    def _no_documents(self) -> DataError:
        read, path = self.counts["documents_read"], self.reader.path
        if read == 0:
            return DataError(f"{path} contains no documents (only blank lines or an empty list); add text to prepare")
        return DataError(f"all {read} documents of {path} are empty after cleaning or duplicates; check the input, "
                         "or turn cleaning steps off (see --help)")


def _batches(documents: Iterator[str], max_chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _choose_val(n_documents: int, val_fraction: float, seed: int, reader: Source) -> np.ndarray:
    """A boolean mask over documents: max(1, round(N * val_fraction)) of them, drawn with `seed`, go to val."""
    if n_documents < 2:
        single = f"{reader.path} has a single document, so none is left for validation after the split"
        if not reader.is_folder and reader.path.suffix.lower() == ".txt":  # the one kind --separator splits
            raise PrepareOptionError(f"{single}; separate documents with blank lines (or --separator), or add more "
                                     "documents", "--separator")
        raise DataError(f"{single}; add more documents (a folder's files, a .json/.jsonl file's records and a "
                        ".csv file's rows are one document each, an .md file is one)")
    n_val = min(n_documents - 1, max(1, round(n_documents * val_fraction)))
    is_val = np.zeros(n_documents, dtype=bool)
    is_val[np.random.default_rng(seed).choice(n_documents, size=n_val, replace=False)] = True
    return is_val


def _split(all_tokens: Path, lengths: np.ndarray, is_val: np.ndarray, scratch: Path) -> tuple[int, int]:
    """Copy each document of the scratch file to train.bin or val.bin, a chunk of whole documents at a time."""
    tokens = np.memmap(all_tokens, dtype=TOKEN_DTYPE, mode="r")
    ends = np.cumsum(lengths)
    with open(scratch / "train.bin", "wb") as train, open(scratch / "val.bin", "wb") as val:
        first, start = 0, 0
        while first < len(lengths):
            last = max(first + 1, int(np.searchsorted(ends, start + SPLIT_CHUNK, side="right")))
            end = int(ends[last - 1])
            chunk = tokens[start:end]
            to_val = np.repeat(is_val[first:last], lengths[first:last])  # per token: does its document go to val?
            train.write(chunk[~to_val].tobytes())
            val.write(chunk[to_val].tobytes())
            first, start = last, end
    del tokens  # release the memory map before the scratch folder is removed
    n_val = int(lengths[is_val].sum())
    return int(lengths.sum()) - n_val, n_val


def _check_block_size(shortest: int, block_size: int, source: Path, val_fraction: float | None) -> None:
    if shortest < block_size + 1:
        split = "" if val_fraction is None else f", val_fraction {val_fraction}"
        raise DataError(f"{source} is too small for block_size {block_size}: a split has only {shortest} tokens "
                        f"and training needs at least {block_size + 1} in each (train and val{split}); add text or "
                        "use a smaller block size")


def _check_prepared_block_size(meta: dict[str, Any], block_size: int, path: Path) -> None:
    """_check_block_size for a dataset already prepared in `path`, from its meta.json."""
    counts = meta["counts"]
    _check_block_size(min(counts["train_tokens"], counts["val_tokens"]), block_size, path,
                      _meta_field(meta, "options", "val_fraction"))


def _meta_field(meta: dict[str, Any], section: str, key: str) -> Any:
    """meta[section][key], or None where meta.json lacks it (PreparedDataset requires only format and counts)."""
    part = meta.get(section)
    return part.get(key) if isinstance(part, dict) else None


def _describe_source(reader: Source) -> dict[str, Any]:
    """Where the data came from: every file's size and sha256, and one sha256 over all of them."""
    overall = hashlib.sha256()
    for f in reader.files:
        overall.update(f"{f.name}\0{f.sha256}\n".encode("utf-8", "surrogateescape"))  # the name's own bytes
    files = [{"path": _printable(f.name), "bytes": f.size, "sha256": f.sha256, "documents": f.documents}
             for f in reader.files]
    return {"path": _printable(str(reader.path.resolve())), "kind": "folder" if reader.is_folder else "file",
            "file_count": len(files), "bytes": reader.total_bytes, "sha256": overall.hexdigest(),
            "files": files if len(files) <= MAX_LISTED_FILES else None}


def _printable(name: str) -> str:
    """A file name as UTF-8 text can hold it: bytes of the name that are not UTF-8 (which Python keeps as lone
    surrogates) written as \\xNN."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Staging:
    """A scratch folder beside the output folder (same file system, so moving files out of it is atomic)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path: Path | None = None

    def __enter__(self) -> Path:
        out = self.out
        if out.exists() and not out.is_dir():
            raise OutputFolderError(f"output {out} is a file", "--out must be a folder (created if missing)")
        if out.is_symlink() and not out.exists():
            raise OutputFolderError(f"output {out} is a link to {os.readlink(out)}, which does not exist",
                                    "create that folder, or choose another --out")
        existing = out.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise OutputFolderError(f"cannot create output folder {out}: {existing} is a file, not a folder")
        if out.exists() and not os.access(out, os.W_OK):
            raise OutputFolderError(f"cannot write to output folder {out} (permission denied)")
        parent = out.absolute().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            # Named for this process, so that the next preparation of `out` deletes what a killed one left.
            self.path = staging_path(parent, out.absolute().name)
            self.path.mkdir()
        except OSError as exc:
            raise OutputFolderError(f"cannot write to {parent} ({exc.strerror})") from None
        return self.path

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in _DISK_ERRORS:
            raise OutputFolderError(f"writing {self.out} failed: {exc.strerror}", "free space or choose another "
                                    "--out") from None


def _commit(scratch: Path, out: Path) -> None:
    """Swap the outputs into `out`, one atomic rename each: the old meta.json leaves first and the new one arrives
    last, so the folder never holds a mix of old and new files that a meta.json vouches for.

    Two .bin files of the same sizes as the old ones would pass every check, so the order alone is not enough: a
    reader (or a run killed outright) in the middle finds no meta.json, which `PreparedDataset` refuses; an
    exception in the middle (Ctrl-C) puts the old files back.
    """
    out.mkdir(exist_ok=True)
    replaced = scratch / "replaced"
    replaced.mkdir()
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in reversed(OUTPUT_FILES):
            if os.path.lexists(out / name):
                os.replace(out / name, replaced / name)
                moved_out.append(name)
        for name in OUTPUT_FILES:
            os.replace(scratch / name, out / name)
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            if name not in moved_out:
                (out / name).unlink()
        for name in reversed(moved_out):  # meta.json last again
            os.replace(replaced / name, out / name)
        raise


def ensure_prepared(data: str | os.PathLike[str], cache_dir: str | os.PathLike[str], *,
                    block_size: int | None = None, **options: Any) -> Path:
    """A prepared dataset for `data`: `data` itself if it is one, else a cached preparation of it.

    The cache subfolder is named after the source and a hash of its absolute path, every input file's size and
    modification time, and the options that change the output (`options` are `prepare_dataset`'s keywords; they
    are ignored when `data` is already prepared). A valid preparation with the same key is reused; editing a file
    or changing an option prepares anew. block_size: DataError if a split is shorter than block_size + 1 tokens.
    """
    path = Path(data)
    if path.is_dir() and not is_prepared(path) and any((path / name).exists() for name in PREPARED_FILES):
        PreparedDataset(path)  # a prepared dataset with a file missing: its error names the file
    if not is_prepared(path):
        path = Path(cache_dir) / _cache_name(path, options)
        try:
            PreparedDataset(path)
        except DataError:  # not there yet, or left incomplete
            prepare_dataset(data, path, block_size=block_size, **options)
            return path
    if block_size is not None:
        _check_prepared_block_size(PreparedDataset(path).meta, block_size, path)
    return path


def _cache_name(source: Path, options: dict[str, Any]) -> str:
    """`<source name>-<16 hex digits>`, the digits hashing what determines the prepared output."""
    defaults = _prepare_defaults()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown data option(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}")
    settings = {**defaults, **options}
    reader = Source(source, **{k: settings[k] for k in ("text_field", "csv_column", "separator", "errors")})
    key = hashlib.sha256(json.dumps({
        "format": FORMAT, "tokenizer": RANKS_SHA256, "source": str(source.resolve()),
        "options": {k: v for k, v in settings.items() if k not in ("workers", "progress")},
        "files": [(f.name, f.size, f.mtime_ns) for f in reader.files],
    }, sort_keys=True).encode()).hexdigest()[:16]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", source.resolve().stem or "data") + f"-{key}"


def _prepare_defaults() -> dict[str, Any]:
    """prepare_dataset's keyword options and their defaults (block_size is a check, not an option)."""
    parameters = inspect.signature(prepare_dataset).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != "block_size"}


def format_summary(meta: dict[str, Any], out: str | os.PathLike[str], seconds: float) -> str:
    """A few lines saying what a preparation read, removed and wrote."""
    c = meta["counts"]
    changed = ", ".join(f"{step} {s['documents_changed']:,}" for step, s in meta["cleaning"].items()) or "none"
    source = meta["source"]
    lines = [
        f"prepared {out} from {source['path']} ({source['file_count']:,} file(s), {source['bytes']:,} bytes)",
        f"  documents  {c['documents_read']:,} read, {c['duplicates_removed']:,} duplicates and "
        f"{c['documents_empty']:,} empty removed: {c['documents']:,} kept = {c['train_documents']:,} train + "
        f"{c['val_documents']:,} val",
        f"  tokens     {c['tokens']:,} = {c['train_tokens']:,} train + {c['val_tokens']:,} val, 0 padding "
        f"({c['tokens'] / max(seconds, 1e-9):,.0f} tokens/s, {seconds:.1f} s)",
        f"  cleaning   documents changed: {changed}; bytes removed: {c['bytes_removed_cleaning']:,} by cleaning, "
        f"{c['bytes_removed_duplicates']:,} with duplicates",
    ]
    if c["replaced_sequences"]:
        lines.append(f"  encoding   {c['replaced_sequences']:,} invalid UTF-8 sequences replaced by U+FFFD")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`prepare [INPUT] --out DIR [options]`; without INPUT, build the bundled pydocs corpus.

    Unlike the library functions, which rebuild caches without asking, the command refuses an --out that already
    holds a prepared dataset unless --overwrite is given.
    """
    parser = make_parser("prepare", description="Clean, tokenise and pack text into train.bin/val.bin/meta.json. "
                         "Without INPUT, build the bundled corpus of Python standard library documentation.")
    parser.add_argument("input", nargs="?", metavar="INPUT", type=parse_path,
                        help="a .txt/.md/.json/.jsonl/.csv file or a folder of .txt/.md files")
    add_flag(parser, "out", metavar="DIR", type=parse_path,
             help="output folder (required with INPUT; default for pydocs: data/pydocs)")
    add_flag(parser, "overwrite", action="store_true",
             help="replace a prepared dataset already in --out (its train.bin, val.bin and meta.json; other files "
                  "there are kept)")
    # No defaults here (prepare_dataset's apply): an unset flag stays None, so that only one the user gave for
    # another kind of input is refused.
    add_flag(parser, "text_field", metavar="NAME", help="field of JSON records holding the text (.jsonl/.json input; "
             "default: text)")
    add_flag(parser, "csv_column", metavar="NAME", help="CSV column holding the text (.csv input; default: text)")
    add_flag(parser, "separator", metavar="TEXT",
             help="split a .txt file into documents at this text (default: at blank lines)")
    # No defaults here either: prepare_dataset's (or the bundled corpus's) apply, and the bundled corpus already
    # built is left as it is only if the flags given agree with how it was built.
    add_flag(parser, "val_fraction", type=float, metavar="F", help="share of documents for validation (default: 0.1)")
    add_flag(parser, "seed", type=int, help="seed of the train/val split (default: 1337)")
    add_flag(parser, "errors", choices=ERROR_MODES,
             help="invalid UTF-8: stop with an error (strict, the default) or substitute U+FFFD (replace)")
    add_dataclass_flags(parser, CleaningOptions)
    add_flag(parser, "block_size", type=int, metavar="N", help="fail unless each split holds a window of N+1 tokens")
    add_flag(parser, "workers", type=int, metavar="N", help="tokeniser threads (default: all cores)")
    add_flag(parser, "quiet", action="store_true", help="no progress bar or summary")
    args = parser.parse_args(argv)
    # Before anything else: a corpus already built would otherwise be compared with a value that cannot be built.
    check_settings(val_fraction=args.val_fraction, seed=args.seed, block_size=args.block_size, workers=args.workers)
    reading = {name: getattr(args, name) for name in INPUT_OPTIONS if getattr(args, name) is not None}
    settings = [*SPLIT_OPTIONS, *(f.name for f in dataclasses.fields(CleaningOptions))]
    options = {name: getattr(args, name) for name in settings if getattr(args, name) is not None}
    checks = {"block_size": args.block_size, "workers": args.workers, "progress": not args.quiet}
    if args.input is None:
        if reading:
            raise ConfigError(f"--{next(iter(reading))} applies to an INPUT file; without INPUT the bundled corpus "
                              "is built, which reads none: leave it out")
        return _build_bundled_corpus(Path(args.out or "data/pydocs"), options, checks, args.overwrite)
    if args.out is None:
        parser.error("--out DIR is required with an INPUT")
    _check_input_options(Path(args.input), reading)
    if not args.overwrite:
        _refuse_to_replace(Path(args.out))
    prepare_dataset(args.input, args.out, **reading, **options, **checks)
    return 0


def _build_bundled_corpus(out: Path, options: dict[str, Any], checks: dict[str, Any], overwrite: bool) -> int:
    """The command without INPUT: build the pydocs corpus into `out`, unless it is already built there as asked."""
    from .pydocs import CORPUS_OPTIONS, DOCUMENTS_FILE, build_pydocs  # pydocs itself prepares through this module

    meta = _prepared_meta(out)
    source = _meta_field(meta, "source", "path") if meta else None
    if not overwrite and isinstance(source, str) and Path(source).resolve() == (out / DOCUMENTS_FILE).resolve():
        # Built from this Python's standard library with the same options, it would come out byte for byte the same;
        # options left out mean their defaults.
        built = meta["options"] if isinstance(meta.get("options"), dict) else {}
        wanted = {**_prepare_defaults(), **CORPUS_OPTIONS, **options}
        changed = [name for name in built if name in wanted and built[name] != wanted[name]]
        if changed:
            was, asked = (" ".join(f"--{name} {_flag_text(values[name])}" for name in changed)
                          for values in (built, wanted))
            raise ConfigError(f"--out {out} holds the bundled corpus built with {was}, not {asked}; pass --overwrite "
                              f"to build it again with {asked}")
        if checks["block_size"] is not None:
            _check_prepared_block_size(meta, checks["block_size"], out)
        print(f"the bundled corpus is already built in {out} ({_tokens(meta):,} tokens); pass "
              "--overwrite to build it again", file=sys.stderr)
        return 0
    if not overwrite:
        _refuse_to_replace(out)
    build_pydocs(out, **options, **checks)
    return 0


def _flag_text(value: Any) -> str:
    """A setting as it is written on the command line (booleans as true/false)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_input_options(source: Path, given: Iterable[str]) -> None:
    """ConfigError for a reading option that `source`'s kind of input does not read: it would be silently ignored."""
    kind = "folder" if source.is_dir() else source.suffix.lower()
    for name in given:
        suffixes = INPUT_OPTIONS[name]
        if kind not in suffixes:
            if kind == "folder":
                what = "a folder (each of its files is one document)"
            else:
                what = f"a {source.suffix} file" if source.suffix else "a file with no extension"
            raise ConfigError(f"--{name} applies to {'/'.join(suffixes)} input only, and {source} is {what}; "
                              "leave it out")


def _refuse_to_replace(out: Path) -> None:
    """ConfigError if `out` holds any file that preparing into it would replace.

    Other files in `out` are never touched (the outputs are added beside them), so only these names count.
    """
    found = [name for name in OUTPUT_FILES if os.path.lexists(out / name)]  # a dangling link would be replaced too
    if not found:
        return
    meta = _prepared_meta(out)
    if meta is not None:
        source = _meta_field(meta, "source", "path")
        what = f"a prepared dataset ({f'from {source}, ' if source else ''}{_tokens(meta):,} tokens)"
        them = "it"
    else:
        what = f"{', '.join(found)} (an incomplete prepared dataset, or files of the same names)"
        them = "them"
    raise ConfigError(f"--out {out} already holds {what}; pass --overwrite to replace {them}, or choose another "
                      "--out")


def _tokens(meta: dict[str, Any]) -> int:
    return int(meta["counts"]["train_tokens"]) + int(meta["counts"]["val_tokens"])


def _prepared_meta(out: Path) -> dict[str, Any] | None:
    """The meta.json of the dataset prepared in `out`; None if there is none, or none that PreparedDataset takes."""
    try:
        return PreparedDataset(out).meta
    except (DataError, OSError):
        return None


def cli() -> None:
    """Entry point of `minigpt2-prepare` and `python -m minigpt2.prepare`."""
    run_main(main)


if __name__ == "__main__":
    cli()
