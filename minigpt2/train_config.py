"""TrainConfig: every setting of a training run, in one dataclass.

The dataclass is the single source of truth: `train.py` makes one command-line flag per field (`--max_steps 300`,
or `--max-steps 300`), a TOML file given with `--config` may set any field by the same name, and the resolved
config is printed at the start of a run and saved beside its checkpoints, so a run can always be reproduced or
resumed with the settings it really had. Precedence, lowest first: field defaults < config file < flags.

The defaults fine-tune the 124M-parameter gpt2 on the bundled corpus of Python docstrings in a few minutes on a
laptop CPU: windows of 256 tokens, batches of 4, 100 updates, a short warmup then a cosine decay.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import MAX_SEED
from .config import ATTN_IMPLS, PRESETS, is_preset
from .errors import ConfigError
from .schedule import SCHEDULES

DTYPES = ("auto", "fp32", "bf16", "fp16")
DATA_MODES = ("random", "epoch")
FLOAT32_MAX = 3.4028234663852886e38
MIN_REPORT_TOKENS = 256


@dataclass
class TrainConfig:
    """The settings of one training run; see each field's `help` (also shown by `python train.py --help`)."""

    # What to train, on what, and where it goes.
    init: str = field(default="gpt2", metadata={"help": "starting weights: a Hub id (gpt2, gpt2-medium, ...), "
                      "'scratch' for a random model of --model_preset, or a checkpoint directory"})
    model_preset: str = field(default="tiny", metadata={"help": "model shape for --init scratch: tiny, gpt2, "
                              "gpt2-medium, gpt2-large or gpt2-xl"})
    data: str = field(default="", metadata={"help": "a prepared dataset directory, or a text/JSON/CSV file or folder "
                      "to prepare (cached); empty: the bundled Python-docs corpus"})
    out: str = field(default="out/pydocs-gpt2", metadata={"help": "output directory: checkpoints, metrics.jsonl, "
                     "loss.png, and the final model"})
    resume: str | None = field(default=None, metadata={"help": "continue a run: 'auto' (the latest checkpoint in "
                               "--out, if any) or a checkpoint directory"})
    overwrite: bool = field(default=False, metadata={"help": "replace a previous run in --out (it is deleted once "
                            "the new run has saved its first checkpoint, and put back if it fails before); with "
                            "--resume auto: only when --out holds no checkpoint to resume; with --resume of an "
                            "earlier checkpoint of the run: drop the later ones"})
    # Batches and steps.
    max_steps: int = field(default=100, metadata={"help": "optimizer updates in the whole run"})
    batch_size: int = field(default=4, metadata={"help": "windows per micro-batch, per process"})
    block_size: int = field(default=256, metadata={"help": "tokens per window (at most the model's n_positions)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per update; tokens per update = "
                            "batch_size * block_size * grad_accum * processes"})
    data_mode: str = field(default="random", metadata={"help": "random windows, or epoch (every window once per "
                           "epoch, shuffled)"})
    # Optimizer and schedule.
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    lr_schedule: str = field(default="cosine", metadata={"help": "after warmup: cosine, linear or constant"})
    warmup_steps: int = field(default=10, metadata={"help": "updates of linear warmup"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final learning rate as a fraction of --lr"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decoupled weight decay (not applied to "
                                "biases and LayerNorm)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: no clipping)"})
    dropout: float | None = field(default=None, metadata={"help": "dropout probability for embeddings, attention "
                                  "and residuals (none: keep the checkpoint's)"})
    # Precision and speed.
    dtype: str = field(default="auto", metadata={"help": "auto, fp32, bf16 (autocast) or fp16 (autocast + loss "
                       "scaling, CUDA only); auto: bf16 where fast, else fp16 on older GPUs, else fp32"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available, else cpu), cpu, cuda, cuda:N"})
    attn_impl: str = field(default="sdpa", metadata={"help": "attention: sdpa (torch's fused kernels), triton "
                           "(kernels/, CUDA; attention dropout must be 0), auto (triton on a CUDA GPU when "
                           "installed, for bf16/fp16) or naive (the explicit formula)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model and the loss as one "
                                                  "graph (with DDP, the model alone): a slow start, faster steps"})
    compile_optimizer: bool = field(default=False, metadata={"help": "torch.compile AdamW's update into one pass "
                                    "per weight: about 3x faster than the default update on a CPU (seconds at the "
                                    "first step); on a GPU, one kernel launch per weight"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward "
                                         "pass: less memory, about a third more compute"})
    # Evaluation, checkpoints, stopping.
    eval_interval: int = field(default=50, metadata={"help": "evaluate and checkpoint every N updates (and at the "
                               "end); 0: only at the end"})
    eval_batches: int | None = field(default=10, metadata={"help": "validation batches per evaluation (none: the "
                                     "whole split)"})
    patience: int = field(default=0, metadata={"help": "stop after this many evaluations without a better "
                          "validation loss (0: never stop early)"})
    keep_checkpoints: int = field(default=1, metadata={"help": "latest checkpoints to keep, besides the best (at "
                                  "least 1: the latest is the one --resume continues from)"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many updates in a row skipped "
                               "for a non-finite loss (fp16 overflows that the loss scaler handles do not count)"})
    seed: int = field(default=1337, metadata={"help": "seed of initialisation, data order and dropout"})
    log_interval: int = field(default=10, metadata={"help": "write a metrics.jsonl line every N updates (means "
                              "over them); a run stopped in between keeps the partial window in its checkpoint, "
                              "and the resumed run folds it into its next line"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    # After training (train.py).
    samples: int = field(default=3, metadata={"help": "samples printed when training ends (0: none)"})
    sample_tokens: int = field(default=60, metadata={"help": "new tokens per sample"})
    report: bool = field(default=True, metadata={"help": "write report.html/.md at the end: the starting and the "
                                                         "trained model's perplexity and samples side by side"})
    report_tokens: int = field(default=8192, metadata={"help": "validation tokens scored for the report's "
                                                               "perplexities (0: the whole split; else at least "
                                                               "256)"})

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("init", "data", "out", "resume"):  # a shell expands ~ in a flag, but not in a config file
            value = getattr(self, name)
            if value is not None and value.startswith("~"):
                setattr(self, name, os.path.expanduser(value))
        for name, value in self.to_dict().items():
            if isinstance(value, float) and not math.isfinite(value):  # nan would slip through every `<` below
                raise ConfigError(f"--{name} must be a finite number, got {value}")
        for name in ("lr", "eps", "weight_decay"):  # scalars of the optimizer's float32 arithmetic
            if abs(getattr(self, name)) > FLOAT32_MAX:
                raise ConfigError(f"--{name} {getattr(self, name)} is beyond float32's range (3.4e38), in which the "
                                  "optimizer computes; give a smaller value")
        positive = ("max_steps", "batch_size", "block_size", "grad_accum", "keep_checkpoints", "log_interval",
                    "max_bad_steps", "sample_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}")
        non_negative = ("warmup_steps", "eval_interval", "patience", "samples", "weight_decay", "grad_clip", "eps",
                        "report_tokens")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if 0 < self.report_tokens < MIN_REPORT_TOKENS:  # too few to draw prompts from or to say anything
            raise ConfigError(f"--report_tokens must be 0 (the whole validation split) or at least "
                              f"{MIN_REPORT_TOKENS}, got {self.report_tokens}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be between 0 and 2**64 - 1, got {self.seed}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min_lr_ratio must be between 0 and 1, got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ConfigError(f"--eval_batches must be at least 1 or none, got {self.eval_batches}")
        choices = {"dtype": DTYPES, "lr_schedule": SCHEDULES, "data_mode": DATA_MODES, "attn_impl": ATTN_IMPLS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not is_preset(self.model_preset):
            raise ConfigError(f"--model_preset {self.model_preset!r} is not one of {', '.join(PRESETS)}")
        if not self.out.strip():
            raise ConfigError("--out must name a directory")
        if not self.init.strip():
            raise ConfigError("--init is empty; give a Hub id (gpt2, ...), scratch, or a checkpoint directory")
        # Unset (None), it means a new run; empty, most often an unset shell variable.
        if self.resume is not None and not self.resume.strip():
            raise ConfigError("--resume is empty; give auto or a checkpoint directory, or leave --resume out to start "
                              "a new run")

    def _check_types(self) -> None:
        """Values from a config file arrive as TOML typed them: check them (ints may stand for floats)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            allowed = tuple(t for t in typing.get_args(hint) if t is not type(None)) or (hint,)
            optional = type(None) in typing.get_args(hint)
            if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
                setattr(self, f.name, None)
                continue
            if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                continue
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                names = " or ".join(t.__name__ for t in allowed)
                raise ConfigError(f"{f.name} must be {names}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict (field name -> value)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The resolved settings, one `name = value` line each, for printing at the start of a run."""
        return "\n".join(f"  {key} = {value!r}" for key, value in self.to_dict().items())


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Settings from a TOML file: top-level `name = value` pairs named like TrainConfig fields (dashes allowed).

    Uses tomllib (Python 3.11+) or, on 3.10, its backport `tomli` (a dependency there); ConfigError, naming the
    file, if it is unreadable or sets an unknown name or a bad value.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        import tomli as tomllib
    file = Path(path)
    try:
        # utf-8-sig: editors on Windows start UTF-8 files with a byte-order mark, which TOML does not allow
        data = tomllib.loads(file.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: not a readable TOML file ({exc})") from None
    settings = {key.replace("-", "_"): value for key, value in data.items()}
    if len(settings) < len(data):  # `max_steps` and `max-steps` both: one would be dropped without a word
        twice = next(key for key in data if key.replace("-", "_") != key and key.replace("-", "_") in data)
        raise ConfigError(f"--config {path}: {twice!r} and {twice.replace('-', '_')!r} are the same setting, set "
                          "twice; keep one")
    nested = [key for key, value in settings.items() if isinstance(value, dict)]
    if nested:
        raise ConfigError(f"--config {path}: tables are not supported ([{nested[0]}]); write top-level "
                          "`name = value` lines named like the command-line flags")
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see python train.py --help for the settings"
            raise ConfigError(f"--config {path}: unknown setting {key!r}; {hint}")
    try:
        TrainConfig(**settings)  # every check is of one setting alone, so the file's values can be checked here
    except ConfigError as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    return settings
