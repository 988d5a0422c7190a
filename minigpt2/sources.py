"""Reading training text: a file or a folder in, a stream of documents out.

A *document* is one piece of text the model should read as a whole; documents are later packed end to end with
`<|endoftext|>` between them. What counts as one depends on the input:

| input                         | one document is                                                       |
|-------------------------------|-----------------------------------------------------------------------|
| `corpus.txt`                  | a run of lines between blank lines (or between `separator`s)          |
| `notes.md`                    | the whole file                                                        |
| a folder                      | each `.txt` / `.md` file under it, recursively, in sorted path order  |
| `records.jsonl`               | `record[text_field]` of each line's JSON object                       |
| `records.json`                | `record[text_field]` of each object in the top-level JSON list        |
| `table.csv`                   | the `csv_column` cell of each row (the first row names the columns)   |

Everything streams: at most one document (or one 1 MiB read block) is held at a time, so a corpus far larger than
memory goes through. Even a `.json` list is read element by element (`json.load` would parse all of it at once).

Bytes are decoded here, line by line, so that a problem can be reported where it is: a NUL byte means a binary (or
UTF-16) file, an invalid UTF-8 sequence is reported with its byte offset unless `errors="replace"` asks to
substitute U+FFFD (and count the substitutions). Each file is hashed (sha256) while it is read, for `meta.json`.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import inspect
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

from .errors import ConfigError, DataError, PrepareOptionError

FOLDER_SUFFIXES = (".txt", ".md")
FILE_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".csv")
ERROR_MODES = ("strict", "replace")
READ_BLOCK = 1 << 20  # characters of a .json list parsed at a time
MAX_JSON_RECORD = 1 << 28  # a .json element that is still unparsable after this many characters is malformed
_WHITESPACE = re.compile(r"[ \t\r\n]*")
_LONE_CR = re.compile(r"(?<=\r)(?!\n|$)")  # just after a CR that ends a line by itself
_SURROGATE = re.compile(r"[\ud800-\udfff]")


@dataclass
class SourceFile:
    """One input file, with what reading it found (filled in as its documents are streamed)."""

    path: Path
    name: str  # the path relative to the input folder, or the file name of a single-file input
    size: int
    mtime_ns: int
    sha256: str | None = None  # set once the file has been read to the end
    documents: int = 0
    replaced: int = 0  # invalid UTF-8 sequences (or lone surrogates in JSON) replaced by U+FFFD


class Source:
    """An input path, checked and listed up front; `documents()` streams its text.

    Construction raises DataError for a missing path, an unsupported file type, a folder without text files or an
    input with no bytes at all, so that those mistakes surface before any work is done.
    """

    def __init__(self, path: str | os.PathLike[str], *, text_field: str = "text", csv_column: str = "text",
                 separator: str | None = None, errors: str = "strict") -> None:
        if errors not in ERROR_MODES:
            raise ConfigError(f"errors={errors!r} is not one of {', '.join(ERROR_MODES)}")
        if separator is not None and (separator == "" or "\n" in separator):
            raise ConfigError(f"separator {separator!r} must be non-empty text on one line, e.g. '<|endoftext|>'")
        self.path = Path(path)
        self.text_field = text_field
        self.csv_column = csv_column
        self.separator = separator
        self.errors = errors
        self.is_folder = self.path.is_dir()
        self.files = []
        for file in _list_files(self.path):
            try:
                stat = file.stat()
            except OSError as exc:  # e.g. a symbolic link to a file that is gone
                raise _unreadable(file, exc) from None
            if not S_ISREG(stat.st_mode):  # a named pipe would block the read forever, a device never end
                raise DataError(f"{file} is not a regular file (a pipe, socket or device); move it out of the way, "
                                "or save its text to a file and prepare that")
            name = file.relative_to(self.path).as_posix() if self.is_folder else file.name
            self.files.append(SourceFile(file, name, stat.st_size, stat.st_mtime_ns))
        self.bytes_read = 0  # grows as documents are streamed: drives the progress bar
        if self.total_bytes == 0:
            what = f"all {len(self.files)} text files under {self.path} are" if self.is_folder else f"{self.path} is"
            raise DataError(f"{what} empty (0 bytes); add text to prepare")

    @property
    def total_bytes(self) -> int:
        """Size of all input files together."""
        return sum(f.size for f in self.files)

    def documents(self) -> Iterator[str]:
        """Every document's raw text, in a deterministic order (files sorted, then file order)."""
        self.bytes_read = 0
        for file in self.files:
            file.documents = file.replaced = 0
            for text in self._read(file):
                file.documents += 1
                yield text

    def _read(self, file: SourceFile) -> Iterator[str]:
        suffix = file.path.suffix.lower()
        if self.is_folder or suffix == ".md":
            return self._whole_file(file)
        if suffix == ".txt":
            return self._paragraphs(file)
        if suffix == ".jsonl":
            return self._jsonl_records(file)
        if suffix == ".json":
            return self._json_records(file)
        return self._csv_rows(file)

    # -- bytes to text ------------------------------------------------------------------------------------------

    def _decode(self, raw: bytes, file: SourceFile, offset: int) -> str:
        """UTF-8 text of `raw`, which starts at byte `offset` of `file`."""
        nul = raw.find(b"\0")
        if nul >= 0:
            raise DataError(f"{file.path} is not text: NUL byte at byte offset {offset + nul} (a binary or UTF-16 "
                            "file); remove it from the input or convert it to UTF-8")
        if offset == 0 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]  # editors on Windows mark UTF-8 files this way; it is not text
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.errors == "strict":
                bad = raw[exc.start:exc.end]
                raise PrepareOptionError(f"{file.path}: invalid UTF-8 byte {bad!r} at byte offset "
                                         f"{offset + exc.start}; convert the file to UTF-8 (e.g. iconv -f latin1 -t "
                                         "utf-8) or pass --errors replace to substitute U+FFFD", "--errors") from None
        text = raw.decode("utf-8", errors="replace")
        file.replaced += text.count("\ufffd") - raw.count("\ufffd".encode())  # U+FFFD already in the file is fine
        return text

    def _lines(self, file: SourceFile) -> Iterator[tuple[int, str]]:
        """(line number, line with its newline) for each line of `file`, hashing the bytes on the way.

        Decoding line by line is exact: the newline byte never occurs inside a multi-byte UTF-8 character.
        """
        digest = hashlib.sha256()
        offset = 0
        try:
            with open(file.path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    digest.update(raw)
                    yield number, self._decode(raw, file, offset)
                    offset += len(raw)
                    self.bytes_read += len(raw)
        except OSError as exc:
            raise _unreadable(file.path, exc) from None
        file.sha256 = digest.hexdigest()

    # -- one reader per format ------------------------------------------------------------------------------------

    def _whole_file(self, file: SourceFile) -> Iterator[str]:
        # The file is one document, and a document has to fit in memory for tokenisation anyway.
        try:
            raw = file.path.read_bytes()
        except OSError as exc:
            raise _unreadable(file.path, exc) from None
        file.sha256 = hashlib.sha256(raw).hexdigest()
        self.bytes_read += len(raw)
        yield self._decode(raw, file, 0)

    def _paragraphs(self, file: SourceFile) -> Iterator[str]:
        """Documents of a .txt file: split at blank lines, or at each occurrence of the separator.

        Lines end with LF, CRLF, or CR alone (classic Mac OS): `_lines` splits at LF only, so a CR-only file is one
        line here until it is cut after each lone CR.
        """
        lines: list[str] = []
        for _, raw_line in self._lines(file):
            if self.separator is None:
                for line in _LONE_CR.split(raw_line) if "\r" in raw_line else (raw_line,):
                    if line.strip():
                        lines.append(line)
                    elif lines:
                        yield "".join(lines).rstrip("\r\n")
                        lines = []
                continue
            *ends, rest = raw_line.split(self.separator)
            for end in ends:  # each piece before a separator closes the document in progress
                lines.append(end)
                yield "".join(lines).strip("\r\n")
                lines = []
            lines.append(rest)
        if lines:
            yield "".join(lines).strip("\r\n")

    def _jsonl_records(self, file: SourceFile) -> Iterator[str]:
        for number, line in self._lines(file):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{file.path}:{number}: invalid JSON ({exc.msg}, column {exc.colno}); fix or "
                                "remove that line (each line of a .jsonl file is one JSON object)") from None
            except RecursionError:  # Python's parser recurses once per level of nesting
                raise DataError(f"{file.path}:{number}: JSON nested too deeply to read; fix or remove that line "
                                "(each line of a .jsonl file is one JSON object)") from None
            yield self._field(record, file, number)

    def _json_records(self, file: SourceFile) -> Iterator[str]:
        """Objects of a top-level JSON list, parsed one at a time out of a buffer that is refilled as needed."""
        decoder = json.JSONDecoder()
        lines = self._lines(file)
        buffer, pos, at_end = "", 0, False
        line, counted = 1, 0  # buffer[counted] is on line `line`; counting only forward keeps this linear

        def line_at(at: int) -> int:
            nonlocal line, counted
            line += buffer.count("\n", counted, at)
            counted = at
            return line

        def refill(at_least: int) -> None:
            nonlocal buffer, pos, counted, at_end
            line_at(pos)
            parts, size = [buffer[pos:]], 0
            for _, text in lines:
                parts.append(text)
                size += len(text)
                if size >= at_least:
                    break
            else:
                at_end = True
            buffer, pos, counted = "".join(parts), 0, 0

        def fail(problem: str, at: int) -> DataError:
            return DataError(f"{file.path}:{line_at(at)}: invalid JSON ({problem}); a .json input must be one list "
                             f"of objects, [{{\"{self.text_field}\": \"...\"}}, ...] (or use .jsonl, one object per "
                             "line)")

        state = "open"  # open -> first -> (element -> after)* -> closed
        while True:
            pos = _WHITESPACE.match(buffer, pos).end()
            if pos == len(buffer):
                if not at_end:
                    refill(READ_BLOCK)
                    continue
                if state in ("open", "closed"):
                    return  # done, or only whitespace in the file (no documents)
                raise fail("the list is not closed with ']'", pos)
            char = buffer[pos]
            if state == "open":
                if char != "[":
                    raise fail(f"expected '[' to open a list, found {char!r}", pos)
                pos, state = pos + 1, "first"
            elif state == "after":
                if char not in ",]":
                    raise fail(f"expected ',' or ']' after an element, found {char!r}", pos)
                pos, state = pos + 1, "element" if char == "," else "closed"
            elif state == "closed":
                raise fail(f"unexpected {char!r} after the closing ']'", pos)
            elif state == "first" and char == "]":
                pos, state = pos + 1, "closed"
            else:
                try:
                    record, end = decoder.raw_decode(buffer, pos)
                except json.JSONDecodeError as exc:
                    # Either the element is malformed or the buffer ends inside it: read more (doubling, so a huge
                    # element is re-parsed only a few times) until it parses, the file ends, or it is too big.
                    if at_end or len(buffer) - pos > MAX_JSON_RECORD:
                        raise fail(exc.msg, exc.pos) from None
                    refill(max(READ_BLOCK, len(buffer) - pos))
                    continue
                except RecursionError:  # Python's parser recurses once per level of nesting
                    raise fail("nested too deeply to read", pos) from None
                number = line_at(pos)
                pos, state = end, "after"
                yield self._field(record, file, number)

    def _csv_rows(self, file: SourceFile) -> Iterator[str]:
        """The `csv_column` cell of each row. A quoted field may span lines, so a stray '"' would swallow every row
        after it into one cell; strict parsing refuses that (and text after a closing quote) instead."""
        # csv refuses fields over 128 KiB by default; a document can be longer than that.
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        lines = (line for _, line in self._lines(file))
        rows = csv.reader(lines, strict=True)
        start = 1  # the line on which the row being read starts: where a quote that is never closed was opened
        try:
            header = next(rows, None)
            if header is None:
                return
            if not any(header):
                raise DataError(f"{file.path}: line 1 is blank where the header row (the column names) should be; "
                                "remove the blank line")
            if self.csv_column not in header and len(header) == 1 and re.search(r"[;\t|]", header[0]):
                raise DataError(f"{file.path}: the header row {header[0]!r} has no commas; a .csv file's columns are "
                                "separated by ',' (save it as comma-separated)")
            if self.csv_column not in header:
                columns = ", ".join(repr(c) for c in header)
                raise PrepareOptionError(f"{file.path}: no column {self.csv_column!r} in the header row (columns: "
                                         f"{columns}); pass --csv-column NAME", "--csv-column")
            index = header.index(self.csv_column)
            start = rows.line_num + 1
            for row in rows:
                if row:  # an empty row is a blank line
                    if index >= len(row):
                        raise DataError(f"{file.path}:{rows.line_num}: the row has {len(row)} fields but the header "
                                        f"has {len(header)}; fix that row")
                    yield row[index]
                start = rows.line_num + 1
        except csv.Error as exc:
            if inspect.getgeneratorstate(lines) == inspect.GEN_CLOSED:  # the file ended inside a quoted field
                raise DataError(f"{file.path}:{start}: a quoted field that starts in this row is never closed, so "
                                "it would take in every line after it; fix the stray '\"', or write a quote inside "
                                "a quoted field as '\"\"'") from None
            spans = f" (in the row that starts on line {start})" if start < rows.line_num else ""
            raise DataError(f"{file.path}:{rows.line_num}: malformed CSV ({exc}){spans}; fix that row, and any stray "
                            "'\"' in it") from None

    def _field(self, record: Any, file: SourceFile, line: int) -> str:
        """The text of a JSON record, with a message that says how to fix a record without it."""
        where = f"{file.path}:{line}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with a {self.text_field!r} field, found "
                            f"{_json_type(record)}; each record must be an object like "
                            f"{{\"{self.text_field}\": \"...\"}}")
        if self.text_field not in record:
            fields = ", ".join(repr(k) for k in list(record)[:10]) or "none"
            raise PrepareOptionError(f"{where}: record has no {self.text_field!r} field (its fields: {fields}); "
                                     "pass --text-field NAME to read another field", "--text-field")
        text = record[self.text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {self.text_field!r} is {_json_type(text)}, not a string; fix the "
                            "record or remove it")
        # JSON can spell lone UTF-16 surrogates (\ud800), which are not text and cannot be encoded.
        if _SURROGATE.search(text):
            if self.errors == "strict":
                raise PrepareOptionError(f"{where}: field {self.text_field!r} contains a lone surrogate escape "
                                         "(\\ud800-\\udfff), which is not valid text; fix the record or pass "
                                         "--errors replace", "--errors")
            text, count = _SURROGATE.subn("\ufffd", text)
            file.replaced += count
        return text


def _unreadable(path: Path, exc: OSError) -> DataError:
    """A read error on an input file, named as such: an OSError left alone would be taken for a failed write."""
    return DataError(f"{path}: cannot be read ({exc.strerror or exc}); check that it exists and is readable, or "
                     "remove it from the input")


def _json_type(value: Any) -> str:
    """What JSON calls the type of a parsed value (null, not Python's NoneType)."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def text_files(folder: Path) -> list[Path]:
    """The .txt/.md files under `folder`, recursively, sorted; hidden files and folders are skipped.

    Symbolic links to folders are followed (a corpus often links in text kept elsewhere), each real folder once, so
    a link back up the tree does not loop.
    """
    found = []
    seen: set[str] = set()
    for parent, subfolders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [Path(parent, n) for n in names if not n.startswith(".") and n.lower().endswith(FOLDER_SUFFIXES)]
    return sorted(found)


def _list_files(path: Path) -> list[Path]:
    """The input files of `path`: itself, or its `text_files` if it is a folder."""
    kinds = ", ".join(FILE_SUFFIXES)
    if not path.exists():
        raise DataError(f"{path} does not exist; pass a {kinds} file or a folder of .txt/.md files")
    if path.is_dir():
        found = text_files(path)
        if not found:
            raise DataError(f"{path} contains no .txt or .md files (searched recursively); add some, or pass a "
                            f"single {kinds} file")
        return found
    if path.suffix.lower() not in FILE_SUFFIXES:
        what = f"type {path.suffix!r}" if path.suffix else "type (no extension)"
        raise DataError(f"{path}: unsupported file {what}; supported: {kinds} or a folder (rename a plain-text "
                        "file to .txt)")
    return [path]
