"""The training loop: batches in, better weights and checkpoints out.

One update (a "step") of the loop:

    lr = schedule(step)
    x, y = next batch of batch_size * grad_accum windows        (every process draws its own rows of it)
    for each of the grad_accum micro-batches:                    gradient accumulation: a big batch in small pieces
        loss = cross_entropy(model(x_i), y_i) / grad_accum       (autocast to bf16/fp16 if asked)
        loss.backward()                                          gradients add up in .grad
    norm = ||grad||;  clip by max(1, norm / grad_clip)           one bad batch cannot throw the weights far
    AdamW update (skipped if the loss or the gradients are not finite), zero the gradients
    every eval_interval steps: validation loss, checkpoint, early stopping

Several processes (`torchrun --nproc_per_node N train.py ...`, on one machine or many) run data-parallel with
torch's DistributedDataParallel: each process holds a full copy of the model, computes gradients on its own rows of
the batch, and DDP averages the gradients across processes during backward (an all-reduce), so every copy takes the
same update. Averaging N processes' gradients is the same arithmetic as accumulating N micro-batches, which is why a
run on 2 processes matches a run on 1 process with twice the grad_accum (tests/test_train.py). During the first
grad_accum - 1 micro-batches DDP's all-reduce is switched off (`no_sync`): only the sum needs averaging.

Precision. fp32 is the reference. bf16 autocast runs matmuls in bfloat16 while the weights, the optimizer and the
loss stay fp32; bfloat16 has fp32's exponent range, so nothing overflows. fp16 has far less range: small gradients
underflow to zero, so the loss is multiplied by a large factor before backward and the gradients divided by it
before the update (torch's GradScaler); when that overflows, the update is skipped and the factor lowered.

Stopping. Ctrl-C or SIGTERM (what schedulers send before preempting) sets a flag; the loop finishes the current
step, saves a checkpoint and returns, and `train.py` prints how to resume. A second Ctrl-C quits at once. With
several processes the flag is agreed on by all of them at every step, so they stop at the same one.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .cli import resolve_device
from .config import GPTConfig
from .dataset import BatchLoader, PreparedDataset, iter_eval_batches
from .distributed import init_distributed
from .errors import (CheckpointError, ConfigError, DataError, MiniGPT2Error, OtherProcessFailed, OutputFolderError,
                     PrepareOptionError, first_line)
from .evaluate import perplexity_of
from .hub import copy_checkpoint
from .loss import lm_loss
from .model import GPT
from .optim import AdamW, clip_factor, grad_norm, param_groups
from .run_folder import RunFolder, check_output_dir
from .schedule import LRSchedule
from .train_config import TrainConfig
from .tied_gradients import TiedGradient, is_tied

_CHECKOUT = Path(__file__).resolve().parent.parent
# The bundled corpus is built on first use: in <repo>/data/pydocs when running from a source checkout (where
# `python data/prepare.py` puts it too), else in ./data/pydocs.
DEFAULT_CORPUS_DIR = (_CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()) / "data" / "pydocs"


class TrainingError(MiniGPT2Error):
    """Training cannot go on (e.g. the loss stayed non-finite); the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a call to `Trainer.train` ended with.

    stopped_by: None if the run reached max_steps; "early stopping", "stop_after", "SIGINT" or "SIGTERM" otherwise.
    model_dir: where the final (best) model was written as a save_pretrained directory, if the run completed.
    """

    step: int
    out_dir: Path
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_val_loss: float | None
    stopped_by: str | None
    model_dir: Path | None


# bf16 autocast adds casts of weights, activations and gradients around the matmuls: a margin for them.
BF16_SPEEDUP = 1.5


def resolve_dtype(name: str, device: torch.device) -> str:
    """fp32, bf16 or fp16 for `device`; "auto" is the fastest that trains reliably there.

    GPUs: bf16 where supported (Ampere and newer), else fp16 with loss scaling. CPUs: bf16 where this CPU multiplies
    bf16 matrices at least BF16_SPEEDUP times as fast as fp32 ones, else fp32. CPU flags do not tell: with AMX tiles
    bf16 is 3x faster, and a gpt2 step trained 1.6x faster in bf16 on an AMD core with AVX-512 BF16, while an Intel
    core with the same instructions and no AMX ran bf16 autocast slower than fp32 (docs/benchmarks.md). So it is
    timed.
    """
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if bf16_matmul_speedup() >= BF16_SPEEDUP else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("--dtype fp16 needs a CUDA GPU (its loss scaling is built for GPUs); use bf16 or fp32 on "
                          "a CPU")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--dtype bf16 is not supported by this GPU; use fp16 or fp32")
    return name


def bf16_matmul_speedup(repeats: int = 5) -> float:
    """How many times faster this CPU multiplies gpt2-sized matrices in bf16 than in fp32 (best times; ~0.1 s)."""
    generator = torch.Generator().manual_seed(0)  # its own: the run's seeded generators stay untouched
    x = torch.randn(512, 768, generator=generator)  # a batch of 512 tokens through gpt2's MLP
    w = torch.randn(768, 3072, generator=generator)
    pairs = {dtype: (x.to(dtype), w.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(pairs, float("inf"))
    for _ in range(repeats + 1):  # alternated, so that load from elsewhere slows both alike
        for dtype, (a, b) in pairs.items():
            start = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (each process passes seed + its rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_compile_toolchain(device: torch.device, flag: str) -> None:
    """ConfigError unless torch.compile can generate code for `device`: a C++ compiler on a CPU, Triton on a GPU.

    Without one, `flag` (the option that asked for compiling) would fail only at the first step, in a long traceback
    from inside torch.
    """
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError(f"{flag} on a GPU needs Triton (pip install triton), which torch.compile generates "
                              f"its kernels with; install it or leave out {flag}")
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch's layout: the first compile will say what is missing
        return
    try:
        get_cpp_compiler()
    except Exception as exc:  # what it raises for a missing compiler differs between platforms
        raise ConfigError(f"{flag} on a CPU needs a C++ compiler, which torch.compile builds its code with "
                          f"({first_line(exc)}); install g++ or clang++ (on Windows, MSVC), or leave out "
                          f"{flag}") from None


def _with_absolute_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` (TrainConfig.to_dict's) with --data, --init and --out made absolute where they name a local path."""
    settings = dict(settings)
    for name in ("data", "init", "out"):
        value = settings.get(name)
        if value and value != "scratch" and Path(value).exists():
            settings[name] = str(Path(value).resolve())
    return settings


def find_resume_checkpoint(resume: str | None, out: Path) -> Path | None:
    """The checkpoint that --resume names: None (no resume, or "auto" with none in `out` yet), or its path.

    A run's output directory stands for its latest checkpoint.
    """
    if not resume:
        return None
    if resume == "auto":
        _refuse_incomplete(ckpt.newest_checkpoint_folder(out), f"--resume {resume}")
        return ckpt.latest_checkpoint(out)
    path = Path(resume)
    if ckpt.is_checkpoint(path):
        return path
    if not path.exists():
        raise ConfigError(f"--resume {resume}: no such directory; pass a checkpoint directory, or 'auto' for the "
                          "latest one in --out")
    _refuse_incomplete(path if path.name.startswith(ckpt.PREFIX) else ckpt.newest_checkpoint_folder(path),
                       f"--resume {resume}")
    found = ckpt.latest_checkpoint(path)
    if found is None:
        raise ConfigError(f"--resume {resume}: not a training checkpoint, and no checkpoint-* inside it; pass a "
                          "checkpoint directory, or 'auto' for the latest one in --out")
    return found


def _refuse_incomplete(folder: Path | None, where: str, fix: str | None = None) -> None:
    """ConfigError if `folder` is a checkpoint with files deleted by hand, rather than resuming an older one or
    saying there is none: what it lacks, and `fix` (by default: put them back, or start afresh from its weights)."""
    missing = ckpt.missing_files(folder) if folder is not None else []
    if not missing:
        return
    them = "it" if len(missing) == 1 else "them"
    if fix is None:
        fix = f"put {them} back" + ("" if "config.json" in missing else
                                   f", or start a new run from its weights with --init {folder} and another --out")
    raise ConfigError(f"{where}: {folder} lacks {' and '.join(missing)}, so it cannot be resumed; {fix}")


class Trainer:
    """Sets up a run from a TrainConfig (data, model, optimizer, resumed state) and trains it with `train()`.

    Errors the user can fix (bad settings, missing data, an output directory holding another run, an unreachable
    Hub) raise MiniGPT2Error subclasses before anything is written.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.dist = init_distributed(config.device)
        self.device = resolve_device(config.device, self.dist.local_rank, training=True)
        self.out = Path(config.out)
        self.folder = RunFolder(self.out, overwrite=config.overwrite)
        self._check_on_main(self._check_folder)  # fail before loading anything; train() takes the lock
        if config.compile or config.compile_optimizer:
            check_compile_toolchain(self.device, "--compile" if config.compile else "--compile_optimizer")
        self.resume_from = find_resume_checkpoint(config.resume, self.out)
        init_dir = Path(config.init).resolve()
        if self.resume_from is None and init_dir.is_dir() and self.out.resolve() in (init_dir, *init_dir.parents):
            raise ConfigError(f"--out {self.out} holds the --init checkpoint {config.init}: the run would write over "
                              "the model it starts from; choose another --out (or copy the checkpoint elsewhere)")
        # Resuming a checkpoint of another directory starts a new run in --out: it may not replace one there either.
        self.folder.continues = self.resume_from is not None and \
            self.resume_from.resolve().parent == self.out.resolve()
        self._check_on_main(self._check_no_other_run)
        state = ckpt.load_training_state(self.resume_from) if self.resume_from else None
        self.dtype = self._run_dtype(state)
        if state is not None and int(state["step"]) > config.max_steps:
            raise ConfigError(f"--resume: {self.resume_from} is at step {state['step']}, past --max_steps "
                              f"{config.max_steps}; pass a --max_steps above {state['step']} to train further")
        # Its checkpoints reach another --out with the first save, after a step: with none to train, there would be
        # no best model there to end with.
        if state is not None and int(state["step"]) == config.max_steps and not self.folder.continues:
            raise ConfigError(f"--resume: {self.resume_from} is at step {state['step']}, --max_steps "
                              f"{config.max_steps}: nothing left to train into --out {self.out}; pass a --max_steps "
                              f"above {state['step']} to train further")
        # Resuming an earlier checkpoint of the run in --out starts a new line of checkpoints from it: the later
        # ones of the old line would be mixed with them (and pruned in their place), so they go, but only if asked.
        self.later_checkpoints: list[Path] = []
        if self.folder.continues:
            self.later_checkpoints = [path for path in ckpt.list_checkpoints(self.out)
                                      if ckpt.checkpoint_step(path) > int(state["step"])]
        if self.later_checkpoints and self.dist.is_main and not config.overwrite:
            raise ConfigError(f"--resume {config.resume}: {self.out} holds later checkpoints of this run (up to "
                              f"{self.later_checkpoints[-1].name}); pass --overwrite to train on from step "
                              f"{state['step']} and drop them, or --resume auto to continue from the latest")
        seed_everything(config.seed + self.dist.rank)
        self.raw_model = self._load_model(self.resume_from or config.init)  # first: an unreachable Hub fails fast
        self.data = self._load_data()
        self._check_fit()
        self.model = self._wrap_model(self.raw_model)
        self.forward_loss = self._forward_loss()
        self.optimizer = AdamW(param_groups(self.raw_model, config.weight_decay), lr=config.lr,
                               betas=(config.beta1, config.beta2), eps=config.eps,
                               compiled=config.compile_optimizer)
        self.schedule = LRSchedule(config.lr, config.max_steps, config.warmup_steps, config.lr_schedule,
                                   config.lr * config.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == "fp16" else None
        self.loader = BatchLoader(self.data.tokens("train"), config.batch_size * config.grad_accum,
                                  config.block_size, mode=config.data_mode, seed=config.seed,
                                  rank=self.dist.rank, world_size=self.dist.world_size)
        self.step = 0
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0
        self.bad_steps = 0
        # The updates since the last metrics.jsonl line; checkpointed, so a resumed run writes the same lines.
        self.log_window = _empty_window()
        self.last_saved_step: int | None = None
        self.best_elsewhere: Path | None = None  # the best checkpoint, in the folder of a run resumed into --out
        self._stop_signal: str | None = None
        self._files_started = False
        if state is not None:
            self._restore(state)
        elif config.resume == "auto":
            self._log(f"--resume auto: no checkpoint in {self.out} yet; starting a new run")

    # ----------------------------------------------------------------------------------------------- set-up
    def _load_data(self) -> PreparedDataset:
        from .prepare import ensure_prepared

        cfg = self.config
        # One process per machine prepares (or downloads) while the others wait, then they all read the result.
        for turn in ("first", "rest"):
            if (self.dist.local_rank == 0) == (turn == "first"):
                if cfg.data:
                    if not Path(cfg.data).exists():
                        raise DataError(f"--data {cfg.data}: no such file or directory")
                    try:
                        path = ensure_prepared(cfg.data, Path(cfg.data).resolve().parent / ".prepared",
                                               block_size=cfg.block_size)
                    except PrepareOptionError as exc:  # train.py has no data options: they are prepare.py's
                        raise DataError(f"{exc} ({exc.option} is an option of data/prepare.py: run `python "
                                        f"data/prepare.py {cfg.data} --out DIR {exc.option} ...`, then train with "
                                        "--data DIR)") from None
                    except OutputFolderError as exc:  # its fix names prepare's --out, not this command's
                        raise DataError(f"--data {cfg.data}: {exc.reason}, where train.py keeps its prepared copy; "
                                        f"run `python data/prepare.py {cfg.data} --out DIR` with a folder you can "
                                        "write, then train with --data DIR") from None
                else:
                    from .pydocs import default_corpus

                    path = ensure_prepared(default_corpus(DEFAULT_CORPUS_DIR), DEFAULT_CORPUS_DIR,
                                           block_size=cfg.block_size)
            self.dist.barrier()
        return PreparedDataset(path)

    def _load_model(self, source: str | Path) -> GPT:
        cfg = self.config
        overrides: dict[str, float | str] = {"attn_impl": cfg.attn_impl}
        if cfg.dropout is not None:
            overrides.update(embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, resid_pdrop=cfg.dropout)
        if str(source) == "scratch":
            torch.manual_seed(cfg.seed)  # the same initial weights in every process
            model = GPT(GPTConfig.from_preset(cfg.model_preset, **overrides))
            torch.manual_seed(cfg.seed + self.dist.rank)
        else:
            model = None
            for turn in ("first", "rest"):  # one download per machine
                if (self.dist.local_rank == 0) == (turn == "first"):
                    model = self._from_pretrained(str(source), overrides)
                self.dist.barrier()
        if cfg.block_size > model.config.n_positions:
            raise ConfigError(f"--block_size {cfg.block_size} is longer than the model's context of "
                              f"{model.config.n_positions} positions; pass --block_size {model.config.n_positions} "
                              "or less")
        return model.to(self.device).train()

    def _check_fit(self) -> None:
        vocab = self.data.meta.get("tokenizer", {}).get("vocab_size")
        needed = int(vocab) if vocab is not None else int(self.data.tokens("train").max()) + 1
        if needed > self.raw_model.config.vocab_size:
            raise DataError(f"the data uses token ids up to {needed - 1}, but the model's vocabulary has "
                            f"{self.raw_model.config.vocab_size} entries; prepare the data with the model's "
                            "tokenizer")

    @staticmethod
    def _from_pretrained(source: str, overrides: dict[str, float | str]) -> GPT:
        try:
            return GPT.from_pretrained(source, **overrides)
        except CheckpointError as exc:
            if Path(source).exists():
                raise
            raise CheckpointError(f"--init {exc}; to train without the Hub, use --init scratch (a small model from "
                                  "random weights) or --init DIR (a checkpoint directory on this machine)") from None

    def _wrap_model(self, model: GPT) -> torch.nn.Module:
        cfg = self.config
        model.gradient_checkpointing = cfg.gradient_checkpointing
        # The tied table's gradient accumulated in place (tied_gradients.py: about 10% of a CPU fp32 step for
        # gpt2); compile and DDP's gradient buckets need autograd to produce it, so they keep the plain path. It
        # saves page faults, which a GPU's caching allocator does not take, and would bypass the GPU's aligned head.
        plain = cfg.compile or self.dist.enabled or not is_tied(model) or self.device.type != "cpu"
        self.tied_gradient = None if plain else TiedGradient(model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None)
        if cfg.compile and self.dist.enabled:
            model = torch.compile(model)  # DDP's gradient hooks stay outside the compiled region
        return model

    def _forward_loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """(x, y) -> mean loss of the model on one micro-batch; model and loss compiled together with --compile.

        Compiled as one, the cross-entropy fuses into the head's output: for a batch of 16 x 1,024 tokens the logits
        are 16,384 x 50,257 numbers, and in eager mode their fp32 copy, log-softmax and gradient are each a pass
        through 3.3 GB of memory, a sixth of a gpt2 step on a GPU (docs/benchmarks.md).
        """
        def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return lm_loss(self.model(x), y)

        return torch.compile(forward_loss) if self.config.compile and not self.dist.enabled else forward_loss

    def _run_dtype(self, state: dict[str, Any] | None) -> str:
        """--dtype, resolved the same in every process; for "auto", a resumed run keeps the precision it trained in
        (on the same kind of device), so that timing noise cannot switch it halfway."""
        saved = (state or {}).get("precision")
        if self.config.dtype == "auto" and saved and saved["device"] == self.device.type:
            self._log(f"--dtype auto: training in {saved['dtype']}, as the run resumed did")
            return saved["dtype"]
        dtype = self.dist.main_value(resolve_dtype(self.config.dtype, self.device))
        if self.config.dtype == "auto":
            self._log(f"--dtype auto: training in {dtype} on this {self.device.type}")
        return dtype

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        try:
            self.optimizer.load_state_by_name(state["optimizer"])
        except CheckpointError as exc:  # its weights loaded, so the optimizer's part of the state is what is wrong
            raise CheckpointError(f"{self.resume_from / ckpt.STATE_JSON}: {exc}; resume from another "
                                  "checkpoint") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._check_same_batches(state)
        self.loader.load_state_dict(state["data"])
        tracker = state["tracker"]
        self.best_val_loss, self.best_step = tracker["best_val_loss"], tracker["best_step"]
        self.evals_without_improvement = tracker["evals_without_improvement"]
        self.log_window = state.get("log_window", _empty_window())
        # A run resumed into another --out has no checkpoint there yet, and its best one so far is in the folder it
        # came from: copied over with the first save, the new folder holds every checkpoint that it names.
        self.last_saved_step = self.step if self.folder.continues else None
        if not self.folder.continues and self.best_step is not None:
            best = self.resume_from if self.best_step == self.step else \
                self.resume_from.parent / ckpt.checkpoint_name(self.best_step)
            if not ckpt.is_checkpoint(best):
                raise ConfigError(f"--resume {self.config.resume}: the run's best checkpoint so far, {best}, is "
                                  f"missing (a run resumed into another --out copies it there, to end with the best "
                                  f"model); resume it in its own folder, {self.resume_from.parent}, or start a new "
                                  f"run from its weights with --init {self.resume_from}")
            self.best_elsewhere = best
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            ckpt.set_rng_state(rngs[self.dist.rank])
        else:
            self._log(f"note: the checkpoint was written by {len(rngs)} process(es), this run has "
                      f"{self.dist.world_size}; dropout randomness restarts from the seed (data order is exact)")
            seed_everything(self.config.seed + self.dist.rank + self.step)
        self._log(f"resuming from {self.resume_from} at step {self.step}")
        # Compared as saved: the same files named by a relative path (or saved so, before paths were made absolute)
        # are no change.
        was, now = _with_absolute_paths(state["config"]), self._saved_config()
        changed = [f"{name} {value!r} -> {now[name]!r}" for name, value in was.items()
                   if name not in ("resume", "overwrite") and name in now and now[name] != value]
        if changed:  # allowed (a longer run, a lower lr), but worth seeing: the run's record shows only the new ones
            self._log(f"settings changed since that checkpoint: {', '.join(changed)}")

    # ------------------------------------------------------------------------------------------------- loop
    def train(self, stop_after: int | None = None) -> TrainResult:
        """Train until max_steps (or until `stop_after` steps, keeping the schedule of max_steps); checkpoint.

        Returns what happened; raises TrainingError if updates stayed non-finite for max_bad_steps in a row, and
        ConfigError if another run is writing --out, or wrote a run there after this one was set up.
        """
        until = self.config.max_steps if stop_after is None else min(stop_after, self.config.max_steps)
        with self.out_locked():
            return self._train_until(until)

    def _train_until(self, until: int) -> TrainResult:
        set_aside = self._start_files()
        try:
            return self._loop(until, set_aside)
        except BaseException:
            if set_aside is not None and set_aside.exists() and self.dist.is_main:
                self.folder.put_back(set_aside)
                self._log(f"the files that this run was to replace are back in {self.out}")
            raise

    def _loop(self, until: int, set_aside: Path | None) -> TrainResult:
        cfg = self.config
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size * self.dist.world_size
        bar = self._progress_bar()
        stopped_by = None
        window = self.log_window
        with self._signals_caught():
            while self.step < until and stopped_by is None:
                started = time.perf_counter()
                loss, norm, lr, stop_requested = self.train_step()
                seconds = time.perf_counter() - started
                self.step += 1
                if math.isfinite(loss):
                    window["loss"] += loss
                    window["finite"] += 1
                window["steps"] += 1
                window["seconds"] += seconds
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"loss {loss:.3f}, lr {lr:.2e}, {tokens_per_step / seconds:,.0f} tok/s")
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    self._write_window(window, lr, norm, tokens_per_step)
                # A step that was due an evaluation gets it even when a signal stops the run there: otherwise the
                # resumed run would never evaluate that step, and its best checkpoint and patience would differ.
                at_eval = cfg.eval_interval and self.step % cfg.eval_interval == 0
                if at_eval or self.step == cfg.max_steps:
                    stopped_by = self._evaluate_and_track()
                    if stopped_by == "early stopping" and window["steps"]:  # the run ends: its last steps' line
                        self._write_window(window, lr, norm, tokens_per_step)
                    self._save()
                    # A signal during the evaluation stops the run at this step, which is saved, not after another.
                    stop_requested = stop_requested or (stopped_by is None and self._stop_agreed())
                if stopped_by is None and self.step < cfg.max_steps:
                    if stop_requested:
                        stopped_by = self._stop_signal or "a signal in another process"
                    elif self.step == until:
                        stopped_by = "stop_after"
                    if stopped_by is not None and self.last_saved_step != self.step:
                        self._save()
                if set_aside is not None and self.last_saved_step is not None and self.dist.is_main:
                    shutil.rmtree(set_aside, ignore_errors=True)  # the new run has its first checkpoint now
                    set_aside = None
        if bar is not None:
            bar.close()
        model_dir = self._export_best() if stopped_by in (None, "early stopping") else None
        if self.dist.is_main:
            self.folder.plot_loss(log=self._log)
        return TrainResult(self.step, self.out, self._checkpoint_path(self.last_saved_step),
                           self._checkpoint_path(self.best_step), self.best_val_loss, stopped_by, model_dir)

    def _write_window(self, window: dict[str, float], lr: float, norm: float, tokens_per_step: int) -> None:
        """Write the metrics.jsonl line of the updates since the last one (`window`), and start a new window."""
        mean_loss = window["loss"] / window["finite"] if window["finite"] else float("nan")
        self._write_metrics({"step": self.step, "loss": mean_loss, "lr": lr, "grad_norm": norm,
                             "tokens_per_s": tokens_per_step * window["steps"] / window["seconds"],
                             "tokens": self.step * tokens_per_step})
        window.update(_empty_window())

    def _stop_agreed(self) -> bool:
        """Whether a signal has asked any process to stop; every process gets the same answer."""
        flag = torch.tensor(float(self._stop_signal is not None), device=self.device)
        if self.dist.enabled:
            dist.all_reduce(flag)
        return bool(flag.item())

    def train_step(self) -> tuple[float, float, float, bool]:
        """One update of the loop, without logging or checkpoints (what `train` repeats and benchmarks time).

        Returns (mean loss, gradient norm before clipping, learning rate, whether every process should stop now).
        """
        cfg = self.config
        lr = self.schedule(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.loader.next_batch()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        loss_sum = torch.zeros((), device=self.device)
        tied = self.tied_gradient.active() if self.tied_gradient is not None else contextlib.nullcontext()
        with tied:
            for i in range(cfg.grad_accum):
                rows = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
                last = i == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync()
                with sync:
                    with self._autocast():
                        loss = self.forward_loss(x[rows], y[rows])
                    loss_sum += loss.detach()
                    scaled = loss / cfg.grad_accum
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        # One small all-reduce carries both the loss for logging and the stop flag, so that all processes agree.
        shared = torch.stack([loss_sum / cfg.grad_accum, torch.tensor(float(self._stop_signal is not None),
                                                                        device=self.device)])
        if self.dist.enabled:
            dist.all_reduce(shared)
            shared[0] /= self.dist.world_size
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = grad_norm(self.raw_model.parameters())  # the same in every process: grads are averaged
        # One copy to the host for the three numbers: each copy waits for the GPU to finish, leaving it idle
        # until the next work is queued.
        loss, stop, norm = torch.cat([shared, norm.to(shared.device).reshape(1)]).tolist()
        factor = clip_factor(norm, cfg.grad_clip) if cfg.grad_clip > 0 else None
        finite = math.isfinite(loss) and math.isfinite(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer, grad_scale=factor)  # skips the update itself on inf/nan gradients
            self.scaler.update()
        elif finite:
            self.optimizer.step(grad_scale=factor)
        self.optimizer.zero_grad(set_to_none=True)
        self._count_bad_step(finite, loss, norm)
        return loss, norm, lr, stop > 0

    def _count_bad_step(self, finite: bool, loss: float, norm: float) -> None:
        if finite:
            self.bad_steps = 0
            return
        if self.scaler is not None and math.isfinite(loss):
            # fp16 gradients overflowed: the scaler skipped this update and lowered its scale, which is how it
            # finds a scale that fits (a few such steps at the start are normal). Not counted as a bad step.
            warnings.warn(f"step {self.step + 1}: fp16 gradients overflowed; update skipped, loss scale lowered to "
                          f"{self.scaler.get_scale():g}", stacklevel=2)
            return
        self.bad_steps += 1
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
        warnings.warn(f"step {self.step + 1}: {what}; update skipped ({self.bad_steps} in a row)", stacklevel=2)
        if self.bad_steps >= self.config.max_bad_steps:
            where = self._checkpoint_path(self.last_saved_step)
            kept = f"the last good checkpoint is {where}" if where else "no checkpoint was written"
            raise TrainingError(f"{self.bad_steps} updates in a row were skipped because {what}; stopping at step "
                                f"{self.step + 1} ({kept}). {self._divergence_fixes()}")

    def _divergence_fixes(self) -> str:
        """What to try when training diverges: the settings of this run that could be to blame."""
        fixes = [f"a lower --lr (this run: {self.config.lr:g})"]
        if not self.config.grad_clip:
            fixes.append("--grad_clip 1.0")
        if self.dtype == "fp16":
            fixes.append("--dtype bf16 or fp32 instead of fp16")
        return f"Try {', or '.join(fixes)}"

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.dtype == "bf16" else torch.float16)

    # ------------------------------------------------------------------------------------- eval and saving
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss on the validation split (eval_batches batches, spread over all of it)."""
        cfg = self.config
        self.raw_model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of token losses, tokens)
        batches = iter_eval_batches(self.data.tokens("val"), cfg.batch_size, cfg.block_size, cfg.eval_batches)
        for i, (x, y) in enumerate(batches):
            if i % self.dist.world_size != self.dist.rank:
                continue
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                loss = lm_loss(self.raw_model(x), y)
            total += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), device=self.device)])
        if self.dist.enabled:
            dist.all_reduce(total)
        self.raw_model.train()
        return (total[0] / total[1]).item()

    def _saved_config(self) -> dict[str, Any]:
        """The settings that a resumed run takes as its own, with the local paths of --data, --init and --out made
        absolute: it may be resumed from another working directory, where relative ones would name other files or
        none."""
        return _with_absolute_paths(self.config.to_dict())

    def _evaluate_and_track(self) -> str | None:
        """Evaluate, keep track of the best step, and say "early stopping" if patience has run out."""
        val_loss = self.evaluate()
        if not math.isfinite(val_loss):  # the weights overflowed: nothing after this step is worth keeping
            where = self._checkpoint_path(self.last_saved_step)
            kept = f"the last good checkpoint is {where}" if where else "no checkpoint was written"
            raise TrainingError(f"the validation loss at step {self.step} is {val_loss}: the weights have diverged "
                                f"({kept}). {self._divergence_fixes()}")
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step, self.evals_without_improvement = val_loss, self.step, 0
        else:
            self.evals_without_improvement += 1
        self._write_metrics({"step": self.step, "val_loss": val_loss, "val_ppl": perplexity_of(val_loss)})
        self._log(f"step {self.step}: val loss {val_loss:.4f}, perplexity {perplexity_of(val_loss):.6g}"
                  f"{' (best)' if improved else f' (best {self.best_val_loss:.4f} at step {self.best_step})'}")
        patience = self.config.patience
        if patience and self.evals_without_improvement >= patience and self.step < self.config.max_steps:
            self._log(f"early stopping: no better validation loss in {patience} evaluations")
            return "early stopping"
        return None

    def _save(self) -> None:
        """Checkpoint the current step (every process takes part; the main one writes)."""
        rng = ckpt.rng_state()
        rngs = [rng]
        if self.dist.enabled:
            rngs = [None] * self.dist.world_size
            dist.all_gather_object(rngs, rng)  # in-memory exchange between our own processes; files stay pickle-free
        if self.dist.is_main:
            state = {"step": self.step, "config": self._saved_config(), "world_size": self.dist.world_size,
                     "precision": {"dtype": self.dtype, "device": self.device.type},
                     "optimizer": self.optimizer.state_by_name(),
                     "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                     "data": self.loader.state_dict(), "rng": rngs,
                     "tracker": {"best_val_loss": self.best_val_loss, "best_step": self.best_step,
                                 "evals_without_improvement": self.evals_without_improvement},
                     "log_window": dict(self.log_window)}
            ckpt.save_checkpoint(self.out, self.step, self.raw_model, state)
            if self.best_elsewhere is not None and self.best_step != self.step:
                ckpt.copy_checkpoint_folder(self.best_elsewhere, self.out, self.best_step)
            ckpt.prune_checkpoints(self.out, self.config.keep_checkpoints, self._checkpoint_path(self.best_step))
        self.last_saved_step = self.step
        self.best_elsewhere = None
        self.dist.barrier()

    def _export_best(self) -> Path | None:
        """Copy the best checkpoint's model files to the output directory itself: `--init <out>` loads it."""
        best = self._checkpoint_path(self.best_step) or self._checkpoint_path(self.last_saved_step)
        if best is None or not self.dist.is_main:
            return self.out if best is not None else None
        copy_checkpoint(best, self.out)
        return self.out

    def _checkpoint_path(self, step: int | None) -> Path | None:
        return None if step is None else self.out / ckpt.checkpoint_name(step)

    # ---------------------------------------------------------------------------------------------- files
    @contextlib.contextmanager
    def out_locked(self) -> Iterator[None]:
        """Create the output directory and hold its lock for the block (in the main process), so that no other run
        writes there meanwhile. train() holds it by itself; a caller that writes more files of the run afterwards
        (train.py's samples and report) holds it around both."""
        with self.folder.locked() if self.dist.is_main else contextlib.nullcontext():
            yield

    def _check_on_main(self, check: Callable[[], None]) -> None:
        """Run `check` (of the folder, which only the main process writes) in the main process; if it fails there,
        fail in every process, rather than leave the others to crash at the next collective call when it exits.
        The others raise OtherProcessFailed, which the command leaves unprinted: the main process says why."""
        error = None
        if self.dist.is_main:
            try:
                check()
            except MiniGPT2Error as exc:
                error = exc
        failed = self.dist.main_value(error is not None)
        if error is not None:
            raise error
        if failed:
            raise OtherProcessFailed("the main process (rank 0) stopped with an error")

    def _check_folder(self) -> None:
        check_output_dir(self.out)
        self.folder.check_not_busy()
        self.folder.check_nothing_set_aside()

    def _check_same_batches(self, state: dict[str, Any]) -> None:
        """ConfigError naming the flag if this run would not read the batches the resumed one would have read next
        (the loader checks the same, but knows no flags)."""
        saved, now, was = state["data"], self.loader.state_dict(), state["config"]
        where = f"--resume: the run in {self.resume_from}"
        anew = f"or start a new run from its weights with --init {self.resume_from} and another --out"
        if saved.get("block_size") != now["block_size"]:
            raise ConfigError(f"{where} trained on windows of --block_size {saved.get('block_size')}, not "
                              f"{now['block_size']}; keep it, {anew}")
        if saved.get("mode") != now["mode"]:
            raise ConfigError(f"{where} read its data with --data_mode {saved.get('mode')}, not {now['mode']}; keep "
                              f"it, {anew}")
        if saved.get("global_batch") != now["global_batch"]:
            raise ConfigError(
                f"{where} took {saved.get('global_batch')} windows per step (--batch_size {was.get('batch_size')} x "
                f"--grad_accum {was.get('grad_accum')} x {state.get('world_size', 1)} process(es)), and this one "
                f"would take {now['global_batch']} ({self.config.batch_size} x {self.config.grad_accum} x "
                f"{self.dist.world_size}); keep that product, {anew}")
        if saved.get("n_tokens") != now["n_tokens"]:
            raise ConfigError(f"{where} trained on {saved.get('n_tokens')} tokens of training data, and --data "
                              f"{self.config.data} has {now['n_tokens']}; resume with the same data, {anew}")

    def _check_no_other_run(self) -> None:
        """ConfigError if --out holds another run's files (RunFolder.holds_another_run), saying how to go on."""
        config = self.config
        if not self.folder.holds_another_run():
            return
        if not ckpt.list_checkpoints(self.out):
            _refuse_incomplete(ckpt.newest_checkpoint_folder(self.out), f"--out {self.out}",
                               "pass --overwrite to replace the run, or choose another --out")
            if not (self.out / "train_config.json").exists():
                raise ConfigError(f"{self.out} holds a saved model, not a training run; choose another --out (or "
                                  "pass --overwrite to replace the model)")
            raise ConfigError(f"{self.out} holds a training run that ended before its first checkpoint, so there is "
                              "nothing to resume; pass --overwrite to start again there, or choose another --out")
        if self.resume_from is not None:
            raise ConfigError(f"{self.out} already holds a training run that --resume {config.resume} would "
                              "replace; pass --overwrite to replace it, or choose another --out")
        raise ConfigError(f"{self.out} already holds a training run; pass --resume auto to continue it, "
                          "--overwrite to replace it, or choose another --out")

    def _start_files(self) -> Path | None:
        """Set a replaced run aside; remove what a killed save left; write train_config.json; trim metrics.jsonl.

        Returns the folder holding what --overwrite replaces (another run, or the later checkpoints of this one),
        which goes once the new run has its first checkpoint, and comes back if the run fails before then.
        """
        set_aside = None
        if self.dist.is_main:
            if not self._files_started and self.folder.holds_another_run():  # checked again, now under the lock
                raise ConfigError(f"another training run wrote into {self.out} after this one was set up; choose "
                                  "another --out, or start this one again to see how to go on there")
            ckpt.remove_stale_temporaries(self.out)
            if not self._files_started:
                replaced = self.later_checkpoints or self.folder.previous_run_replaced()
                set_aside = self.folder.set_aside(replaced, self._log)
            self.folder.write_config(self.config.to_dict())
            self.folder.trim_metrics(self.step)
        self._files_started = True  # a second train() call continues this run's files
        self.dist.barrier()
        return set_aside

    def _write_metrics(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            self.folder.append_metrics(record)

    # ------------------------------------------------------------------------------------------ interface
    def _progress_bar(self):
        if not (self.config.progress and self.dist.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.config.max_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)

    def _log(self, message: str) -> None:
        if self.dist.is_main:
            from tqdm.auto import tqdm

            try:
                tqdm.write(message, file=sys.stdout)
            except OSError:  # stdout piped into a reader that is gone (`| tee` killed by the same Ctrl-C)
                pass  # a message lost is better than a run lost: training goes on and saves its checkpoint

    @contextlib.contextmanager
    def _signals_caught(self):
        """While training, SIGINT/SIGTERM ask for a clean stop after the current step; a second one quits now."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name
            self._log(f"\n{self._stop_signal} received: finishing this step and saving a checkpoint "
                      "(press Ctrl-C again to quit at once)")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def close(self) -> None:
        """Leave the process group, if this run joined one."""
        self.dist.close()


def _empty_window() -> dict[str, float]:
    return {"loss": 0.0, "finite": 0, "steps": 0, "seconds": 0.0}
