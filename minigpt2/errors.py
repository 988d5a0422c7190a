"""The one exception family that command-line front ends turn into a one-line message.

Library code raises these for *user* mistakes (a missing file, a bad setting); anything else is a bug and keeps
its traceback. Each message names the offending file or setting and says what to do about it.
"""


class MiniGPT2Error(Exception):
    """Base class for errors caused by input the user can fix."""


class CheckpointError(MiniGPT2Error):
    """A checkpoint (Hub id or local directory) cannot be found, read or matched to the model."""


class DataError(MiniGPT2Error):
    """Input text or a prepared dataset is missing, malformed or too small."""


class PrepareOptionError(DataError):
    """Input text that one of data/prepare.py's options would read: `option` names it (e.g. "--errors"), so that
    train.py, which prepares with the default options, can say where to pass it."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


class OutputFolderError(DataError):
    """Data preparation cannot write its output folder. The message's fix is prepare's flag, --out; a caller that
    prepares into a folder of its own choosing (train.py's cache of a text file) says its own fix after `reason`."""

    def __init__(self, reason: str, fix: str = "choose another --out") -> None:
        super().__init__(f"{reason}; {fix}")
        self.reason = reason


class ConfigError(MiniGPT2Error, ValueError):
    """A setting (flag, config field, generation argument) has an invalid value."""


class OtherProcessFailed(MiniGPT2Error):
    """In a torchrun launch, raised by the processes other than the main one when it met a user error: it prints
    the error, they leave quietly (status 2 all the same)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), to quote in a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
