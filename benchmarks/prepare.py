"""Preparing text: minigpt2's packed pipeline vs the classic recipe, on the same file, in one run.

    pip install datasets   # the classic side needs it; it is not a minigpt2 dependency
    python benchmarks/prepare.py [--mb 4]

The text is the pydocs corpus (the standard library's documentation, read from this Python's source), written to
one `data.txt` with a blank line between documents - the shape the classic recipe expects.

- classic: `datasets.load_dataset("text")` (one sample per line) + `.map` of transformers' GPT-2 tokenizer with
  `padding="max_length", truncation=True, max_length=512`, the way run_clm-style scripts prepare data.txt. The
  tokenizer is loaded from files that `Tokenizer.save_pretrained` writes, since the Hub is not needed.
- minigpt2: `prepare_dataset("data.txt", ...)`: read, clean, dedup, tokenise, pack, split, write.

Each side is timed from the text file to its outputs on disk (tokenizer loading excluded for both). Tokens/s counts
text tokens: non-padding ids for the classic recipe, ids minus the `<|endoftext|>` separators for ours. Padding on
disk counts the pad ids the classic recipe stores in `input_ids` (its attention_mask column doubles the bytes).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minigpt2 import Tokenizer  # noqa: E402
from minigpt2.prepare import prepare_dataset  # noqa: E402
from minigpt2.pydocs import module_documents, stdlib_modules  # noqa: E402

MAX_LENGTH = 512


def write_corpus(path: Path, megabytes: float) -> tuple[int, int]:
    """Write pydocs documents, blank-line separated, up to `megabytes`; return (bytes, lines)."""
    budget = int(megabytes * 1_000_000)
    size = 0
    with open(path, "w", encoding="utf-8") as out:
        for module, file in stdlib_modules():
            try:
                documents = list(module_documents(module, file.read_text(encoding="utf-8")))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for text in documents:
                out.write(text + "\n\n")
                size += len(text.encode()) + 2
                if size >= budget:
                    break
            if size >= budget:
                break
    with open(path, encoding="utf-8") as f:
        lines = sum(1 for _ in f)
    return size, lines


def classic(path: Path, tokenizer_dir: Path, cache_dir: Path) -> dict[str, float]:
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    started = time.perf_counter()
    raw = datasets.load_dataset("text", data_files={"train": str(path)}, cache_dir=str(cache_dir))["train"]
    tokenized = raw.map(lambda batch: tokenizer(batch["text"], padding="max_length", truncation=True,
                                                max_length=MAX_LENGTH),
                        batched=True, remove_columns=["text"])
    seconds = time.perf_counter() - started
    rows = len(tokenized)
    text_tokens = sum(sum(mask) for mask in tokenized["attention_mask"])
    return {"seconds": seconds, "text_tokens": text_tokens, "tokens_on_disk": rows * MAX_LENGTH,
            "padding": rows * MAX_LENGTH - text_tokens}


def ours(path: Path, out_dir: Path) -> dict[str, float]:
    Tokenizer()  # load the BPE ranks outside the timing, as the classic side does
    started = time.perf_counter()
    meta = prepare_dataset(path, out_dir, progress=False)
    seconds = time.perf_counter() - started
    counts = meta["counts"]
    return {"seconds": seconds, "text_tokens": counts["tokens"] - counts["documents"],
            "tokens_on_disk": counts["train_tokens"] + counts["val_tokens"], "padding": counts["padding_tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=4.0, help="megabytes of text to prepare")
    args = parser.parse_args()
    try:
        import datasets  # noqa: F401
    except ImportError:
        sys.exit("the classic recipe needs the `datasets` package: pip install datasets")

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        path = tmp_path / "data.txt"
        size, lines = write_corpus(path, args.mb)
        Tokenizer().save_pretrained(tmp_path / "tokenizer")
        print(f"text: {size / 1e6:.1f} MB, {lines:,} lines of pydocs documents (Python {platform.python_version()}),"
              f" {os.cpu_count()} CPU cores")
        results = {"classic": classic(path, tmp_path / "tokenizer", tmp_path / "hf-cache"),
                   "minigpt2": ours(path, tmp_path / "prepared")}
    print(f"{'pipeline':<10}{'seconds':>9}{'text tokens':>13}{'tokens/s':>11}{'tokens on disk':>16}{'padding':>12}")
    for name, r in results.items():
        print(f"{name:<10}{r['seconds']:>9.2f}{r['text_tokens']:>13,}{r['text_tokens'] / r['seconds']:>11,.0f}"
              f"{r['tokens_on_disk']:>16,}{r['padding']:>12,}")
    c, o = results["classic"], results["minigpt2"]
    speedup = (o["text_tokens"] / o["seconds"]) / (c["text_tokens"] / c["seconds"])
    padding = "no padding at all" if o["padding"] == 0 else f"{c['padding'] / o['padding']:.1f}x fewer"
    print(f"minigpt2 / classic: {speedup:.1f}x tokens/s (goal >= 5x); padding tokens on disk: {c['padding']:,} vs "
          f"{o['padding']:,}, {padding} (goal >= 10x fewer)")


if __name__ == "__main__":
    main()
