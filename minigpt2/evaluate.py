"""Perplexity with a sliding window, and the `python -m minigpt2.evaluate` command.

Perplexity is exp(mean negative log-likelihood per token): how many equally likely tokens the model is "choosing
between" on average. A model sees at most `n_positions` tokens at once, so a long text is cut into windows. Cutting
it into disjoint chunks is fast but unfair: the first tokens of every chunk are predicted with almost no context.
The sliding window trades compute for context:

    tokens     t0 t1 t2 t3 t4 t5 t6 t7 t8 t9          context = 4, stride = 2
    window 0   [t0 t1 t2 t3] -> predicts t1..t4        scores t1 t2 t3 t4   (all of its targets)
    window 1         [t2 t3 t4 t5] -> t3..t6           scores t5 t6         (the ones not scored before)
    window 2               [t4 t5 t6 t7] -> t5..t8     scores t7 t8
    window 3                     [t6 t7 t8] -> t7..t9  scores t9            (the last window may be shorter)

Window k feeds tokens [k*stride, k*stride + context) and predicts each next token, including the one just after its
last input. It scores only the targets no earlier window scored, so every token after the first is scored exactly
once (N - 1 in all) and each scored token beyond the first window sees at least `context - stride` tokens of history.
The loss is the sum of the scored tokens' NLL divided by N - 1, not the mean of per-window mean losses: windows
score different numbers of tokens, and averaging their means would over-weight the short ones. With
stride == context the windows are disjoint chunks; a smaller stride gives more context per token at the cost of
context / stride forward passes per `context` tokens.

Transformers' documented recipe is the same except that it drops each window's last prediction (its labels are
shifted inside the model), so with stride == context it skips the first token of every chunk; here it is scored.

Bits per byte, loss_sum / (ln 2 * n_bytes), compares models with different tokenizers: tokens differ, bytes do not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .cli import (add_flag, interrupt_quietly, make_parser, parse_path, parse_seed, read_text_file, resolve_device,
                  run_main)
from .errors import ConfigError, DataError
from .sources import FOLDER_SUFFIXES, text_files

# Run as `python -m minigpt2.evaluate`, Ctrl-C while torch loads ends the command quietly; imported, it is the caller's.
with interrupt_quietly() if __name__ == "__main__" else contextlib.nullcontext():
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from .generation_config import STRATEGIES, SettingError
    from .model import GPT
    from .tokenizer import EOT_ID, Tokenizer

MAX_LOG_PERPLEXITY = 700.0  # exp(700) ~ 1e304 is still a float; the exp of a larger loss overflows
IGNORE = -100  # the label of a position that is fed to the model but not scored


def perplexity_of(loss: float) -> float:
    """exp(loss), the perplexity of a mean loss in nats, capped at exp(700) ~ 1e304: a diverged model still gets a
    number (JSON, where results go, has no infinity) rather than an OverflowError."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


class Window(NamedTuple):
    """Inputs tokens[begin:end]; targets tokens[begin + 1:end + 1], of which the last `scored` count."""

    begin: int
    end: int
    scored: int


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows that score tokens 1..n_tokens - 1 exactly once (see the module docstring)."""
    windows = []
    scored_until = 0  # targets 1..scored_until are scored by earlier windows
    begin = 0
    while scored_until < n_tokens - 1:
        end = min(begin + context, n_tokens - 1)
        windows.append(Window(begin, end, end - scored_until))
        scored_until = end
        begin += stride
    return windows


def _as_token_array(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """A 1-D integer array view of `token_ids`; a memmap stays a memmap, so windows are read from disk lazily."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    array = np.asarray(token_ids)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise DataError(f"token ids must be a 1-D sequence of integers, got shape {array.shape} of {array.dtype}")
    return array


@torch.no_grad()
def perplexity(model: GPT, token_ids: Sequence[int] | np.ndarray | torch.Tensor, *, context: int | None = None,
               stride: int | None = None, batch_size: int = 8, progress: bool = True,
               n_bytes: int | None = None) -> dict[str, float | int | None]:
    """Sliding-window perplexity of `model` on one long sequence of token ids.

    context: tokens per window, at most (and by default) the model's n_positions.
    stride: how far each window moves, 1..context; defaults to context // 2, so every token scored after the first
        window has at least half a context of history.
    batch_size: windows per forward pass; windows of equal length are batched (only the last may be shorter).
    n_bytes: the UTF-8 size of the text the tokens came from, to report bits per byte.

    Returns {perplexity, loss (mean NLL in nats per scored token), tokens (scored: N - 1), windows, context, stride,
    bits_per_byte (None without n_bytes)}. Runs in eval mode with autocast off (the mode is restored afterwards);
    the cross-entropy is computed in fp32 and summed in fp64.
    """
    tokens = _as_token_array(token_ids)
    n_positions = model.config.n_positions
    context = n_positions if context is None else context
    if not 1 <= context <= n_positions:
        raise SettingError("context", context, f"must be between 1 and the model's n_positions={n_positions}")
    stride = max(1, context // 2) if stride is None else stride
    if not 1 <= stride <= context:
        raise SettingError("stride", stride, f"must be between 1 and the context of {context} tokens; a larger "
                           "stride would leave tokens between windows unscored")
    if batch_size < 1:
        raise SettingError("batch_size", batch_size, "must be at least 1")
    _check_scorable(tokens)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= model.config.vocab_size:
        raise DataError(f"token id {high if high >= model.config.vocab_size else low} is outside the model's "
                        f"vocabulary of {model.config.vocab_size}; was the text tokenized for another model?")

    windows = sliding_windows(len(tokens), context, stride)
    device = next(model.parameters()).device
    loss_sum = 0.0
    with evaluating(model), torch.autocast(device.type, enabled=False), \
            tqdm(total=len(windows), unit="window", desc="perplexity", disable=not progress) as bar:
        for batch in _batches(windows, batch_size):
            inputs = torch.from_numpy(np.stack([tokens[w.begin:w.end] for w in batch]).astype(np.int64))
            labels = torch.from_numpy(np.stack([tokens[w.begin + 1:w.end + 1] for w in batch]).astype(np.int64))
            for row, window in enumerate(batch):
                labels[row, :len(labels[row]) - window.scored] = IGNORE  # already scored by an earlier window
            logits = model(inputs.to(device))
            nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.to(device).flatten(), ignore_index=IGNORE,
                                  reduction="none")  # 0 at ignored positions
            loss_sum += nll.double().sum().item()
            bar.update(len(batch))

    n_scored = len(tokens) - 1
    loss = loss_sum / n_scored
    return {
        "perplexity": perplexity_of(loss),
        "loss": loss,
        "tokens": n_scored,
        "windows": len(windows),
        "context": context,
        "stride": stride,
        "bits_per_byte": loss_sum / (math.log(2) * n_bytes) if n_bytes else None,
    }


def _check_scorable(tokens: Sequence[int] | np.ndarray) -> None:
    """DataError unless `tokens` are long enough for perplexity: one token to predict from, one to predict."""
    if len(tokens) < 2:
        raise DataError(f"the text has {len(tokens)} token(s); perplexity needs at least 2 (one to predict from), "
                        "so use a longer text")


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration of the block, then the model's previous mode again: the caller may be
    a training loop that evaluates between steps."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows grouped up to `batch_size`, never mixing lengths (they are stacked into one tensor)."""
    batches: list[list[Window]] = []
    for window in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0].end - last[0].begin == window.end - window.begin:
            last.append(window)
        else:
            batches.append([window])
    return batches


@dataclass
class EvalText:
    """Token ids to evaluate on, the UTF-8 size of the text they encode (None if unknown), and where they came from."""

    tokens: np.ndarray
    n_bytes: int | None
    source: str


def load_eval_text(path: str | Path, tokenizer: Tokenizer | None = None) -> EvalText:
    """Read evaluation text from a file, a folder of .txt/.md files, or a prepared dataset's validation split.

    A folder's files are read in sorted order and joined by `<|endoftext|>`, the document separator GPT-2 was trained
    with; empty files are skipped. Text is read as `cli.read_text_file` reads it (line endings as \\n). A prepared
    dataset (a folder with `meta.json` and `val.bin`, see `dataset.py`) is already tokenized; its validation split
    is used as is.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory; pass a text file, a folder of "
                        f"{'/'.join(FOLDER_SUFFIXES)} files, or a dataset folder written by data/prepare.py")
    tokenizer = tokenizer or Tokenizer()
    if path.is_dir() and any((path / name).is_file() for name in ("meta.json", "val.bin")):
        return _load_prepared(path, tokenizer)  # a broken one gets PreparedDataset's precise error
    if path.is_dir():
        files = text_files(path)
        if not files:
            raise DataError(f"{path}: the folder holds no {' or '.join(FOLDER_SUFFIXES)} files and no val.bin; add "
                            "text files to it, or pass a text file or a dataset folder written by data/prepare.py")
    else:
        files = [path]
    # An empty file is no document (prepare drops them too): it gets no <|endoftext|> to predict.
    texts = [text for text in map(read_text_file, files) if text]
    ids: list[int] = []
    for i, encoded in enumerate(tokenizer.encode_batch(texts)):
        ids.extend(([EOT_ID] if i else []) + encoded)
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    source = str(path) if len(files) == 1 else f"{path} ({len(files)} files)"
    return EvalText(np.asarray(ids, dtype=np.int64), n_bytes, source)


def _load_prepared(directory: Path, tokenizer: Tokenizer) -> EvalText:
    from .dataset import PreparedDataset

    tokens = PreparedDataset(directory).tokens("val")
    return EvalText(tokens, text_bytes(tokens, tokenizer), f"{directory} (validation split)")


def text_bytes(tokens: np.ndarray, tokenizer: Tokenizer) -> int:
    """The UTF-8 size of the text that `tokens` encode, for bits per byte.

    Byte-level BPE: every token stands for fixed bytes, so the size is the sum over tokens, counted in chunks to
    bound memory. The <|endoftext|> separators stand for no text and are left out, as for a folder of files.
    """
    n_bytes = 0
    for start in range(0, len(tokens), 1 << 20):
        chunk = np.asarray(tokens[start:start + (1 << 20)])
        n_bytes += len(tokenizer.decode_bytes(chunk[chunk != EOT_ID].tolist()))
    return n_bytes


def load_model(name_or_path: str, device: torch.device) -> GPT:
    """A Hub id or checkpoint directory, in fp32 on `device`, in eval mode."""
    return GPT.from_pretrained(name_or_path).to(device=device, dtype=torch.float32).eval()


def _add_window_flags(parser) -> None:
    add_flag(parser, "text", type=parse_path, required=True, metavar="PATH",
             help="a UTF-8 text file, a folder of .txt/.md files, or a prepared dataset folder (its val split)")
    add_flag(parser, "stride", type=int, default=None, metavar="S",
             help="tokens each window moves (1..context; default context // 2; = context for disjoint chunks)")
    add_flag(parser, "context", type=int, default=None, metavar="C",
             help="tokens per window (default and maximum: the model's n_positions)")
    add_flag(parser, "batch_size", type=int, default=8, metavar="B", help="windows per forward pass (default 8)")
    add_flag(parser, "device", default="auto", help="auto (GPU if available), cpu, cuda, cuda:N (default auto)")
    add_flag(parser, "quiet", action="store_true", help="no progress bar")


def _perplexity_parser():
    parser = make_parser("python -m minigpt2.evaluate", description=(
        "Sliding-window perplexity of a model on a text. For the before/after report of a base model against a "
        "fine-tuned one, run `python -m minigpt2.evaluate report --help`."))
    add_flag(parser, "model", required=True, metavar="M", type=parse_path,
             help="a Hub id (gpt2, ...) or a checkpoint directory")
    _add_window_flags(parser)
    add_flag(parser, "json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _report_parser():
    parser = make_parser("python -m minigpt2.evaluate report", description=(
        "Before/after report: perplexity of a base and a fine-tuned model on the same text, and samples of each "
        "decoding strategy side by side with diversity and likelihood measures, as report.html and report.md."))
    add_flag(parser, "base", required=True, metavar="M", type=parse_path,
             help="the model before fine-tuning (Hub id or directory)")
    add_flag(parser, "finetuned", required=True, metavar="M", type=parse_path,
             help="the fine-tuned checkpoint directory (or Hub id)")
    add_flag(parser, "out", required=True, metavar="DIR", type=parse_path,
             help="folder to write report.html and report.md into")
    _add_window_flags(parser)
    add_flag(parser, "prompt", action="append", default=None, metavar="TEXT",
             help="a prompt to sample from (repeatable); default: the starts of documents from the text")
    add_flag(parser, "prompts_file", type=parse_path, default=None, metavar="FILE", help="prompts, one per line")
    add_flag(parser, "num_prompts", type=int, default=4, metavar="N",
             help="prompts drawn from the text when none are given (default 4)")
    add_flag(parser, "strategies", type=_parse_strategies, default=None, metavar="LIST",
             help=f"comma-separated decoding presets (default: all of {','.join(STRATEGIES)})")
    add_flag(parser, "max_new_tokens", type=int, default=60, metavar="N", help="tokens per sample (default 60)")
    add_flag(parser, "seed", type=parse_seed, default=0, help="seed of the sampling strategies (default 0)")
    add_flag(parser, "overwrite", action="store_true", help="replace a report already in --out")
    return parser


def _parse_strategies(text: str) -> list[str]:
    """Parse --strategies: one or more comma-separated names of generation_config.STRATEGIES."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown or not names:
        problem = f"unknown strategy {unknown[0]!r}" if unknown else "no strategy named"
        raise argparse.ArgumentTypeError(f"{problem}; choose from {','.join(STRATEGIES)}")
    return names


def _load_text(path: str) -> EvalText:
    """--text, read and checked before any model is loaded: a text too short to score fails in a second. Its
    errors start with `--text path: `, as read_text_file's do (the library's start with the path alone)."""
    try:
        text = load_eval_text(path)
        _check_scorable(text.tokens)
    except DataError as exc:
        raise DataError(f"--text {path}: {str(exc).removeprefix(f'{Path(path)}: ')}") from None
    return text


def _run_perplexity(args) -> int:
    device = resolve_device(args.device)
    text = _load_text(args.text)
    model = load_model(args.model, device)
    result = perplexity(model, text.tokens, context=args.context, stride=args.stride, batch_size=args.batch_size,
                        progress=not args.quiet, n_bytes=text.n_bytes)
    if args.json:
        print(json.dumps({"model": args.model, "text": text.source, **result}))
        return 0
    bpb = f"{result['bits_per_byte']:.4f}" if result["bits_per_byte"] is not None else "n/a (byte count unknown)"
    print(f"model          {args.model}\n"
          f"text           {text.source}\n"
          f"tokens scored  {result['tokens']:,} in {result['windows']:,} windows "
          f"(context {result['context']}, stride {result['stride']})\n"
          f"perplexity     {result['perplexity']:.6g}\n"
          f"loss           {result['loss']:.4f} nats/token\n"
          f"bits per byte  {bpb}")
    return 0


def _run_report(args) -> int:
    from .report import write_report

    prompts = list(args.prompt or [])
    if not all(prompts):  # whitespace is text to GPT-2, as in sample.py
        raise ConfigError("--prompt: a prompt is empty; give some text to continue")
    if args.prompts_file:
        lines = [line for line in read_text_file(args.prompts_file, "prompts_file").splitlines() if line.strip()]
        if not lines:
            raise DataError(f"--prompts_file {args.prompts_file}: holds no non-blank line; write one prompt per "
                            "line, or leave the flag out to draw prompts from --text")
        prompts += lines
    existing = [name for name in ("report.html", "report.md") if _is_file(Path(args.out) / name)]
    if existing and not args.overwrite:  # a training run writes its report there too: never replaced unasked
        raise ConfigError(f"--out {args.out} already holds {existing[0]}; pass --overwrite to replace it, or choose "
                          "another --out")
    device = resolve_device(args.device)
    text = _load_text(args.text)
    base = load_model(args.base, device)
    finetuned = load_model(args.finetuned, device)
    html_path, md_path = write_report(
        base, finetuned, text.tokens, args.out, prompts=prompts or None, strategies=args.strategies,
        max_new_tokens=args.max_new_tokens, seed=args.seed, base_name=args.base, finetuned_name=args.finetuned,
        num_prompts=args.num_prompts, context=args.context, stride=args.stride, batch_size=args.batch_size,
        n_bytes=text.n_bytes, text_name=text.source, progress=not args.quiet)
    print(f"wrote {html_path}\nwrote {md_path}")
    return 0


def _is_file(path: Path) -> bool:
    """Whether `path` is a file; False where it cannot be looked at (the command's own checks then say why)."""
    try:
        return path.is_file()
    except OSError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """`evaluate --model M --text PATH [...]` prints perplexity; `evaluate report --base ... --finetuned ...` writes
    the before/after report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    report = argv[:1] == ["report"]
    args = _report_parser().parse_args(argv[1:]) if report else _perplexity_parser().parse_args(argv)
    try:
        return _run_report(args) if report else _run_perplexity(args)
    except SettingError as exc:  # the library spells a setting as its keyword (stride=0); this one came from a flag
        if exc.name not in vars(args):
            raise
        raise ConfigError(exc.as_flag()) from None


def cli() -> None:
    """Console-script entry point (`minigpt2-evaluate`)."""
    run_main(main)


if __name__ == "__main__":
    cli()
