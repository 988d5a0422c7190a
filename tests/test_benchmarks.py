"""The scripts in benchmarks/ refuse what they cannot measure, with a one-line error: the GPU-only parts where there
is no CUDA GPU, and settings that would time the wrong thing. Nothing else in the suite runs them."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(monkeypatch, script: str, *args: str) -> None:
    """`python benchmarks/SCRIPT ARGS...`, in this process."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their neighbours (contenders.py, generate.py)
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(BENCHMARKS / script), run_name="__main__")


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
