"""The scripts in benchmarks/ still run, and refuse what they cannot measure with a one-line error. Nothing else in
the suite runs them, so a change to the library they call would break them unseen. Each CPU benchmark runs here, in
this process, for a tiny model and a step or two (about ten seconds in all on 2 cores), and its table is looked for,
not its figures. Left out: step_parts.py (its head and optimizer are gpt2's, compiled: about a minute on a CPU),
prepare.py's classic side (it needs the `datasets` package), and train.py's classic race and --profile (5 seconds
more, for the same two training loops on padded batches and a torch.profiler listing)."""

from __future__ import annotations

import json
import random
import runpy
import sys
from pathlib import Path

import pytest
import torch
import transformers

from minigpt2 import trainer as trainer_module
from minigpt2.prepare import prepare_dataset

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
WORDS = "the list of values returns a new object when called with an optional key argument".split()


def run_script(monkeypatch, script: str, *args: str) -> None:
    """`python benchmarks/SCRIPT ARGS...`, in this process."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their neighbours (contenders.py, generate.py)
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")


@pytest.fixture
def transformers_logging():
    """train.py quiets transformers for its table; the tests after it get transformers as it was."""
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    yield
    transformers.logging.set_verbosity(verbosity)
    if bars:
        transformers.logging.enable_progress_bar()


@pytest.fixture
def pydocs_corpus(tmp_path, monkeypatch) -> Path:
    """A small stand-in for the bundled corpus (its pydocs.jsonl and the prepared splits), made the default."""
    rng = random.Random(0)
    corpus = tmp_path / "pydocs"
    corpus.mkdir()
    with open(corpus / "pydocs.jsonl", "w", encoding="utf-8") as out:
        for _ in range(120):
            lines = (" ".join(rng.choices(WORDS, k=rng.randint(5, 15))) for _ in range(4))
            out.write(json.dumps({"text": "\n".join(lines)}) + "\n")
    prepare_dataset(corpus / "pydocs.jsonl", corpus, progress=False)
    monkeypatch.setattr(trainer_module, "DEFAULT_CORPUS_DIR", corpus)
    return corpus


def table_rows(text: str, first: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(first)]


def test_forward(monkeypatch, capsys):
    run_script(monkeypatch, "forward.py", "--preset", "tiny", "--batch", "1", "--seq", "8", "--repeats", "1",
               "--device", "cpu")
    out = capsys.readouterr().out
    assert len(table_rows(out, "fp32")) == len(table_rows(out, "bf16")) == 1


def test_generate(monkeypatch, capsys):
    run_script(monkeypatch, "generate.py", "--preset", "tiny", "--prompt", "2", "--new", "2", "--repeats", "1",
               "--dtypes", "fp32")
    out = capsys.readouterr().out
    assert [row.split()[1] for row in table_rows(out, "greedy") + table_rows(out, "beam4")
            + table_rows(out, "sample8")] == ["fp32"] * 3
    assert "greedy step" in out


def test_decode_breakdown(monkeypatch, capsys):
    run_script(monkeypatch, "decode_breakdown.py", "--preset", "tiny", "--repeats", "1")
    out = capsys.readouterr().out
    assert all(table_rows(out, first) for first in ("floor,", "step:", "alternated:", "no", "width"))


def test_train(monkeypatch, capsys, pydocs_corpus, transformers_logging):
    run_script(monkeypatch, "train.py", "--preset", "tiny", "--batch", "1", "--seq", "8", "--steps", "1",
               "--warmup", "1", "--dtypes", "fp32", "--adamw", "waves", "--skip_classic", "--device", "cpu")
    out = capsys.readouterr().out
    assert len(table_rows(out, "fp32")) == 3  # every contender finished its warm-up and has a row


def test_prepare_minigpt2_side(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # what the script sets, undone after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = runpy.run_path(str(BENCHMARKS / "prepare.py"))
    size, lines = script["write_corpus"](tmp_path / "data.txt", 0.02)
    assert size >= 20_000 and lines > 0
    result = script["ours"](tmp_path / "data.txt", tmp_path / "prepared")
    assert result["text_tokens"] > 0 and result["padding"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given where there is no CUDA GPU")
@pytest.mark.parametrize("script, args", [("attention.py", []), ("step_parts.py", ["--device", "cuda"]),
                                          ("train.py", ["--device", "cuda"]), ("forward.py", ["--device", "cuda:0"])])
def test_gpu_benchmarks_say_there_is_no_gpu(monkeypatch, capsys, script, args):
    with pytest.raises(SystemExit) as exit_info:
        run_script(monkeypatch, script, *args)
    message = str(exit_info.value.code) if exit_info.value.code != 2 else capsys.readouterr().err.splitlines()[-1]
    assert "torch.cuda.is_available() is False" in message


@pytest.mark.parametrize("script, args, flag", [
    ("generate.py", ["--workloads", "greedy,beam"], "--workloads"),
    ("generate.py", ["--dtypes", "fp16"], "--dtypes"),
    ("generate.py", ["--new", "1"], "--new"),
    ("train.py", ["--dtypes", "fp16"], "--dtypes"),  # transformers' side would race in fp32
    ("train.py", ["--dtypes", "fp32,auto"], "--dtypes"),  # ours in bf16 where the CPU is faster in it
])
def test_settings_a_benchmark_cannot_measure_are_refused(monkeypatch, capsys, script, args, flag):
    with pytest.raises(SystemExit) as exit_info:
        run_script(monkeypatch, script, *args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"{script}: error: {flag} ")
