"""Weights in and out of the Hub format: transformers writes, we read; we write, transformers reads."""

from __future__ import annotations

import errno
import functools
import json
import operator
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig as HFGenerationConfig
from transformers import GPT2Config, GPT2DoubleHeadsModel, GPT2LMHeadModel

from minigpt2 import GPT, CheckpointError, ConfigError, GPTConfig
from minigpt2.checkpoint import load_training_state, read_saved_config, rng_state, save_checkpoint
from minigpt2.dataset import BatchLoader
from minigpt2.hub import CHECKPOINT_FILES, TRANSPOSED, copy_checkpoint
from minigpt2.optim import AdamW, param_groups


def logits_of(model, seed=0, T=24):
    torch.manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (2, T))
    with torch.no_grad():
        return x, model(x)


def test_minigpt2_save_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=64,
                         initializer_range=0.2)).eval()
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    ref = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x, logits = logits_of(ours)
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
    back = GPT.from_pretrained(tmp_path)
    assert torch.equal(logits_of(back)[1], logits)


def test_transformers_save_round_trips_through_minigpt2(hf_checkpoint, tmp_path):
    path = hf_checkpoint()
    ref = GPT2LMHeadModel.from_pretrained(path).eval()
    GPT.from_pretrained(path).save_pretrained(tmp_path)
    again = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_original_openai_layout_loads(hf_checkpoint, tmp_path):
    """The Hub's gpt2 files: no `transformer.` prefix, attention mask buffers stored, lm_head present or not."""
    path = hf_checkpoint()
    tensors = load_file(path / "model.safetensors")
    original = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    n_pos = json.loads((path / "config.json").read_text())["n_positions"]
    for layer in range(2):
        original[f"h.{layer}.attn.bias"] = torch.ones(1, 1, n_pos, n_pos).tril()
        original[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    original["lm_head.weight"] = original["wte.weight"].clone()
    save_file(original, tmp_path / "model.safetensors")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    _, expected = logits_of(GPT.from_pretrained(path))
    assert torch.equal(logits_of(GPT.from_pretrained(tmp_path))[1], expected)


@pytest.mark.parametrize("dtype, shard", [(torch.float32, "40KB"), (torch.float16, None), (torch.bfloat16, "40KB")])
def test_sharded_and_half_precision_checkpoints(tmp_path, dtype, shard):
    """Odd widths (head size 8, n_inner not 4 * n_embd), fp16/bf16 weights, and shards: only the files a Hub download
    keeps (huggingface_hub's own filter over CHECKPOINT_FILES) are left, and the logits equal transformers'."""
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=5, n_embd=40, n_inner=72, vocab_size=300, n_positions=32,
                                     initializer_range=0.2, bos_token_id=0, eos_token_id=0)).to(dtype).eval()
    ref.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    written = sorted(p.name for p in tmp_path.iterdir())
    fetched = set(filter_repo_objects(written, allow_patterns=list(CHECKPOINT_FILES)))
    for name in set(written) - fetched:
        (tmp_path / name).unlink()
    if shard:
        shards = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())
        assert len(shards) > 1 and shards <= fetched
    model = GPT.from_pretrained(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # as hub.py says: transformers keeps `dtype`
    assert GPT2LMHeadModel.from_pretrained(tmp_path).dtype == dtype
    x, logits = logits_of(model)
    with torch.no_grad():
        expected = ref.float()(x).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("setting", [dict(scale_attn_by_inverse_layer_idx=True), dict(reorder_and_upcast_attn=True),
                                     dict(activation_function="relu"), dict(activation_function="gelu"),
                                     dict(scale_attn_weights=False), dict(tie_word_embeddings=False)])
def test_variants_we_do_not_implement_are_refused(tmp_path, setting):
    """Each of these changes transformers' logits; loading one as plain GPT-2 would silently compute another model."""
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=16, bos_token_id=0,
                               eos_token_id=0, **setting)).save_pretrained(tmp_path)
    [(key, value)] = setting.items()
    with pytest.raises(CheckpointError, match=rf"config\.json: {key}={value!r} is not supported"):
        GPT.from_pretrained(tmp_path)


def test_gelu_under_torchs_name_for_the_tanh_approximation_loads(tmp_path):
    """activation_function="gelu_pytorch_tanh" is GPT-2's own GELU computed by torch's kernel: it loads, to
    transformers' logits, where it was refused as unsupported."""
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=48, vocab_size=300, n_positions=32,
                                     initializer_range=0.2, bos_token_id=0, eos_token_id=0,
                                     activation_function="gelu_pytorch_tanh")).eval()
    ref.save_pretrained(tmp_path)
    x, logits = logits_of(GPT.from_pretrained(tmp_path))
    with torch.no_grad():
        expected = ref(x).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("alias, name", [("num_attention_heads", "n_head"), ("hidden_size", "n_embd"),
                                         ("num_hidden_layers", "n_layer"), ("max_position_embeddings", "n_positions")])
def test_config_json_with_transformers_other_names_for_a_field(tmp_path, alias, name):
    """GPT2Config reads hidden_size as n_embd, and so on (its attribute_map). A head count under its other name was
    ignored: 2 heads loaded as the default 12, which divides n_embd=48 too, and no tensor's shape told."""
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=48, vocab_size=300, n_positions=32,
                                     initializer_range=0.2, bos_token_id=0, eos_token_id=0)).eval()
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[alias] = config.pop(name)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert getattr(GPT2LMHeadModel.from_pretrained(tmp_path).config, name) == config[alias]
    x, logits = logits_of(GPT.from_pretrained(tmp_path))
    with torch.no_grad():
        expected = ref(x).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    config[name] = config[alias] + 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config\.json: {name}={config[name]} and its other name "
                                              rf"{alias}={config[alias]} disagree; keep the right one"):
        GPT.from_pretrained(tmp_path)


def test_weights_use_conv1d_layout_on_disk(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=16))
    ours.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    for suffix in TRANSPOSED:
        name = f"transformer.h.0.{suffix}"
        assert torch.equal(tensors[name], ours.state_dict()[name].t())
    assert "lm_head.weight" not in tensors


def test_generation_config_round_trips_through_minigpt2(tmp_path):
    """transformers writes a generation_config.json, minigpt2 loads and saves the model, transformers reads back the
    same settings. bos_token_id is config.json's, as in every GPT-2 checkpoint: minigpt2 writes config.json's."""
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50257, n_positions=64))
    ref.generation_config = HFGenerationConfig(
        bos_token_id=50256, eos_token_id=[3, 50256], pad_token_id=7, max_new_tokens=7, min_new_tokens=2,
        do_sample=True, temperature=0.8, top_k=12, top_p=0.9, min_p=0.05, typical_p=0.95, repetition_penalty=1.3,
        no_repeat_ngram_size=3, num_beams=4, length_penalty=0.5, early_stopping="never", num_return_sequences=2,
        stop_strings=["\n\n"])
    ref.save_pretrained(tmp_path / "hf")
    model = GPT.from_pretrained(tmp_path / "hf")
    assert model.generation_config.eos_token_id == [3, 50256] and model.generation_config.top_k == 12
    model.save_pretrained(tmp_path / "ours")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "ours").generation_config
    ignore = {"transformers_version", "_from_model_config"}
    expected = {k: v for k, v in ref.generation_config.to_dict().items() if k not in ignore}
    assert {k: v for k, v in back.to_dict().items() if k not in ignore} == expected


def write_generation_config(hf_checkpoint, tmp_path, settings) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint(), target)
    (target / "generation_config.json").write_text(json.dumps(settings))
    return target


def test_generation_settings_at_transformers_defaults_are_accepted(hf_checkpoint, tmp_path):
    """Older transformers wrote every setting out; those minigpt2 lacks are harmless at transformers' default, and
    those about outputs, caching or metadata never change the tokens."""
    path = write_generation_config(hf_checkpoint, tmp_path, dict(
        min_length=0, num_beam_groups=1, diversity_penalty=0.0, bad_words_ids=None, encoder_no_repeat_ngram_size=0,
        output_scores=True, return_dict_in_generate=True, use_cache=True, bos_token_id=50256, eos_token_id=50256,
        _from_model_config=True, transformers_version="4.26.0", top_k=7))
    config = GPT.from_pretrained(path).generation_config
    assert (config.eos_token_id, config.top_k) == (50256, 7)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(min_length=12), r"min_length=12 is not supported"),
    (dict(bad_words_ids=[[5]]), r"bad_words_ids=\[\[5\]\] is not supported"),
    (dict(num_beam_groups=2, diversity_penalty=0.5, num_beams=4), r"num_beam_groups=2 is not supported"),
    (dict(my_sampler_knob=3), r"unknown generation setting 'my_sampler_knob'"),
    (dict(top_k="five"), r"top_k='five'"),
    (dict(do_sample=True, temperature=0), r"temperature=0"),
])
def test_generation_settings_minigpt2_cannot_honour_are_refused(hf_checkpoint, tmp_path, settings, message):
    """Decoding without them would give other tokens than transformers, silently: the load fails, naming the file."""
    path = write_generation_config(hf_checkpoint, tmp_path, settings)
    with pytest.raises(CheckpointError, match=rf"generation_config\.json: {message}"):
        GPT.from_pretrained(path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_unreadable_generation_config(hf_checkpoint, tmp_path, text):
    path = write_generation_config(hf_checkpoint, tmp_path, {})
    (path / "generation_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"generation_config\.json: (invalid JSON|holds a JSON list)"):
        GPT.from_pretrained(path)


@pytest.fixture
def broken_dir(hf_checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint(), target)
    return target


def test_missing_weights_file(broken_dir):
    (broken_dir / "model.safetensors").unlink()
    (broken_dir / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing.*never loads pickles"):
        GPT.from_pretrained(broken_dir)


def test_missing_config(broken_dir):
    (broken_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        GPT.from_pretrained(broken_dir)


def test_corrupted_safetensors(broken_dir):
    weights = broken_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"not a readable safetensors file.*corrupted"):
        GPT.from_pretrained(broken_dir)


def test_config_and_weights_mismatch(broken_dir):
    config = json.loads((broken_dir / "config.json").read_text())
    config["n_embd"] = 128
    (broken_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has shape .* but config\.json implies"):
        GPT.from_pretrained(broken_dir)


def edit_weights(directory: Path, edit) -> dict[str, torch.Tensor]:
    """Rewrite `directory`'s model.safetensors (written by transformers) after `edit(tensors)`; returns them."""
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return tensors


@pytest.mark.parametrize("shape", [(1, 64, 192), (192, 64)], ids=["3-D", "not transposed"])
def test_projection_weight_of_the_wrong_shape(broken_dir, shape):
    """A Conv1D weight is (in, out) on disk, and the message gives that shape. One of three dimensions was a
    RuntimeError from t() ("expects a tensor with <= 2 dimensions") before the shapes were compared."""
    edit_weights(broken_dir, lambda tensors: tensors.update(
        {"transformer.h.0.attn.c_attn.weight": torch.zeros(shape)}))
    with pytest.raises(CheckpointError, match=rf"tensor 'transformer\.h\.0\.attn\.c_attn\.weight' has shape "
                                              rf"{re.escape(str(shape))} but config\.json implies \(64, 192\); "
                                              r"config and weights do not belong together$"):
        GPT.from_pretrained(broken_dir)


def test_weights_file_missing_a_tensor(broken_dir):
    """An incomplete file is refused by name; transformers would fill the gap with fresh random values."""
    edit_weights(broken_dir, lambda tensors: tensors.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(broken_dir))}: missing tensors "
                                              r"transformer\.h\.1\.mlp\.c_fc\.bias; the weights file is incomplete$"):
        GPT.from_pretrained(broken_dir)


@pytest.mark.parametrize("name", ["transformer.h.2.ln_1.weight",  # a third block, where config.json says two
                                  "score.weight"])  # a head of another task (GPT2ForSequenceClassification's)
def test_weights_file_with_an_unexpected_tensor(broken_dir, name):
    edit_weights(broken_dir, lambda tensors: tensors.update({name: torch.ones(64)}))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(broken_dir))}: unexpected tensor '{re.escape(name)}', "
                                              r"not a weight of GPT-2's language model"):
        GPT.from_pretrained(broken_dir)


def test_a_checkpoint_with_another_tasks_head_loads_after_the_fix_its_error_gives(tmp_path):
    """GPT2DoubleHeadsModel's folder is refused for its multiple-choice head; what the message says to do gives a
    folder that loads, to the logits of transformers' language model over the same weights."""
    torch.manual_seed(0)
    GPT2DoubleHeadsModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=32,
                                    bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path / "double")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'multiple_choice_head\.summary\.[a-z]+', .*"
                                              r"GPT2LMHeadModel\.from_pretrained\(dir\)\.save_pretrained\(new_dir\)"):
        GPT.from_pretrained(tmp_path / "double")
    ref = GPT2LMHeadModel.from_pretrained(tmp_path / "double").eval()
    ref.save_pretrained(tmp_path / "lm")
    x, logits = logits_of(GPT.from_pretrained(tmp_path / "lm"))
    with torch.no_grad():
        expected = ref(x).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_lm_head_that_differs_from_the_token_embedding_is_refused(broken_dir):
    """GPT-2's head is the token embedding (tie_word_embeddings=True in config.json): minigpt2 holds one tensor for
    both. transformers 5.24, given a file whose lm_head.weight differs, does not tie them: it loads both, with a
    warning, and so computes logits from lm_head.weight. Loading either one into the tied model would therefore
    give logits that differ from transformers' for the same files (wte's input side or lm_head's output side), so
    the file is refused. An lm_head.weight equal to wte.weight (OpenAI's upload) loads: see
    test_original_openai_layout_loads."""
    tensors = edit_weights(broken_dir, lambda tensors: tensors.update(
        {"lm_head.weight": tensors["transformer.wte.weight"] + 0.01}))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(broken_dir))}: lm_head\.weight differs from "
                                              r"wte\.weight, but GPT-2 ties them$"):
        GPT.from_pretrained(broken_dir)
    ref = GPT2LMHeadModel.from_pretrained(broken_dir)
    assert ref.lm_head.weight is not ref.transformer.wte.weight
    assert torch.equal(ref.lm_head.weight, tensors["lm_head.weight"])
    assert torch.equal(ref.transformer.wte.weight, tensors["transformer.wte.weight"])


@pytest.mark.parametrize(("key", "value", "message"), [
    ("n_head", 0, "a positive integer"),  # was a ZeroDivisionError: n_embd % n_head was checked first
    ("n_layer", 2.0, "a positive integer"),
    ("n_layer", None, "a positive integer"),
    ("n_layer", "two", "a positive integer"),
    ("n_layer", True, "a positive integer"),
    ("n_inner", -5, r"a positive integer or None \(4 \* n_embd\)"),
    ("layer_norm_epsilon", "x", "a finite number >= 0"),
    ("layer_norm_epsilon", float("nan"), "a finite number >= 0"),
    ("initializer_range", "x", "a finite number >= 0"),
    ("attn_pdrop", "x", r"a probability in \[0, 1\)"),
    ("embd_pdrop", 5, r"a probability in \[0, 1\)"),
])
def test_config_values_of_the_wrong_type_or_range(broken_dir, key, value, message):
    """Each used to be a traceback from inside the model, a cryptic message ('<=' not supported between 'NoneType'
    and 'int'), or a model that loaded and failed later, in training."""
    config = json.loads((broken_dir / "config.json").read_text())
    config[key] = value
    (broken_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config\.json: {key} must be {message}, got {re.escape(repr(value))}; "
                                              r"fix the file or save the model again$"):
        GPT.from_pretrained(broken_dir)


def test_a_bad_override_is_not_blamed_on_config_json(broken_dir):
    with pytest.raises(ConfigError, match=r"^embd_pdrop must be a probability in \[0, 1\), got 5$") as caught:
        GPT.from_pretrained(broken_dir, embd_pdrop=5)
    assert not isinstance(caught.value, CheckpointError)


@pytest.mark.parametrize(("name", "value", "why"), [("n_layer", 3, "the checkpoint fixes it"),
                                                    ("n_head", 2, "the checkpoint fixes it"),
                                                    ("torch_dtype", torch.float16, "no such setting")])
def test_an_override_of_the_architecture_or_unknown_is_refused(broken_dir, name, value, why):
    """n_layer=3 was blamed on the files ("the weights file is incomplete"), n_head=2 loaded 64-wide heads as 32-wide
    ones (no tensor's shape tells), and an unknown name was GPTConfig.__init__'s TypeError."""
    with pytest.raises(ConfigError, match=rf"^{name}={re.escape(repr(value))} cannot be set when loading a "
                                          rf"checkpoint: {why}; from_pretrained takes revision and embd_pdrop, "
                                          r"attn_pdrop, resid_pdrop, initializer_range, attn_impl$"):
        GPT.from_pretrained(broken_dir, **{name: value})


def make_unreadable(monkeypatch, file: Path) -> None:
    """Make `file` fail to open as a file without read permission does, even for root (who may read any file):
    Python's open raises PermissionError, and safetensors, which opens files itself, raises what it raises for any
    file it cannot open, FileNotFoundError("No such file or directory: ...")."""
    real_open, real_safe_open = Path.open, safetensors.torch.safe_open

    def path_open(path, *args, **kwargs):
        if path == file:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    def safe_open(filename, *args, **kwargs):
        if Path(filename) == file:
            raise FileNotFoundError(f"No such file or directory: {filename}")
        return real_safe_open(filename, *args, **kwargs)

    monkeypatch.setattr(Path, "open", path_open)
    monkeypatch.setattr(safetensors.torch, "safe_open", safe_open)


UNREADABLE = r"cannot be read \(Permission denied\); fix its permissions so that you can read it"


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "generation_config.json"])
def test_unreadable_checkpoint_file(broken_dir, monkeypatch, name):
    """config.json was a PermissionError traceback; model.safetensors was called corrupted, to be deleted (safetensors
    reports a file it cannot open as "No such file or directory")."""
    make_unreadable(monkeypatch, broken_dir / name)
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: {UNREADABLE}, or copy the checkpoint again$"):
        GPT.from_pretrained(broken_dir)


LOAD_AND_SAY = """
import sys
from minigpt2 import GPT, CheckpointError
try:
    GPT.from_pretrained(sys.argv[1])
except CheckpointError as exc:
    print(exc)
"""


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_checkpoint_file_without_read_permission(broken_dir, name):
    """The real thing: a file of mode 000. Root reads it anyway, so as root the load runs in a process that setpriv
    has taken root's power to read any file from (CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH)."""
    file = broken_dir / name
    file.chmod(0)
    try:
        command = [sys.executable, "-c", LOAD_AND_SAY, str(broken_dir)]
        try:
            file.open("rb").close()
        except PermissionError:
            pass
        else:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("this process may read a file of mode 000 (root) and setpriv is missing: permissions "
                            "cannot be tested here")
            command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert re.fullmatch(rf".*{re.escape(name)}: {UNREADABLE}, or copy the checkpoint again\n", done.stdout), \
            done.stdout + done.stderr
    finally:
        file.chmod(0o644)


@pytest.fixture
def sharded_dir(tmp_path) -> Path:
    """A checkpoint that transformers saved in shards."""
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=300, n_positions=32, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    return tmp_path / "sharded"


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", r"invalid JSON .*save the model again"),
    ('["model-00001-of-00002.safetensors"]', r"holds a JSON list.*save the model again"),
    ('{"metadata": {}}', r'has no "weight_map" object.*save the model again'),
    ('{"weight_map": ["model-00001-of-00002.safetensors"]}', r'has no "weight_map" object.*save the model again'),
])
def test_unreadable_shard_index(sharded_dir, text, message):
    (sharded_dir / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: {message}"):
        GPT.from_pretrained(sharded_dir)


def test_missing_shard(sharded_dir):
    shards = sorted(json.loads((sharded_dir / "model.safetensors.index.json").read_text())["weight_map"].values())
    (sharded_dir / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[-1]}: missing, but model\.safetensors\.index\.json lists "
                                              r"it as a shard.*copy it from where the checkpoint came from"):
        GPT.from_pretrained(sharded_dir)


def small_gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=300, n_positions=32,
                         initializer_range=0.2)).eval()


def files_in(directory: Path) -> dict[str, bytes | None]:
    """Everything in `directory`, hidden entries too (a staging folder left behind shows): files by their bytes,
    folders as None."""
    return {p.name: p.read_bytes() if p.is_file() else None for p in directory.iterdir()}


@pytest.mark.parametrize("exists", [True, False], ids=["over a checkpoint", "new directory"])
def test_failed_save_leaves_the_directory_as_it_was(tmp_path, monkeypatch, exists):
    """The disk fills up while config.json is written, after the weights: a previous checkpoint keeps all its files
    byte for byte, a new directory is not created (nor its missing parents), and no staging folder is left."""
    target = tmp_path / "runs" / "final"
    if exists:
        small_gpt(0).save_pretrained(target)
        (target / "README.md").write_text("my notes\n")
    before = files_in(target) if exists else None
    real_write_text = Path.write_text

    def disk_full_at_config(path, text, *args, **kwargs):
        if path.name == "config.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full_at_config)
    with pytest.raises(OSError, match="No space left"):
        small_gpt(1).save_pretrained(target)
    if exists:
        assert files_in(target) == before and files_in(target.parent) == {"final": None}
    else:
        assert files_in(tmp_path) == {}


def test_save_over_a_sharded_checkpoint_removes_its_shards(sharded_dir):
    """Old shards and their index beside the new model.safetensors would be an earlier model that a loader may read
    (minigpt2 read the index first): the save leaves the new files only, and a user's own file."""
    (sharded_dir / "README.md").write_text("my notes\n")
    assert "model.safetensors.index.json" in files_in(sharded_dir)
    ours = small_gpt(1)
    ours.save_pretrained(sharded_dir)
    assert sorted(files_in(sharded_dir)) == ["README.md", "config.json", "generation_config.json",
                                             "model.safetensors"]
    assert (sharded_dir / "README.md").read_text() == "my notes\n"
    x, logits = logits_of(ours)
    with torch.no_grad():
        theirs = GPT2LMHeadModel.from_pretrained(sharded_dir).eval()(x).logits
    torch.testing.assert_close(theirs, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
    assert torch.equal(logits_of(GPT.from_pretrained(sharded_dir))[1], logits)


def test_copy_checkpoint_replaces_the_files_as_a_set(sharded_dir, tmp_path):
    """How the trainer exports its best checkpoint to --out: the copy replaces an earlier checkpoint there as
    save_pretrained would (its shards go, a user's file stays), and one that fails part-way changes nothing."""
    source = tmp_path / "best"
    small_gpt(1).save_pretrained(source)
    (sharded_dir / "README.md").write_text("my notes\n")
    copy_checkpoint(source, sharded_dir)
    assert files_in(sharded_dir) == {**files_in(source), "README.md": b"my notes\n"}
    x, logits = logits_of(small_gpt(1))
    with torch.no_grad():
        theirs = GPT2LMHeadModel.from_pretrained(sharded_dir).eval()(x).logits
    torch.testing.assert_close(theirs, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())

    small_gpt(2).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").unlink()  # the copy fails at its last file, after the weights
    before = files_in(sharded_dir)
    with pytest.raises(FileNotFoundError):
        copy_checkpoint(tmp_path / "other", sharded_dir)
    assert files_in(sharded_dir) == before


KILLED_SAVE = """
import sys, time
import torch
import minigpt2.hub as hub
from minigpt2 import GPT, GPTConfig

real_save_tensors = hub.save_tensors

def save_tensors_then_hang(tensors, path, metadata):
    real_save_tensors(tensors, path, metadata)
    print("weights written", flush=True)
    time.sleep(600)

hub.save_tensors = save_tensors_then_hang
torch.manual_seed(2)
GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=300, n_positions=32)).save_pretrained(sys.argv[1])
"""


@pytest.mark.parametrize("exists", [True, False], ids=["over a checkpoint", "new directory"])
def test_what_a_save_killed_outright_leaves_goes_with_the_next_save(tmp_path, exists):
    """SIGKILL during a save leaves its staging folder (nothing can clean up then); the next save to the same
    directory deletes it, but not the staging folder of a save still running."""
    target = tmp_path / "model"
    if exists:
        small_gpt(0).save_pretrained(target)
    save = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target)], stdout=subprocess.PIPE, text=True)
    assert save.stdout.readline() == "weights written\n"
    save.kill()
    save.wait()
    save.stdout.close()
    where = target if exists else tmp_path
    left = [p for p in where.iterdir() if p.name.startswith(".tmp-")]
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()
    running = where / re.sub(rf"-{save.pid}-([0-9a-f]{{8}})$", rf"-{os.getpid()}-\1", left[0].name)
    running.mkdir()  # as a save by this process, in progress, would have it
    small_gpt(1).save_pretrained(target)
    assert [p.name for p in where.iterdir() if p.name.startswith(".tmp-")] == [running.name]
    assert torch.equal(logits_of(GPT.from_pretrained(target))[1], logits_of(small_gpt(1))[1])


def test_single_file_wins_over_a_shard_index_as_in_transformers(sharded_dir, tmp_path):
    """A directory holding both layouts (a save that replaced one with the other was killed before deleting the old
    one) loads the same weights in both libraries: model.safetensors."""
    small_gpt(1).save_pretrained(tmp_path / "single")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "single" / name, sharded_dir / name)
    x, logits = logits_of(GPT.from_pretrained(sharded_dir))
    assert torch.equal(logits, logits_of(small_gpt(1))[1])
    with torch.no_grad():
        theirs = GPT2LMHeadModel.from_pretrained(sharded_dir).eval()(x).logits
    torch.testing.assert_close(theirs, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())


@pytest.mark.parametrize("exists", [False, True], ids=["new directory", "empty directory"])
def test_a_kill_while_files_are_moved_into_place_leaves_nothing_loadable_but_the_whole(tmp_path, monkeypatch, exists):
    """The directory as a kill just before each rename of the save would leave it. A new directory does not exist
    until it is complete; an empty one gets config.json, which every loader reads first, only after the rest."""
    target = tmp_path / "model"
    if exists:
        target.mkdir()
    real_replace = os.replace
    seen = []

    def replace(src, dst):
        seen.append({p.name for p in target.iterdir() if not p.name.startswith(".")} if target.exists() else None)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    small_gpt(0).save_pretrained(target)
    monkeypatch.undo()
    assert sorted(files_in(target)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert seen, "the save renamed nothing into place"
    if exists:
        assert all("config.json" not in state for state in seen), seen
    else:
        assert all(state is None for state in seen), seen


@pytest.mark.parametrize(("path", "message"), [
    ("model.safetensors", r"model\.safetensors: is a file, but a checkpoint is a directory; pass the path of a "),
    ("model.safetensors/sub", r"sub: cannot save a checkpoint there \(Not a directory\); choose a directory"),
])
def test_save_to_a_file_is_a_clear_error(broken_dir, path, message):
    """Both used to be tracebacks (FileExistsError, NotADirectoryError); nothing is written."""
    before = files_in(broken_dir)
    with pytest.raises(CheckpointError, match=message):
        small_gpt(0).save_pretrained(broken_dir / path)
    assert files_in(broken_dir) == before


@pytest.mark.parametrize(("name", "value"), [("transformer.wte.weight", float("nan")),
                                             ("transformer.h.1.mlp.c_fc.bias", float("-inf"))])
def test_non_finite_weights(broken_dir, name, value):
    """NaN in the token embedding used to be reported as an untied head (NaN equals nothing)."""
    tensors = load_file(broken_dir / "model.safetensors")
    tensors[name][0] = value
    save_file(tensors, broken_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{re.escape(name)}' holds NaN or inf "
                                              r"values.*use an earlier checkpoint"):
        GPT.from_pretrained(broken_dir)


def test_training_run_without_final_model(hf_checkpoint, tmp_path):
    """A run stopped before its final save leaves only checkpoint-* folders in its output directory."""
    model = GPT.from_pretrained(hf_checkpoint())
    for step in (5, 12):
        save_checkpoint(tmp_path / "run", step, model, {"step": step})
    latest = re.escape(str(tmp_path / "run" / "checkpoint-0000012"))
    with pytest.raises(CheckpointError, match=rf"run: holds training checkpoints but no final model.*pass the latest "
                                              rf"checkpoint, {latest}"):
        GPT.from_pretrained(tmp_path / "run")


@pytest.fixture
def training_checkpoint(tmp_path) -> Path:
    """A training checkpoint whose state has every part that resuming reads, made as Trainer._save makes it."""
    model = small_gpt(0)
    optimizer = AdamW(param_groups(model, weight_decay=0.1))
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    loader = BatchLoader(np.arange(1000) % 300, batch_size=2, block_size=8)
    loader.next_batch()
    state = {"step": 1, "config": {"init": "scratch", "max_steps": 10}, "world_size": 1,
             "optimizer": optimizer.state_by_name(), "scaler": None, "data": loader.state_dict(), "rng": [rng_state()],
             "tracker": {"best_val_loss": None, "best_step": None, "evals_without_improvement": 0},
             "log_window": {"loss": 5.5, "finite": 1, "steps": 1, "seconds": 0.25}}
    return save_checkpoint(tmp_path / "run", 1, model, state)


DELETE = object()


def edit_state(checkpoint: Path, keys: tuple, value) -> None:
    """Set the part of the checkpoint's training_state.json at `keys` (all of it for ()) to `value`, or delete it."""
    file = checkpoint / "training_state.json"
    data = json.loads(file.read_text())
    if not keys:
        data = value
    else:
        parent = functools.reduce(operator.getitem, keys[:-1], data)
        if value is DELETE:
            del parent[keys[-1]]
        else:
            parent[keys[-1]] = value
    file.write_text(json.dumps(data))


@pytest.mark.parametrize(("keys", "value", "message"), [
    ((), [], "a list instead of an object"),  # was a TypeError
    (("step",), DELETE, 'no "step"'),  # was a KeyError
    (("step",), "ten", r'"step" is "ten", not an integer'),  # was a ValueError
    (("step",), -3, r'"step" is -3, not an integer >= 0'),
    (("config",), [1], r'"config" is a list, not an object'),  # was an AttributeError in train.py
    (("optimizer",), DELETE, 'no "optimizer"'),
    (("optimizer", "transformer.wte.weight", "exp_avg_sq"), DELETE,
     r'no "optimizer\.transformer\.wte\.weight\.exp_avg_sq"'),
    (("data", "position"), "x", r'"data\.position" is "x", not an integer'),
    (("data", "seed"), -3, r'"data\.seed" is -3, not an integer >= 0'),  # was a ValueError from numpy, later
    (("rng",), [{}], r'no "rng\.0\.python"'),
    (("rng", 0, "python", 1), [1, 2], r'"rng\.0\.python" is not a generator state: state vector is the wrong size'),
    (("rng", 0, "numpy", "state"), {}, r'"rng\.0\.numpy" is not a generator state: .+'),  # was a KeyError
    (("tracker", "best_step"), DELETE, r'no "tracker\.best_step"'),
    (("scaler",), [], r'"scaler" is a list, not an object'),
    (("log_window", "loss"), None, r'"log_window\.loss" is null, not a number'),
])
def test_damaged_training_state(training_checkpoint, keys, value, message):
    """Each part that resuming reads is checked when the state is loaded: a damaged file is named, where it used to
    be a traceback from the middle of setting up the run (or no error at all, until the part was used)."""
    assert load_training_state(training_checkpoint)["step"] == 1  # intact, it loads
    edit_state(training_checkpoint, keys, value)
    with pytest.raises(CheckpointError, match=rf"training_state\.json: damaged \({message}\); resume from another "
                                              r"checkpoint$"):
        load_training_state(training_checkpoint)


def test_training_state_tensor_missing(training_checkpoint):
    """A placeholder in the JSON whose tensor is not in the tensor file was a KeyError."""
    tensors_file = training_checkpoint / "training_state.safetensors"
    tensors = load_file(tensors_file)
    del tensors["optimizer.transformer.wte.weight.exp_avg"]
    save_file(tensors, tensors_file)
    with pytest.raises(CheckpointError, match=r"training_state\.json: damaged \(its tensor "
                                              r"'optimizer\.transformer\.wte\.weight\.exp_avg' is not in "
                                              r"training_state\.safetensors\); resume from another checkpoint$"):
        load_training_state(training_checkpoint)


@pytest.mark.parametrize(("keys", "value", "message"), [
    ((), [], "a list instead of an object"),  # was a TypeError
    (("config",), [1], r'"config" is a list, not an object'),  # was returned, for train.py to fail on
    (("config",), DELETE, r'no "config"'),
])
def test_damaged_saved_settings(training_checkpoint, keys, value, message):
    """train.py reads the saved settings alone (read_saved_config) before the run is set up."""
    assert read_saved_config(training_checkpoint) == {"init": "scratch", "max_steps": 10}
    edit_state(training_checkpoint, keys, value)
    with pytest.raises(CheckpointError, match=rf"training_state\.json: damaged \({message}\)"):
        read_saved_config(training_checkpoint)


@pytest.mark.parametrize("name", ["training_state.json", "training_state.safetensors"])
def test_unreadable_training_state(training_checkpoint, monkeypatch, name):
    make_unreadable(monkeypatch, training_checkpoint / name)
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: {UNREADABLE}, or resume from another "
                                              r"checkpoint$"):
        load_training_state(training_checkpoint)


def test_file_instead_of_directory(broken_dir):
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is a file, but a checkpoint is a directory"):
        GPT.from_pretrained(broken_dir / "model.safetensors")


@pytest.mark.parametrize("name", ["{tmp}/nope/deeper/x", "./nope", "../nope", "a--b/c", "runs/ckpt."])
def test_not_a_directory_nor_hub_id(tmp_path, monkeypatch, name):
    """Names that the Hub's own rules reject are missing directories, not Hub lookups (which would raise
    huggingface_hub's HFValidationError with a traceback)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory, and not a Hub id"):
        GPT.from_pretrained(name.format(tmp=tmp_path))


HUB_SCRIPT = textwrap.dedent("""
    import sys, torch
    from minigpt2 import GPT, CheckpointError
    try:
        model = GPT.from_pretrained(sys.argv[1])
    except CheckpointError as exc:
        print("CheckpointError:", exc)
        sys.exit(3)
    if len(sys.argv) > 2:
        from transformers import GPT2LMHeadModel
        ref = GPT2LMHeadModel.from_pretrained(sys.argv[2]).eval()
        x = torch.arange(40).view(2, 20) * 97
        with torch.no_grad():
            ours, theirs = model(x), ref(x).logits
        print("max_rel_err", ((ours - theirs).abs().max() / theirs.abs().max()).item())
""")


def run_offline(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent)}
    return subprocess.run([sys.executable, "-c", HUB_SCRIPT, *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def hub_cache(hf_checkpoint, tmp_path):
    """A Hugging Face cache laid out as a download of openai-community/gpt2 leaves it."""
    cache = tmp_path / "hub"
    repo = cache / "models--openai-community--gpt2"
    revision = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_checkpoint() / name, snapshot / name)
    return cache


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2"])
def test_hub_cache_offline(hub_cache, name):
    result = run_offline(hub_cache, name, "openai-community/gpt2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert float(result.stdout.split("max_rel_err")[1]) <= 1e-5


def test_offline_and_not_cached_is_a_clear_error(hub_cache):
    result = run_offline(hub_cache, "gpt2-medium")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "HF_HUB_OFFLINE is set and openai-community/gpt2-medium is not in the local Hugging Face cache" \
        in result.stdout


REVISION_SCRIPT = textwrap.dedent("""
    import sys, torch
    from minigpt2 import GPT, CheckpointError
    try:
        model = GPT.from_pretrained("gpt2", revision=sys.argv[1])
    except CheckpointError as exc:
        print("CheckpointError:", exc)
        sys.exit(3)
    x = torch.arange(40).view(2, 20) * 97
    with torch.no_grad():
        print("equal", torch.equal(model(x), GPT.from_pretrained(sys.argv[2])(x)))
""")


@pytest.mark.parametrize("revision", ["v2", "1" * 40])
def test_hub_cache_offline_at_a_revision(hub_cache, hf_checkpoint, revision):
    """A tag, or a commit hash, of the cached repository loads that snapshot's weights, not the default branch's.
    revision= was a TypeError ("GPTConfig.__init__() got an unexpected keyword argument 'revision'")."""
    repo = hub_cache / "models--openai-community--gpt2"
    shutil.copytree(hf_checkpoint(seed=1), repo / "snapshots" / ("1" * 40))
    (repo / "refs" / "v2").write_text("1" * 40)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "HF_HOME": str(hub_cache.parent)}
    run = functools.partial(subprocess.run, env=env, capture_output=True, text=True, timeout=300)
    result = run([sys.executable, "-c", REVISION_SCRIPT, revision, str(hf_checkpoint(seed=1))])
    assert result.stdout == "equal True\n", result.stdout + result.stderr
    result = run([sys.executable, "-c", REVISION_SCRIPT, "v3", str(hf_checkpoint(seed=1))])
    assert result.returncode == 3, result.stdout + result.stderr
    assert "HF_HUB_OFFLINE is set and openai-community/gpt2 at revision 'v3' is not in the local Hugging Face " \
           "cache" in result.stdout


def test_revision_of_a_local_directory_is_refused(hf_checkpoint):
    """transformers ignores it there; a folder named like a Hub id would then stand in for the pinned version."""
    path = hf_checkpoint()
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: is a local directory, but "
                                              r"revision='v2' selects a version of a Hub repository"):
        GPT.from_pretrained(path, revision="v2")


@pytest.mark.parametrize("kept", [["config.json", "vocab.json"], ["config.json", "pytorch_model.bin"],
                                  ["model.safetensors"]], ids=["a tokenizer's files", "a pickle", "no config"])
def test_offline_snapshot_without_the_model_files_is_a_clear_error(hub_cache, kept):
    """The cache holds what was downloaded: transformers' AutoTokenizer.from_pretrained("gpt2") leaves config.json
    without weights. That was reported as a local folder to save again with safetensors, or missing config.json."""
    snapshot = next((hub_cache / "models--openai-community--gpt2" / "snapshots").iterdir())
    for file in snapshot.iterdir():
        file.unlink()
    for name in kept:
        (snapshot / name).write_text("{}")
    result = run_offline(hub_cache, "gpt2")
    assert result.returncode == 3, result.stdout + result.stderr
    missing = " and no ".join(name for name in ("config.json", "model.safetensors") if name not in kept)
    assert f"gpt2: the local Hugging Face cache's snapshot of openai-community/gpt2 ({snapshot}) has no {missing}: " \
           "either only some of its files were downloaded, so connect to the internet once" in result.stdout, \
           result.stdout


@pytest.mark.hub
def test_real_gpt2_matches_transformers():
    """Real weights from the Hub: same logits and the same greedy continuation as transformers."""
    from minigpt2 import Tokenizer

    ours = GPT.from_pretrained("gpt2")
    ref = GPT2LMHeadModel.from_pretrained("openai-community/gpt2").eval()
    ids = torch.tensor([Tokenizer().encode("The meaning of life is")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=1e-5, atol=1e-4)
    ours_greedy = ours.generate(ids, max_new_tokens=20, do_sample=False)
    ref_greedy = ref.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=50256)
    assert ours_greedy.tolist() == ref_greedy.tolist()
