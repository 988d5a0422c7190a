"""Training checkpoints: a loadable model plus everything needed to continue the run exactly, with no pickles.

A checkpoint is a directory `<out>/checkpoint-<step>`:

    config.json, model.safetensors,        the model, as save_pretrained writes it: transformers, sample.py and
    generation_config.json                 `--init DIR` load it like any Hub checkpoint
    training_state.json                    the training state's numbers and names: step, config, metrics, data
                                           cursor, loss-scaler state, optimizer step counts, Python's RNG state
    training_state.safetensors             the training state's tensors: AdamW moments, torch/CUDA/numpy RNG states

Why no pickles: unpickling runs arbitrary code, so a pickled checkpoint downloaded from somewhere is a program. Here
tensors go to safetensors and everything else to JSON; `encode_state` splits any nested state into the two, leaving
`{"__tensor__": key}` placeholders in the JSON, and `decode_state` puts it back together.

Why atomic: a run killed while saving (Ctrl-C twice, an out-of-memory kill, a preempted machine) must not destroy
the checkpoint it would resume from. Each checkpoint is written in full into a hidden temporary directory beside
the others, flushed to disk, and only then renamed to its final name; a rename within one file system is atomic, so
a checkpoint directory either exists complete or not at all. Older checkpoints are pruned only after that.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, first_line

PREFIX = "checkpoint-"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
FORMAT = "minigpt2-training-state/1"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_TEMP_PREFIXES = (".tmp-", ".old-")


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint taken after `step` updates (zero-padded, so names sort by step)."""
    return f"{PREFIX}{step:07d}"


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step of a checkpoint directory named by checkpoint_name."""
    return int(_NAME.match(Path(path).name).group(1))


def missing_files(path: str | os.PathLike[str]) -> list[str]:
    """The files of a complete training checkpoint (model config and training state) that `path` lacks."""
    path = Path(path)
    return [name for name in ("config.json", STATE_JSON, STATE_TENSORS)
            if not (path / name).is_file()]


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True if `path` is a complete training checkpoint (model files and training state)."""
    return not missing_files(path)


def newest_checkpoint_folder(out_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint-<step> folder with the highest step in `out_dir`, complete or not (files deleted by hand), or
    None. Saves are atomic, so an incomplete one is never what a run left."""
    out = Path(out_dir)
    found = [p for p in out.iterdir() if _NAME.match(p.name) and p.is_dir()] if out.is_dir() else []
    return max(found, key=checkpoint_step, default=None)


def list_checkpoints(out_dir: str | os.PathLike[str]) -> list[Path]:
    """The complete checkpoints in `out_dir`, oldest (lowest step) first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if _NAME.match(p.name) and is_checkpoint(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the highest step in `out_dir`, or None."""
    checkpoints = list_checkpoints(out_dir)
    return checkpoints[-1] if checkpoints else None


def remove_stale_temporaries(out_dir: str | os.PathLike[str]) -> None:
    """Clean up after a run killed while saving: delete half-written checkpoints (.tmp-*), and put back a replaced
    one (.old-*) whose replacement never arrived."""
    out = Path(out_dir)
    if not out.is_dir():
        return
    for path in out.iterdir():
        if not (path.is_dir() and path.name.startswith(_TEMP_PREFIXES) and path.name[5:].startswith(PREFIX)):
            continue
        original = out / path.name[5:].rsplit("-", 1)[0]
        if path.name.startswith(".old-") and not original.exists():
            os.replace(path, original)
        else:
            shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(out_dir: str | os.PathLike[str], step: int, model: torch.nn.Module,
                    state: dict[str, Any]) -> Path:
    """Write `model` and the training `state` to `out_dir`/checkpoint-<step>, atomically; return its path.

    `model` must have `save_pretrained(directory)` (a GPT, not its DDP or torch.compile wrapper). `state` is any
    nesting of dicts (string keys), lists, numbers, strings, None, torch tensors and numpy arrays.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = out / name
    staging = out / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    old = None
    try:
        model.save_pretrained(staging)
        json_part, tensors = encode_state(state)
        save_tensors(tensors, staging / STATE_TENSORS, metadata={"format": FORMAT})
        # The JSON goes last: a directory holding it has every other file complete.
        (staging / STATE_JSON).write_text(json.dumps({"format": FORMAT, **json_part}, indent=1) + "\n")
        _fsync_directory_tree(staging)
        if final.exists():  # saving the same step again: move the old one aside first, delete it after
            old = out / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(staging, final)
        _fsync(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def copy_checkpoint_folder(source: str | os.PathLike[str], out_dir: str | os.PathLike[str], step: int) -> Path:
    """Copy the checkpoint `source` into `out_dir` as checkpoint-<step>, atomically as save_checkpoint writes one;
    return its path."""
    out = Path(out_dir)
    final = out / checkpoint_name(step)
    staging = out / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(source, staging)
        _fsync_directory_tree(staging)
        os.replace(staging, final)
        _fsync(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def load_training_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The training state saved in `checkpoint` (tensors on the CPU), with every part that resuming reads checked
    (see `_check_resumable`). CheckpointError, naming the file, if it is missing, unreadable or damaged."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not is_checkpoint(path):
        raise CheckpointError(f"{path}: not a training checkpoint (it needs config.json, {STATE_JSON} and "
                              f"{STATE_TENSORS}); to start from its weights without the training state, use "
                              "--init instead of --resume")
    json_part = _read_state_json(path)
    try:
        tensors = load_tensors(path / STATE_TENSORS)
    except OSError as exc:
        raise unreadable(path / STATE_TENSORS, exc, "resume from another checkpoint") from None
    except SafetensorError as exc:
        raise _damaged(path / STATE_TENSORS, f"not a safetensors file: {exc}") from None
    try:
        state = decode_state(json_part, tensors)
    except KeyError as exc:  # a {"__tensor__": key} placeholder whose tensor is not in the tensor file
        raise _damaged(path / STATE_JSON, f"its tensor {exc} is not in {STATE_TENSORS}") from None
    _check_resumable(state, path / STATE_JSON)
    return state


def read_saved_config(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The TrainConfig settings a checkpoint was written with (from its JSON only; no tensors are read)."""
    return _need(_read_state_json(Path(checkpoint)), "config", _OBJECT, Path(checkpoint) / STATE_JSON)


def _read_state_json(checkpoint: Path) -> dict[str, Any]:
    """The JSON half of `checkpoint`'s training state, without its "format" tag, which must be FORMAT."""
    file = checkpoint / STATE_JSON
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise unreadable(file, exc, "resume from another checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(file, f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _damaged(file, f"{_describe(data)} instead of an object")
    if data.pop("format", None) != FORMAT:
        raise CheckpointError(f"{file}: unknown format; expected {FORMAT}")
    return data


# The kinds of value a training state holds, as (types, name in messages). No part takes a bool, which Python
# counts as an int.
_INT = ((int,), "an integer")
_NUMBER = ((int, float), "a number")
_OBJECT = ((dict,), "an object")
_LIST = ((list,), "a list")
_TENSOR = ((torch.Tensor,), "a tensor")


def _check_resumable(state: dict[str, Any], file: Path) -> None:
    """Refuse a training state that resuming could not use: every part that Trainer._restore reads, or passes to
    the optimizer, the data loader and `set_rng_state`, must be there with the right kind of value. A damaged or
    hand-edited file is then reported by name, not as a KeyError or TypeError halfway through setting up the run."""
    step = _need(state, "step", _INT, file)
    if step < 0:
        raise _damaged(file, f'"step" is {step}, not an integer >= 0')
    _need(state, "config", _OBJECT, file)
    optimizer = _need(state, "optimizer", _OBJECT, file)
    for name in optimizer:
        moments = _need(optimizer, name, _OBJECT, file, f"optimizer.{name}")
        _need(moments, "step", _INT, file, f"optimizer.{name}.step")
        _need(moments, "exp_avg", _TENSOR, file, f"optimizer.{name}.exp_avg")
        _need(moments, "exp_avg_sq", _TENSOR, file, f"optimizer.{name}.exp_avg_sq")
    data = _need(state, "data", _OBJECT, file)
    for key in ("seed", "step", "epoch", "position"):
        if _need(data, key, _INT, file, f"data.{key}") < 0:
            raise _damaged(file, f'"data.{key}" is {data[key]}, not an integer >= 0')
    rngs = _need(state, "rng", _LIST, file)
    for i in range(len(rngs)):
        rng = _need(rngs, i, _OBJECT, file, f"rng.{i}")
        _need(rng, "python", _LIST, file, f"rng.{i}.python")
        _need(rng, "numpy", _OBJECT, file, f"rng.{i}.numpy")
        _need(rng, "torch", _TENSOR, file, f"rng.{i}.torch")
        _check_generators(rng, file, f"rng.{i}")
    tracker = _need(state, "tracker", _OBJECT, file)
    _need(tracker, "best_val_loss", _NUMBER, file, "tracker.best_val_loss", nullable=True)
    _need(tracker, "best_step", _INT, file, "tracker.best_step", nullable=True)
    _need(tracker, "evals_without_improvement", _INT, file, "tracker.evals_without_improvement")
    # Written by every run, but optional: the trainer has a default for each (no loss scaler, an empty window).
    if state.get("scaler") is not None:
        _need(state, "scaler", _OBJECT, file)
    if "log_window" in state:
        window = _need(state, "log_window", _OBJECT, file)
        for key in ("loss", "finite", "steps", "seconds"):
            _need(window, key, _NUMBER, file, f"log_window.{key}")


def _need(parent: dict | list, key: str | int, kind: tuple[tuple[type, ...], str], file: Path,
          where: str | None = None, nullable: bool = False) -> Any:
    """`parent[key]`, which must be of `kind` (or None if `nullable`); else the file is damaged. `where` names the
    part in the message (default: the key)."""
    where = str(key) if where is None else where
    if isinstance(parent, dict) and key not in parent:
        raise _damaged(file, f'no "{where}"')
    value = parent[key]
    types, name = kind
    if (value is None and nullable) or (isinstance(value, types) and not isinstance(value, bool)):
        return value
    raise _damaged(file, f'"{where}" is {_describe(value)}, not {name}{" or null" if nullable else ""}')


def _describe(value: Any) -> str:
    """A value in a message: a short JSON scalar as written, anything else by its kind."""
    if isinstance(value, (str, int, float, type(None))) and len(json.dumps(value)) <= 40:
        return json.dumps(value)
    if isinstance(value, torch.Tensor):
        return "a tensor"
    return {str: "a long string", dict: "an object", list: "a list"}.get(type(value), type(value).__name__)


def _check_generators(rng: dict[str, Any], file: Path, where: str) -> None:
    """Load each saved generator state into a fresh generator, leaving the global ones alone: a damaged state fails
    here, naming the file, rather than inside random, numpy or torch once the run is set up."""
    for name, load in (("python", lambda saved: random.Random().setstate((saved[0], tuple(saved[1]), saved[2]))),
                       ("numpy", lambda saved: np.random.RandomState().set_state(saved)),
                       ("torch", lambda saved: torch.Generator().set_state(saved))):
        try:
            load(rng[name])
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
            raise _damaged(file, f'"{where}.{name}" is not a generator state: {first_line(exc)}') from None


def _damaged(file: Path, what: str) -> CheckpointError:
    """The error for a training state file whose contents resuming cannot use."""
    return CheckpointError(f"{file}: damaged ({what}); resume from another checkpoint")


def unreadable(file: Path, exc: OSError, otherwise: str) -> CheckpointError:
    """The error for a checkpoint file that exists but cannot be opened or read. Its contents may be fine, so the
    fix is never to delete it: for a permission error, to make it readable; `otherwise` says the other way out."""
    fix = "fix its permissions so that you can read it" if isinstance(exc, PermissionError) else \
        "check the file and its disk"
    return CheckpointError(f"{file}: cannot be read ({exc.strerror or exc}); {fix}, or {otherwise}")


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """safetensors' load_file, except that a file that cannot be opened raises Python's own OSError, which says why
    (PermissionError, ...): safetensors reports every such file as "No such file or directory"."""
    with file.open("rb"):
        pass
    return load_file(file)


def save_tensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, except that a failed write (a full disk, say) raises Python's own OSError naming
    `file`, as any other write does, rather than safetensors' error with the OS's code inside its message."""
    try:
        save_file(tensors, file, metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)|code: (\d+)", str(exc))
        if code is None:
            raise
        number = int(code.group(1) or code.group(2))
        raise OSError(number, os.strerror(number), str(file)) from None


def prune_checkpoints(out_dir: str | os.PathLike[str], keep_last: int, protect: Path | None = None) -> None:
    """Delete all but the `keep_last` (at least 1) newest checkpoints, never `protect` (the best one).

    The newest always stays: it is what a stopped run resumes from.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    checkpoints = list_checkpoints(out_dir)
    doomed = checkpoints[:-keep_last]
    for path in doomed:
        if protect is None or path.resolve() != Path(protect).resolve():
            shutil.rmtree(path)


def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state into a JSON-serialisable part and a flat {key: tensor} dict for safetensors."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj: Any, key: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[key] = obj.detach().to("cpu").contiguous().clone()  # clone: safetensors refuses shared storage
            return {"__tensor__": key}
        if isinstance(obj, np.ndarray):
            # safetensors-for-torch lacks unsigned types wider than 8 bits: widen to int64, record the dtype.
            wide = obj.astype(np.int64) if obj.dtype.kind == "u" and obj.itemsize > 1 else obj
            tensors[key] = torch.from_numpy(np.ascontiguousarray(wide)).clone()
            return {"__tensor__": key, "numpy": str(obj.dtype)}
        if isinstance(obj, dict):
            if not all(isinstance(k, str) for k in obj):
                raise TypeError(f"state keys must be strings, found {list(obj)[:3]} at {key or 'top level'}")
            return {k: encode(v, f"{key}.{k}" if key else k) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [encode(v, f"{key}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, (bool, int, float, str, type(None))):
            return obj
        if isinstance(obj, (np.integer, np.floating)):
            return obj.item()
        raise TypeError(f"cannot store {type(obj).__name__} at {key or 'top level'} in a checkpoint")

    return encode(state, ""), tensors


def decode_state(json_part: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `encode_state` (tuples come back as lists)."""
    if isinstance(json_part, dict):
        if "__tensor__" in json_part:
            tensor = tensors[json_part["__tensor__"]]
            return tensor.numpy().astype(json_part["numpy"]) if "numpy" in json_part else tensor
        return {k: decode_state(v, tensors) for k, v in json_part.items()}
    if isinstance(json_part, list):
        return [decode_state(v, tensors) for v in json_part]
    return json_part


def rng_state() -> dict[str, Any]:
    """Every random number generator a run draws from: Python's, numpy's global one, torch's CPU and CUDA ones."""
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "numpy": np.random.get_state(legacy=False),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by `rng_state` (the CUDA ones only if this process uses CUDA)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the data files were synced already
        pass
    finally:
        os.close(fd)


def _fsync_directory_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(root)
