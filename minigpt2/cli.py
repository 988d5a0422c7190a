"""Helpers shared by every command-line front end: flags from a dataclass, --device, text files that flags name, and
errors as one line.

Each script (`train.py`, `sample.py`, `data/prepare.py`, `python -m minigpt2.evaluate`) is a thin `main(argv)` wrapped
in `run_main`, so a user mistake prints `error: ...` and exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import errno
import os
import re
import signal
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DataError, MiniGPT2Error, OtherProcessFailed, first_line

if TYPE_CHECKING:
    import torch

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command Ctrl-C ended


class _ArgumentParser(argparse.ArgumentParser):
    """argparse exits with status 2 on bad flags already; keep its message to one line, and suggest the flag a
    misspelled one was meant to be."""

    def error(self, message: str) -> typing.NoReturn:
        # argparse takes a value that starts with '-' for the next flag ("--separator ---"): say how to give one.
        flag = re.match(r"argument (--[\w-]+)\S*: expected one argument$", message)
        if flag:
            message += f" (a value that starts with '-' goes as {flag.group(1)}=VALUE)"
        self.exit(EXIT_USAGE, f"{_rank_prefix()}{self.prog}: error: {message} (see --help)\n" if _speaks() else None)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            message = f"unrecognized arguments: {' '.join(extras)}"
            guess = next(filter(None, map(self._meant, extras)), None)
            self.error(f"{message}; did you mean {guess}?" if guess else message)
        return namespace

    def _meant(self, typed: str) -> str | None:
        """The one flag `typed` most likely misspells (in its dash style), or None: the flag it is the start of
        (--temp), else the closest by spelling (--tempreture)."""
        if not typed.startswith("--"):
            return None
        word = typed.split("=")[0][2:]
        names = {s[2:].replace("-", "_") for action in self._actions for s in action.option_strings
                 if s.startswith("--")}
        key = word.replace("-", "_")
        starts = [name for name in names if name.startswith(key)]
        if starts:
            found = starts if len(starts) == 1 else []  # --n could start any of several: no guess
        else:
            found = difflib.get_close_matches(key, names, n=1)
        if not found:
            return None
        return "--" + (found[0].replace("_", "-") if "-" in word else found[0])


def make_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser whose errors are one line and exit with status 2."""
    return _ArgumentParser(prog=prog, description=description, allow_abbrev=False)


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add `--name` with its dashed spelling (`--max_new_tokens` and `--max-new-tokens`)."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*spellings, dest=name, **kwargs)


def parse_bool(text: str) -> bool:
    """Parse a command-line boolean: true/false, yes/no, 1/0, on/off."""
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_path(text: str) -> str:
    """Parse a path flag: an empty one (often an unset shell variable) would mean the current folder; refuse it."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give a path")
    return text


def read_text_file(path: str | Path, flag: str | None = None) -> str:
    """The text of the UTF-8 file at `path`, which the flag `--flag` names (None: a file the library was given).

    Read as Python's text mode reads it: line endings (\\r\\n, \\r) become \\n, as in the prepared training data. A
    leading byte-order mark, which Windows editors write, is dropped: it is not text. A folder, a missing or
    unreadable file, a NUL byte (a binary or UTF-16 file, which prepare refuses too) and bytes that are not UTF-8 are
    a DataError of one line that starts with `--flag path: ` (with `path: ` alone when there is no flag) and says what
    to do.
    """
    where = f"--{flag} {path}" if flag else str(path)
    file = Path(path)
    if file.is_dir():  # reading one fails with a different OSError on each system
        raise DataError(f"{where}: is a directory; pass a text file")
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{where}: no such file; check the path") from None
    except OSError as exc:
        raise DataError(f"{where}: cannot be read ({exc.strerror}); pass a readable text file") from None
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{where}: not text, a NUL byte at byte {nul} (a binary or UTF-16 file); convert it to UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


MAX_SEED = 2**64 - 1  # torch's generators take 64-bit seeds


def parse_seed(text: str) -> int:
    """Parse a --seed: a whole number torch's random generators accept, 0 to 2**64 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64 - 1, got {value}")
    return value


class _GivenNone:
    """`--flag none` as parsed: a flag left out is None, and an explicit none must win over a config file."""

    def __repr__(self) -> str:
        return "None"


_GIVEN_NONE = _GivenNone()


def _field_parser(tp: Any) -> tuple[Callable[[str], Any], str]:
    """The string -> value converter and metavar for a dataclass field type (Optional[X] accepts 'none')."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner, metavar = _field_parser(args[0]) if len(args) == 1 else (str, "VALUE")

        def optional(text: str) -> Any:
            # An empty value is not "none": it is most often an unset shell variable, which the field's own check
            # (or the inner type) refuses rather than quietly reading as the default.
            return _GIVEN_NONE if text.strip().lower() in {"none", "null"} else inner(text)

        optional.__name__ = getattr(inner, "__name__", "value")  # argparse names it: "invalid int value: ''"
        return optional, metavar
    if tp is bool:
        return parse_bool, "BOOL"
    if tp in (int, float, str):
        return tp, tp.__name__.upper()
    return str, "VALUE"


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of dataclass `cls`, named after the field; defaults stay unset (None) so that a
    config file can fill them and the command line wins over it. A bool flag alone means true (`--overwrite`), or
    takes a value (`--progress false`)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        convert, metavar = _field_parser(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else None
        doc = field.metadata.get("help", "")
        switch = dict(nargs="?", const=True) if hints[field.name] is bool else {}
        add_flag(parser, field.name, type=convert, metavar=metavar, default=None, **switch,
                 help=f"{doc} (default: {default})" if doc else f"default: {default}")


def dataclass_from_flags(cls: type, namespace: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """Build `cls` from defaults, then `base` (e.g. a config file), then the flags that were given (`none` too)."""
    values = dict(base or {})
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise MiniGPT2Error(f"unknown setting {key!r}; known settings: {', '.join(sorted(known))}")
    for name in known:
        given = getattr(namespace, name, None)
        if given is not None:
            values[name] = None if given is _GIVEN_NONE else given
    return cls(**values)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    # The default format adds the warning's file, line number and source line: noise to someone running a command.
    # Other kinds than a plain UserWarning (a library's FutureWarning, ...) keep their kind and where they came from.
    if category is UserWarning:
        return f"warning: {message}\n"
    return f"warning: {category.__name__} from {Path(filename).name}:{lineno}: {message}\n"


class _Terminated(BaseException):
    """SIGTERM, raised wherever the command is, so that its with-blocks clean up (staging folders, half-made
    outputs) as they do on Ctrl-C. A BaseException, like KeyboardInterrupt, so that no `except Exception` takes it."""


def _terminate(signum: int, frame: types.FrameType | None) -> None:
    raise _Terminated


@contextlib.contextmanager
def interrupt_quietly() -> Iterator[None]:
    """Ctrl-C within the block ends the command as run_main would ("interrupted", status 130), not in a traceback.

    For a script's imports, before run_main takes over: loading torch takes seconds, and a user who presses Ctrl-C
    meanwhile has changed their mind, not met a bug.
    """
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _failed_allocation(exc: BaseException) -> str | None:
    """What could not be allocated, if `exc` says an allocation failed, else None. numpy raises MemoryError; torch
    raises a RuntimeError (OutOfMemoryError on a GPU) whose message starts with where in its C++ it failed."""
    if isinstance(exc, MemoryError):
        return str(exc) or "an allocation failed"
    text = first_line(exc)
    cpu = re.search(r"DefaultCPUAllocator: (.*?)(?:\. Error code|$)", text)
    if cpu:
        return cpu.group(1)
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError: "CUDA out of memory. Tried to ..."
        return text.split(". ")[1] if ". " in text else text
    return None


def _speaks() -> bool:
    """Whether this process reports user errors. torchrun runs the same command in every process, so they meet the
    same errors: one per machine says so (machines may differ in their files), the first of its processes."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _rank_prefix() -> str:
    """"rank N: " before the errors of another machine than the main process's in a torchrun launch."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"rank {rank}: "


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> typing.NoReturn:
    """Run a CLI `main`, turning user errors into `error: ...` on stderr and exit status 2, warnings into
    `warning: ...` lines, and SIGTERM into a clean exit (status 143) like Ctrl-C's (130). Training catches both
    signals itself while it trains, to save a checkpoint first.

    An OSError about a path (a folder the user cannot enter, a name too long for the file system) is a user error
    too, whichever check met it first: one line naming the path; so are running out of memory and output
    redirected to a full disk. Output piped into a reader that has gone away (`| head`) ends the command quietly, as
    it ends a Unix tool.
    """
    default_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    default_term = signal.signal(signal.SIGTERM, _terminate)
    try:
        code = main(argv)
        sys.stdout.flush()  # here, where a reader gone away is caught, rather than at the interpreter's exit
    except BrokenPipeError:
        # Python's recipe (docs of the signal module, "Note on SIGPIPE"): point stdout at /dev/null, so that the
        # interpreter's final flush of what is still buffered does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        # 141 = 128 + SIGPIPE, what a shell reports for a Unix tool that SIGPIPE ended (`yes | head`): a pipeline
        # under `set -o pipefail` sees the same status from this command as from any other.
        sys.exit(EXIT_BROKEN_PIPE)
    except MiniGPT2Error as exc:
        if _speaks() and not isinstance(exc, OtherProcessFailed):
            sys.stderr.write(f"{_rank_prefix()}error: {exc}\n")  # one write: other machines' lines do not interleave
        sys.exit(EXIT_USAGE)
    except OSError as exc:
        if exc.filename is None and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # stdout redirected to a full disk
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the final flush cannot fail too
            print(f"error: writing the output: {exc.strerror}; free some space there", file=sys.stderr)
            sys.exit(EXIT_USAGE)
        if exc.filename is None:  # not about a path the user gave: a bug, which keeps its traceback
            raise
        fix = "free some space there" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "check the path and its " \
            "permissions"
        print(f"error: {exc.filename}: {exc.strerror or exc}; {fix}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except (MemoryError, RuntimeError) as exc:  # sizes beyond this machine (a batch of 10^11 rows): the user's
        what = _failed_allocation(exc)
        if what is None:
            raise
        print(f"error: out of memory ({what}); use smaller sizes (batch, sequence length, beams, ...)", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except _Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    finally:  # for a caller that runs a command in its own process (tests)
        warnings.formatwarning = default_format
        signal.signal(signal.SIGTERM, default_term)
    sys.exit(code or 0)


def resolve_device(name: str, local_rank: int = 0, *, training: bool = False) -> torch.device:
    """The torch device a --device flag names: "auto" is CUDA when torch sees a GPU, else the CPU.

    A bare "cuda" means this process's GPU (`local_rank` under torchrun). ConfigError for a name that is not a
    device or a device that is not there. Training runs on cpu and cuda only (the devices its mixed precision,
    resume and DDP are tested on); evaluation and sampling take any device torch can use (mps, xpu, ...).
    """
    import torch  # here, so that the data-preparation command never loads torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} asks for a GPU but torch sees none; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        if training:
            raise ConfigError(f"--device {name}: training runs on cpu and cuda only")
        try:
            usable = device.type != "meta" and torch.empty(1, device=device).device.type == device.type
        except Exception:  # each backend fails its own way when absent: RuntimeError, AssertionError, ImportError...
            usable = False
        if not usable:
            raise ConfigError(f"--device {name}: torch cannot compute on it on this machine; use --device cpu")
    return device
