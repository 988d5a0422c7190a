"""Cleaning documents before they are tokenised: each step switchable, each step counted.

Steps run in this order on every document (`CleaningOptions` switches them):

1. **html** - remove tags of real HTML elements (`<p>`, `</div>`, `<br/>`, comments, `<script>`/`<style>` with their
   content) and decode entities (`&amp;` -> `&`). Only known element names count as tags, so `a < b`, `List<int>`
   or a doctest's `<BLANKLINE>` are left alone. Block elements become a line break so words do not run together.
2. **unicode** - normalise to NFC, so that "é" is one code point however it was typed (and tokenises one way).
3. **control** - drop control characters (NUL, escape codes, C1 controls); tab and line breaks (form feed, vertical
   tab and NEL too) stay.
4. **emoji** (off by default) - drop emoji and other pictographic symbols (Unicode category So: also ©, °, box
   drawing), with the modifiers and joiners that glue emoji sequences together.
5. **whitespace** - unify line endings and other line breaks (form feed, NEL, U+2028...) to `\\n`, turn exotic
   spaces (no-break, ideographic...) into ` `, drop trailing spaces on each line, keep at most one blank line in a
   row, and trim blank lines at both ends. Indentation and runs of spaces inside a line are kept: they carry meaning
   in code and tables.

Then `Deduplicator` drops documents whose cleaned text is byte-for-byte identical to an earlier one (16-byte
BLAKE2b fingerprints, so millions of documents cost tens of MB). A document that is empty after cleaning is dropped
by the caller.

`CleaningStats` counts, per step, the documents it changed and the characters it removed, so a run can report what
cleaning did rather than doing it silently.
"""

from __future__ import annotations

import functools
import hashlib
import html
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

# Element names of HTML (living standard, plus a few obsolete ones still common on the web).
HTML_ELEMENTS = frozenset("""
a abbr acronym address area article aside audio b base bdi bdo big blockquote body br button canvas caption center
cite code col colgroup data datalist dd del details dfn dialog dir div dl dt em embed fieldset figcaption figure font
footer form frame frameset h1 h2 h3 h4 h5 h6 head header hgroup hr html i iframe img input ins kbd label legend li
link main map mark meta meter nav noscript object ol optgroup option output p param picture pre progress q rp rt
ruby s samp script section select small source span strike strong style sub summary sup svg table tbody td template
textarea tfoot th thead time title tr track tt u ul var video wbr
""".split())
# Elements that start a new line when rendered: replaced by "\n" rather than nothing.
HTML_BLOCKS = frozenset("""
address article aside blockquote br dd div dl dt figcaption figure footer form h1 h2 h3 h4 h5 h6 header hr li main
nav ol p pre section table tbody td tfoot th thead tr ul
""".split())

# A comment, a script/style element with its content, or a tag: its name, then attributes (quotes may hold ">").
_TAG = re.compile(r"""
    <!--.*?-->
  | <(script|style)\b[^>]*>.*?</\1\s*>
  | </?([A-Za-z][A-Za-z0-9]*)\b (?:[^<>"']|"[^"]*"|'[^']*')* >
""", re.DOTALL | re.IGNORECASE | re.VERBOSE)
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
# Not the line breaks among the controls (str.splitlines' own): \n, \r, vertical tab \x0b, form feed \x0c, NEL \x85.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]")
_EXOTIC_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_EXOTIC_BREAK = re.compile(r"[\x0b\x0c\x85\u2028\u2029]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class CleaningOptions:
    """Which cleaning steps run (see the module docstring for what each does)."""

    strip_html: bool = field(default=True, metadata={"help": "remove HTML tags, decode entities"})
    normalize_unicode: bool = field(default=True, metadata={"help": "normalise Unicode to NFC"})
    drop_control: bool = field(default=True, metadata={"help": "drop control characters"})
    strip_emoji: bool = field(default=False, metadata={"help": "drop emoji and pictographic symbols"})
    normalize_whitespace: bool = field(default=True, metadata={"help": "unify line breaks and spaces, trim "
                                                                       "trailing spaces and blank lines"})
    dedup: bool = field(default=True, metadata={"help": "drop exact duplicate documents"})

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)


class CleaningStats:
    """Per step: documents changed and characters removed (net: NFC composing "e" + U+0301 removes one)."""

    def __init__(self) -> None:
        self.changed: Counter[str] = Counter()
        self.removed: Counter[str] = Counter()

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {step: {"documents_changed": self.changed[step], "chars_removed": self.removed[step]}
                for step in self.changed}


def strip_html(text: str) -> str:
    """Remove HTML tags of known elements, then decode character references such as `&amp;` and `&#233;`."""
    if "<" not in text and "&" not in text:
        return text
    text = _TAG.sub(_replace_tag, text)
    # Only entities closed by ';': html.unescape alone would also turn "&copy=2" in a URL into "©=2".
    return _ENTITY.sub(lambda m: html.unescape(m.group()), text)


def _replace_tag(match: re.Match[str]) -> str:
    name = (match.group(2) or "").lower()
    if match.group(1) or match.group().startswith("<!--"):
        return ""  # a comment, or a script/style element with its content
    if name not in HTML_ELEMENTS:
        return match.group()
    return "\n" if name in HTML_BLOCKS else ""


def normalize_unicode(text: str) -> str:
    """NFC: composed characters, the form most text is already in (checked first, which is much faster)."""
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def drop_control(text: str) -> str:
    """Remove C0/C1 control characters except tab and the line breaks (newline, carriage return, vertical tab, form
    feed, NEL), which the whitespace step turns into newlines: removed, they would join the words on either side."""
    return _CONTROL.sub("", text)


def strip_emoji(text: str) -> str:
    """Remove emoji and pictographic symbols (with a space just before them, so "a 🍕 b" reads "a b")."""
    return text if text.isascii() else _emoji_pattern().sub("", text)


@functools.lru_cache(maxsize=1)
def _emoji_pattern() -> re.Pattern[str]:
    """A regex for a run of category-So symbols, their modifiers, and ZWJ sequences such as 👩‍👩‍👧.

    Built once from the Unicode database (about a second), since no regex class names "So" in the standard library.
    """
    ranges, start = [], None
    for code in range(0x110000 + 1):
        inside = code <= 0x10FFFF and unicodedata.category(chr(code)) == "So"
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            ranges.append(f"{_escape(start)}-{_escape(code - 1)}" if code - 1 > start else _escape(start))
            start = None
    symbol = "[" + "".join(ranges) + "]"
    # variation selectors, combining keycap, skin tones, tag characters (flags of regions)
    modifier = r"[\ufe0e\ufe0f\u20e3\U0001F3FB-\U0001F3FF\U000E0020-\U000E007F]"
    sequence = f"{symbol}{modifier}*(?:\u200d{symbol}{modifier}*)*"
    return re.compile(f" ?(?:{sequence})|[\ufe0f\u20e3]")


def _escape(code: int) -> str:
    return f"\\U{code:08x}"


def normalize_whitespace(text: str) -> str:
    """Unify line breaks and spaces, strip trailing spaces and extra blank lines; keep indentation."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _EXOTIC_SPACE.sub(" ", text)
    text = _EXOTIC_BREAK.sub("\n", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_RUN.sub("\n\n", text)
    return text.strip("\n")


class Cleaner:
    """Applies the enabled steps to one document at a time and counts what each changed.

    >>> Cleaner(CleaningOptions())("<p>caf\\u0065\\u0301 &amp; cr\\u00e8me</p>  \\n")
    'café & crème'
    """

    def __init__(self, options: CleaningOptions) -> None:
        self.options = options
        self.stats = CleaningStats()
        candidates: list[tuple[str, bool, Callable[[str], str]]] = [
            ("html", options.strip_html, strip_html),
            ("unicode", options.normalize_unicode, normalize_unicode),
            ("control", options.drop_control, drop_control),
            ("emoji", options.strip_emoji, strip_emoji),
            ("whitespace", options.normalize_whitespace, normalize_whitespace),
        ]
        self.steps = [(name, step) for name, enabled, step in candidates if enabled]
        for name, _ in self.steps:
            self.stats.changed[name] += 0  # list enabled steps in the report even when they change nothing

    def __call__(self, text: str) -> str:
        for name, step in self.steps:
            cleaned = step(text)
            # Steps return their input object when nothing matched, so `is` settles the common case for free.
            if cleaned is not text and cleaned != text:
                self.stats.changed[name] += 1
                self.stats.removed[name] += len(text) - len(cleaned)
                text = cleaned
        return text


def fingerprint(data: bytes) -> bytes:
    """A 16-byte digest of a document's UTF-8 bytes: equal documents, equal fingerprints, and a collision between
    different ones is far less likely than a disk error (2^-128 per pair)."""
    return hashlib.blake2b(data, digest_size=16).digest()


class Deduplicator:
    """Remembers the fingerprint of every document seen and flags exact repeats."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self.duplicates = 0
        self.bytes_removed = 0

    def is_duplicate(self, data: bytes) -> bool:
        """True if `data` (a document's UTF-8 bytes) was seen before; counts it as removed if so."""
        key = fingerprint(data)
        if key in self._seen:
            self.duplicates += 1
            self.bytes_removed += len(data)
            return True
        self._seen.add(key)
        return False
