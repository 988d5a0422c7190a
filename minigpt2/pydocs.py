"""The bundled default corpus: the standard library's documentation, as a "write Python documentation" task.

Every Python installation carries its standard library as source, and that source documents itself. Building the
corpus from it needs no download and ships no text that this project did not write: it is made on the user's
machine, from the user's Python, when it is first needed (`python data/prepare.py`, or `python train.py` without
--data).

Each document is one documented object, exactly as written in the source, after a comment naming its module:

- a module's docstring;
- a class's header line and docstring (its methods are documents of their own);
- a function or method with a docstring: decorators, signature, docstring and body. A method comes under the
  header line of its class, so the stub reads as valid, indented Python:

      # module: textwrap
      class TextWrapper:
          def fill(self, text):
              \"\"\"fill(text : string) -> string
              ...\"\"\"
              return "\\n".join(self.wrap(text))

plus the language reference topics that `help("assert")` prints (pydoc_data/topics.py). A model trained on this
learns to continue a signature with its documentation and code: prompt it with a `def` line, or with the first words
of a docstring ("Return the number of").

What is read: every .py file under the standard library folder (sysconfig's "stdlib"), in sorted module-name order,
except site-packages, tests (`test/`, `tests/`, `idle_test/`, `test_*.py`), the turtle demos and private modules (a
path part starting with "_", `__init__.py` aside). Files are parsed with `ast`, never imported: nothing runs,
nothing prints, nothing needs a display or a network. Objects without a docstring are skipped. The corpus depends
only on the Python version, and is the same on every run with the same Python (about 2.27 M tokens with Python
3.11.7).
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .atomic import removed_if_failed, write_atomically
from .dataset import PreparedDataset
from .errors import DataError
from .prepare import check_settings, prepare_dataset

DOCUMENTS_FILE = "pydocs.jsonl"
SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "turtledemo",
                             "__pycache__"})
# HTML stripping is off: docstrings about markup, and doctests' `<BLANKLINE>`, are text here.
CORPUS_OPTIONS = {"strip_html": False}
Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def stdlib_modules(root: str | os.PathLike[str] | None = None) -> list[tuple[str, Path]]:
    """(dotted module name, source path) of every public, non-test module of the standard library, sorted."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subfolders, names in os.walk(base):
        # Pruning here keeps os.walk out of site-packages, which can hold far more files than the stdlib itself.
        subfolders[:] = [d for d in subfolders
                         if d not in SKIPPED_FOLDERS and not d.startswith(("_", ".", "config-"))]
        package = Path(folder).relative_to(base).parts
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix != ".py" or stem.startswith("test_") or (stem.startswith("_") and stem != "__init__"):
                continue
            parts = package if stem == "__init__" else (*package, stem)
            if parts:
                found.append((".".join(parts), Path(folder, name)))
    return sorted(found)


def module_documents(module: str, source: str) -> Iterator[str]:
    """The documents of one module's source: its docstring, then each documented class and function."""
    tree = ast.parse(source)
    lines = source.splitlines()
    header = f"# module: {module}\n"
    if ast.get_docstring(tree):
        yield header + _lines(lines, tree.body[0].lineno, tree.body[0].end_lineno)
    yield from _definitions(tree.body, lines, header, "")


def _definitions(body: list[ast.stmt], lines: list[str], header: str, enclosing: str) -> Iterator[str]:
    """Documents for the definitions directly in `body`; `enclosing` holds the class lines around them."""
    for node in body:
        if not isinstance(node, Definition):
            continue
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        documented = ast.get_docstring(node) is not None
        if isinstance(node, ast.ClassDef):
            if documented:  # the class line(s) and the docstring: its methods come as documents of their own
                yield header + enclosing + _lines(lines, first, node.body[0].end_lineno)
            head = _lines(lines, node.lineno, max(node.lineno, node.body[0].lineno - 1))
            yield from _definitions(node.body, lines, header, enclosing + head + "\n")
        elif documented:
            yield header + enclosing + _lines(lines, first, node.end_lineno)


def _lines(lines: list[str], first: int, last: int) -> str:
    """Source lines `first` to `last` (1-based, inclusive), as written."""
    return "\n".join(lines[first - 1:last])


def pydoc_topics(root: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """The language reference topics that `help("assert")` shows, from pydoc_data/topics.py, one per document.

    The file is a dict literal, read with `ast.literal_eval` (not imported). Yields nothing if its layout changed.
    """
    path = Path(root if root is not None else sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    if not path.is_file():
        return
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["topics"]:
            topics = ast.literal_eval(node.value)
            for name in sorted(topics):
                yield f"# pydoc topic: {name}\n{topics[name]}"


def write_documents(path: str | os.PathLike[str], *, progress: bool = True) -> int:
    """Write the corpus as JSON lines ({"text": ..., "module": ...}) to `path`; return the number of documents."""
    count = 0

    def write(staging: Path) -> None:
        nonlocal count
        with open(staging, "w", encoding="utf-8") as out:
            for module, file in tqdm(stdlib_modules(), desc="reading stdlib", unit=" modules", file=sys.stderr,
                                     disable=None if progress else True, leave=False):
                try:
                    source = file.read_text(encoding="utf-8")
                    documents = list(module_documents(module, source))
                except (SyntaxError, UnicodeDecodeError, ValueError):
                    continue  # a file the running Python cannot parse (e.g. a Python 2 fixture): not documentation
                for text in documents:
                    out.write(json.dumps({"text": text, "module": module}, ensure_ascii=False) + "\n")
                count += len(documents)
            for text in pydoc_topics():
                out.write(json.dumps({"text": text, "module": "pydoc_data.topics"}, ensure_ascii=False) + "\n")
                count += 1

    write_atomically(path, write)
    return count


def build_pydocs(out_dir: str | os.PathLike[str], *, progress: bool = True, **options: Any) -> Path:
    """Build the corpus from the running Python's standard library and prepare it into `out_dir`.

    Writes `out_dir`/pydocs.jsonl (the documents, for reading) and the prepared train.bin, val.bin and meta.json.
    `options` are prepare_dataset's keywords (the split, the cleaning steps, block_size, workers); those not given
    are prepare_dataset's defaults, except CORPUS_OPTIONS.
    """
    # Checked before the standard library is read and pydocs.jsonl replaced, not after, in prepare_dataset.
    check_settings(**{name: options[name] for name in ("val_fraction", "seed", "block_size", "workers")
                      if name in options})
    out = Path(out_dir)
    documents = out / DOCUMENTS_FILE
    with removed_if_failed(out):
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file of that name, or a folder we may not write to
            raise DataError(f"cannot create output folder {out} ({exc.strerror}); choose another --out") from None
        had_documents = documents.exists()
        try:
            write_documents(documents, progress=progress)
            prepare_dataset(documents, out, **{**CORPUS_OPTIONS, **options}, progress=progress)
        except BaseException:
            if not had_documents:  # a failed build leaves nothing it wrote behind (nor the folder it made)
                documents.unlink(missing_ok=True)
            raise
    return out


def default_corpus(out_dir: str | os.PathLike[str]) -> Path:
    """`out_dir` if it already holds the prepared corpus, else build it there first."""
    try:
        PreparedDataset(out_dir)
        return Path(out_dir)
    except DataError:
        return build_pydocs(out_dir)
