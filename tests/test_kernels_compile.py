"""The Triton kernels compiled for real GPUs (to cubins, by Triton's compiler and the ptxas shipped with triton),
on this machine, which has none: `kernels.compile_check`.

The interpreter tests in test_kernels.py check the kernels' arithmetic but never lower them to a GPU. These check
what only a GPU compile can: that every autotuning candidate lowers and assembles for Hopper (the H100/H200 the
benchmarks target), and that each kernel's last candidate, which flash_attention.py promises fits everywhere, stays
within the smallest per-block shared memory of the supported cards for every dtype, head size and padding choice.
The kernels must be defined for a GPU, and conftest has switched the interpreter on for this process, so the
compiles run in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kernels.compile_check import SHARED_LIMIT, SMALLEST_SHARED_LIMIT, Compiled, problems

ROOT = Path(__file__).resolve().parents[1]


def compile_check(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton's own default, stated to keep its warning out of the log
    done = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--json", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    results = [json.loads(line) for line in done.stdout.splitlines()]
    failed = [r for r in results if r["error"]]
    assert not failed, f"kernels failed to compile: {failed}"
    assert done.returncode == 0, done.stderr
    return results


def test_every_autotuning_candidate_compiles_and_fits_on_hopper():
    results = compile_check("--arch", "90", "--dtypes", "fp16", "bf16", "--head_dims", "64", "--padding", "no")
    kernels = {r["kernel"] for r in results}
    assert kernels == {"forward", "backward delta", "backward dk/dv", "backward dq"}
    assert len(results) == 2 * (6 + 1 + 5 + 5)  # two dtypes x every candidate of every kernel
    too_big = [r for r in results if r["shared"] > SHARED_LIMIT[90]]
    assert not too_big, f"candidates that an H100/H200 cannot launch: {too_big}"
    assert all(r["shared"] > 0 and 0 < r["registers"] <= 255 for r in results if r["kernel"] != "backward delta")


def test_last_candidates_fit_the_smallest_card_for_every_variant():
    results = compile_check("--arch", "80", "--dtypes", "fp16", "bf16", "fp32", "--head_dims", "64", "128",
                            "--padding", "yes", "--last_only")
    assert len(results) == 4 * 3 * 2  # kernels x dtypes x head sizes, one candidate each
    too_big = [r for r in results if r["shared"] > SMALLEST_SHARED_LIMIT]
    assert not too_big, f"fallback candidates over {SMALLEST_SHARED_LIMIT} bytes of shared memory: {too_big}"


def test_problems_name_compile_errors_and_variants_with_no_fitting_candidate():
    ok = Compiled("forward", 90, "fp16", 64, False, "a", last_config=False, shared=1000, registers=100)
    broken = Compiled("forward", 90, "bf16", 64, False, "a", last_config=True, error="CompilationError: x")
    huge = Compiled("backward dq", 86, "fp32", 128, True, "b", last_config=True, shared=SHARED_LIMIT[86] + 1)
    found = problems([ok, broken, huge])
    assert any("bf16" in line and "CompilationError" in line for line in found)
    assert any("backward dq sm_86 fp32 hs=128" in line and "no candidate fits" in line for line in found)
    assert not any("fp16" in line for line in found)
