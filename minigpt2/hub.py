"""GPT-2 weights in and out of the Hugging Face Hub's format.

A checkpoint is a directory with `config.json` (transformers' GPT2Config), `model.safetensors` (or shards listed
in `model.safetensors.index.json`) and, optionally, `generation_config.json`: the defaults of `generate()`, which the
model carries as `model.generation_config` (see generation_config.py). Hub ids are fetched with huggingface_hub into
the cache that transformers uses, so a model downloaded by either library is found by the other, and
`HF_HUB_OFFLINE=1` reads that cache only.

The Hub's tensors differ from ours in two ways only:
- OpenAI's code stored the projections as `Conv1D` with weight shape (in, out); nn.Linear keeps (out, in). The four
  projection weights in `TRANSPOSED` are transposed on the way in and out.
- Names may carry a `transformer.` prefix (transformers' save_pretrained) or not (the original upload), and files
  may hold the causal-mask buffers `attn.bias` / `attn.masked_bias`, which are not weights and are skipped.

Weights load as float32 whatever the file stores: fp16 and bf16 values convert exactly, and the model computes in
fp32 until it is cast (`model.to(torch.bfloat16)`) or run under autocast. transformers 5 keeps the file's dtype
instead (config.json's `dtype`), so for a half-precision checkpoint its logits equal ours only when it is loaded with
`dtype=torch.float32`. A save always writes float32.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path

import torch
from safetensors import SafetensorError

from .atomic import removed_if_failed, staging_path
from .checkpoint import latest_checkpoint, load_tensors, save_tensors, unreadable
from .config import HUB_ORG, GPTConfig
from .errors import CheckpointError
from .generation_config import GenerationConfig
from .model import GPT

OFFICIAL = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SKIPPED = re.compile(r"(^|\.)attn\.(bias|masked_bias)$")
# The files of a checkpoint (glob patterns): what a Hub download fetches, and what save_pretrained deletes where it
# does not write them. A large checkpoint is sharded into model-00001-of-00002.safetensors ...
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                    "model-*-of-*.safetensors")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_repo_id(name: str) -> str | None:
    """The Hub repository for `name` (`gpt2` -> `openai-community/gpt2`), or None if it is not a Hub id.

    An `owner/name` must also pass the Hub's own naming rules, so that a relative path such as `./ckpt` or
    `../runs/x` that does not exist is reported as a missing directory, not sent to the Hub.
    """
    if name in OFFICIAL:
        return HUB_ORG + name
    if not _REPO_ID.match(name):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def resolve_checkpoint(name_or_path: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local directory holding the checkpoint: the given one, or the Hub snapshot in the local cache (of
    `revision`, a branch, tag or commit hash; the default branch if None)."""
    path = Path(name_or_path)
    if path.is_dir():
        # transformers ignores the revision here; refused, because a folder that happens to share a Hub id's name
        # would otherwise stand in for the pinned version that was asked for.
        if revision is not None:
            raise CheckpointError(f"{name_or_path}: is a local directory, but revision={revision!r} selects a "
                                  "version of a Hub repository; drop revision, or pass a Hub id")
        return path
    if path.is_file():
        raise CheckpointError(f"{name_or_path}: is a file, but a checkpoint is a directory (config.json beside "
                              "model.safetensors); pass the directory that holds them")
    repo_id = hub_repo_id(str(name_or_path))
    if path.exists() or repo_id is None:
        raise CheckpointError(f"{name_or_path}: no such checkpoint directory, and not a Hub id; pass a directory "
                              f"written by save_pretrained or one of {', '.join(OFFICIAL)}")
    return _download(repo_id, str(name_or_path), revision)


def _download(repo_id: str, name: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        directory = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(CHECKPOINT_FILES)))
    except RevisionNotFoundError:
        raise CheckpointError(f"{name}: {repo_id} on the Hugging Face Hub has no revision {revision!r}; check the "
                              "branch, tag or commit hash") from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise CheckpointError(f"{name}: no such model on the Hugging Face Hub (repository {repo_id}); check the "
                              "spelling or pass a local checkpoint directory") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hub cannot be reached ({type(exc).__name__})"
        which = repo_id if revision is None else f"{repo_id} at revision {revision!r}"
        raise CheckpointError(f"{name}: {why} and {which} is not in the local Hugging Face cache; connect to the "
                              "internet once to download it, or pass a local checkpoint directory") from None
    # A snapshot is returned as the cache holds it, which may be only what another program fetched (a tokenizer's
    # files, say); and a repository whose weights are only a pickle gives a snapshot without weights.
    weights = ("model.safetensors", "model.safetensors.index.json")
    missing = [file for file, present in (("config.json", (directory / "config.json").is_file()),
                                          ("model.safetensors", any((directory / w).is_file() for w in weights)))
               if not present]
    if missing:
        raise CheckpointError(f"{name}: the local Hugging Face cache's snapshot of {repo_id} ({directory}) has no "
                              f"{' and no '.join(missing)}: either only some of its files were downloaded, so connect "
                              "to the internet once to download it, or the repository has none (minigpt2 reads "
                              "safetensors weights only, never pickles such as pytorch_model.bin), so choose another "
                              "model or pass a local checkpoint directory")
    return directory


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding the weights: model.safetensors, or else the shards its index lists.

    The single file wins where both exist, as in transformers, so that both libraries read the same weights from any
    directory (save_pretrained leaves both only while it replaces one layout with the other).
    """
    file = directory / "model.safetensors"
    if file.is_file():
        return [file]
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        hint = " (pytorch_model.bin is not read: minigpt2 never loads pickles)" \
            if (directory / "pytorch_model.bin").exists() else ""
        raise CheckpointError(f"{file}: missing{hint}; save the checkpoint with safetensors "
                              "(save_pretrained(..., safe_serialization=True))")
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise CheckpointError(f"{index}: has no \"weight_map\" object (tensor name -> shard file name); restore the "
                              "file or save the model again")
    files = [directory / shard for shard in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: missing, but {index.name} lists it as a shard of the weights; copy it "
                                  "from where the checkpoint came from, or save the model again")
    return files


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        try:
            loaded = load_tensors(file)
        except OSError as exc:  # a file we cannot open is not corrupt: the advice below would delete it
            raise unreadable(file, exc, "copy the checkpoint again") from None
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc}); the download or copy is "
                                  "probably corrupted: delete it and download or save again") from None
        for name, tensor in loaded.items():
            # Refused here, before any tensor is compared: NaN equals nothing, so a NaN embedding would otherwise
            # be reported as an untied head. The mask buffers are not weights and are dropped unchecked.
            if not SKIPPED.search(name) and not torch.isfinite(tensor).all():
                raise CheckpointError(f"{file}: tensor {name!r} holds NaN or inf values; the checkpoint is corrupt "
                                      "or from a diverged run; use an earlier checkpoint")
        tensors.update(loaded)
    return tensors


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise unreadable(file, exc, "copy the checkpoint again") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: invalid JSON ({exc}); restore the file or save the model again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(data).__name__}, not an object of settings; restore the "
                              "file or save the model again")
    return data


def generation_settings_file(directory: Path) -> Path:
    """The file a checkpoint directory's generate() defaults come from: its generation_config.json, or, as
    transformers falls back to when that is missing, its config.json."""
    file = directory / "generation_config.json"
    return file if file.is_file() else directory / "config.json"


def _read_generation_config(directory: Path, hf_config: dict) -> GenerationConfig:
    """The checkpoint's generate() defaults, from `generation_settings_file`."""
    file = generation_settings_file(directory)
    if file.name == "generation_config.json":
        return GenerationConfig.from_hub_dict(_read_json(file), source=str(file))
    return GenerationConfig.from_model_config(hf_config, source=str(file))


def load_pretrained(name_or_path: str | os.PathLike[str], revision: str | None = None, **config_overrides) -> GPT:
    """Build a GPT from a Hub id (at `revision`: a branch, tag or commit hash; the default branch if None) or a
    save_pretrained directory (see the module docstring)."""
    directory = resolve_checkpoint(name_or_path, revision)
    config_file = directory / "config.json"
    if not config_file.is_file():
        # A training run's output folder gets its final model only when the run completes (see trainer.py).
        latest = latest_checkpoint(directory)
        if latest is not None:
            raise CheckpointError(f"{directory}: holds training checkpoints but no final model (the run stopped "
                                  f"before saving it); pass the latest checkpoint, {latest}, instead")
        raise CheckpointError(f"{config_file}: missing; a checkpoint directory needs config.json beside its weights")
    hf_config = _read_json(config_file)
    config = GPTConfig.from_hf_dict(hf_config, source=str(config_file), **config_overrides)
    generation_config = _read_generation_config(directory, hf_config)
    tensors = _read_tensors(directory)

    with torch.device("meta"):
        model = GPT(config)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for raw_name, tensor in tensors.items():
        name = raw_name.removeprefix("transformer.")
        if SKIPPED.search(name):
            continue
        name = name if name == "lm_head.weight" else f"transformer.{name}"
        if name not in expected:
            raise CheckpointError(f"{directory}: unexpected tensor {raw_name!r}, not a weight of GPT-2's language "
                                  "model (another task's head, or a layer config.json does not count); for a head, "
                                  "save the language model alone and load that (in transformers: GPT2LMHeadModel."
                                  "from_pretrained(dir).save_pretrained(new_dir))")
        # Compared as stored, before the transpose: t() of a tensor of more than two dimensions is an error.
        transposed = name.endswith(TRANSPOSED)
        implied = expected[name].shape[::-1] if transposed else expected[name].shape
        if tensor.shape != implied:
            raise CheckpointError(f"{directory}: tensor {raw_name!r} has shape {tuple(tensor.shape)} but config.json "
                                  f"implies {tuple(implied)}; config and weights do not belong together")
        state[name] = (tensor.t() if transposed else tensor).float().contiguous()
    # The head is tied to the token embedding; files usually omit it, and where present it must be the same tensor.
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    missing = [name for name in expected if state.get(name) is None]
    if missing:
        raise CheckpointError(f"{directory}: missing tensors {', '.join(missing[:4])}"
                              f"{' ...' if len(missing) > 4 else ''}; the weights file is incomplete")
    if not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]):
        raise CheckpointError(f"{directory}: lm_head.weight differs from wte.weight, but GPT-2 ties them")
    model.load_state_dict(state, assign=True)
    model.lm_head.weight = model.transformer.wte.weight
    model.generation_config = generation_config
    return model.eval()


def save_pretrained(model: GPT, directory: str | os.PathLike[str]) -> None:
    """Write `model` as a Hub checkpoint that transformers' GPT2LMHeadModel.from_pretrained loads, with the
    `generate()` defaults it carries (`model.generation_config`) as generation_config.json.

    The files are replaced as a set, not one by one as they are serialised: all of them are written into a hidden
    staging folder on the same file system first, and renamed into place only then, so a save that fails (an error,
    Ctrl-C) leaves `directory` as it was. A directory that does not exist yet is staged whole and appears in one
    rename, complete. In an existing one, each file is renamed over its old version, config.json last: every loader
    starts from config.json, so an empty directory whose save is killed during those few renames is refused, not
    loaded incomplete; over an earlier checkpoint, those renames are the only moment that can mix two saves. Files
    of the checkpoint format that this save does not write, such as an earlier save's shards and their index, are
    deleted once the new files are in place; other files (a README, a tokenizer's) stay. Only a save killed outright
    (SIGKILL, a power cut) leaves something behind: its hidden `.tmp-...` staging folder, which the next save to the
    same directory on the same machine deletes.
    """
    _write_checkpoint(Path(directory), _checkpoint_files(model))


def copy_checkpoint(source: str | os.PathLike[str], directory: str | os.PathLike[str]) -> None:
    """Copy the checkpoint saved in `source` (by save_pretrained) to `directory`, replacing its files as a set as
    save_pretrained does: a copy that fails leaves `directory` as it was."""
    names = ("model.safetensors", "generation_config.json", "config.json")  # save_pretrained's files, in its order
    files = {name: lambda path, name=name: shutil.copyfile(Path(source) / name, path) for name in names}
    _write_checkpoint(Path(directory), files)


def _write_checkpoint(out: Path, files: dict[str, Callable[[Path], object]]) -> None:
    """Write `files` (name -> how to write it into a path) as the checkpoint in `out` (see save_pretrained)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: is a file, but a checkpoint is a directory; pass the path of a directory (it "
                              "is created if missing)")
    if out.exists():
        _replace_files(out, files)
    else:
        _create_directory(out, files)


def _checkpoint_files(model: GPT) -> dict[str, Callable[[Path], object]]:
    """How to write each file of `model`'s checkpoint into a given path, by file name, in the order they are put in
    place (config.json last, see save_pretrained)."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight; transformers re-ties it on load
        if name.endswith(TRANSPOSED):
            tensor = tensor.t()
        tensors[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    hf_config = model.config.to_hf_dict()
    # bos_token_id is config.json's: it is what transformers starts from when generating without a prompt.
    generation = {"bos_token_id": hf_config["bos_token_id"], **model.generation_config.to_hub_dict()}
    return {
        "model.safetensors": lambda path: save_tensors(tensors, path, metadata={"format": "pt"}),
        "generation_config.json": lambda path: path.write_text(json.dumps(generation, indent=2) + "\n",
                                                               encoding="utf-8"),
        "config.json": lambda path: path.write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8"),
    }


def _create_directory(out: Path, files: dict[str, Callable[[Path], object]]) -> None:
    """Stage `out` whole beside where it goes, then rename it there; parent folders created for it are removed again
    if that fails."""
    with removed_if_failed(out.parent), _staging_folder(out.parent, out.name, out) as staging:
        for name, write in files.items():
            write(staging / name)
        os.replace(staging, out)


def _replace_files(out: Path, files: dict[str, Callable[[Path], object]]) -> None:
    """Stage the files inside `out`, rename each over its old version, then delete what is left of an earlier save."""
    with _staging_folder(out, "save", out) as staging:
        for name, write in files.items():
            write(staging / name)
        for name in files:
            os.replace(staging / name, out / name)
    for path in out.iterdir():
        stale = path.name not in files and any(fnmatch(path.name, pattern) for pattern in CHECKPOINT_FILES)
        if stale and path.is_file():
            path.unlink()


@contextlib.contextmanager
def _staging_folder(parent: Path, name: str, out: Path) -> Iterator[Path]:
    """A new hidden folder in `parent` (created with its missing parents; see atomic.staging_path) for the files of
    a save to `out`. On the way out it is deleted with whatever it still holds: every file if the save failed, none
    once they were moved into place."""
    staging = staging_path(parent, name)
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise CheckpointError(f"{out}: cannot save a checkpoint there ({exc.strerror}); choose a directory you can "
                              "write to") from None
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
