"""The training loop: exact resume, DDP = gradient accumulation, atomic checkpoints, non-finite losses, early
stopping, signals, and train.py's command line. Models are tiny (2 layers, 64 wide) and runs a few steps long."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minigpt2 import GPT, GPTConfig, Tokenizer, atomic
from minigpt2 import checkpoint as ckpt
from minigpt2 import trainer as trainer_module
from minigpt2.errors import CheckpointError, ConfigError
from minigpt2.train_config import TrainConfig
from minigpt2.trainer import Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  (the script at the repository root)

WORDS = ("the list of values returns a new object when called with an optional key argument that names the file "
         "path and mode raises ValueError if the string is empty otherwise iterate over lines").split()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared dataset of a few thousand GPT-2 tokens (made by the real pipeline from generated text)."""
    from minigpt2.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    documents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(300)]
    (root / "text.txt").write_text("\n\n".join(documents) + "\n")
    prepare_dataset(root / "text.txt", root / "prepared", progress=False)
    return root / "prepared"


@pytest.fixture(scope="module")
def init_dir(hf_checkpoint) -> Path:
    """A tiny GPT-2 (2 layers, 64 wide, GPT-2's vocabulary) saved by transformers."""
    return hf_checkpoint(n_positions=64, initializer_range=0.02)


pytestmark = pytest.mark.usefixtures("one_thread")


def config(init_dir, prepared, out, **overrides) -> TrainConfig:
    settings = dict(init=str(init_dir), data=str(prepared), out=str(out), max_steps=8, batch_size=4, block_size=32,
                    grad_accum=2, lr=3e-3, warmup_steps=2, eval_interval=4, eval_batches=2, dtype="fp32",
                    device="cpu", progress=False, samples=0, log_interval=1, dropout=0.1)
    settings.update(overrides)
    return TrainConfig(**settings)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in metrics(out) if "loss" in r]


@pytest.mark.parametrize("settings", [{}, dict(dtype="bf16", compile_optimizer=True)], ids=["fp32", "bf16-one-pass"])
def test_resume_is_bit_exact(init_dir, prepared, tmp_path, settings):
    straight = Trainer(config(init_dir, prepared, tmp_path / "a", **settings)).train()
    assert straight.stopped_by is None and straight.step == 8

    first = Trainer(config(init_dir, prepared, tmp_path / "b", **settings)).train(stop_after=3)
    assert first.stopped_by == "stop_after" and first.last_checkpoint.name == "checkpoint-0000003"
    resumed = Trainer(config(init_dir, prepared, tmp_path / "b", resume="auto", **settings)).train()
    assert resumed.step == 8

    a, b = tmp_path / "a" / "checkpoint-0000008", tmp_path / "b" / "checkpoint-0000008"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    state_a, state_b = ckpt.load_training_state(a), ckpt.load_training_state(b)
    for name, moments in state_a["optimizer"].items():
        assert torch.equal(moments["exp_avg_sq"], state_b["optimizer"][name]["exp_avg_sq"]), name
    assert torch.equal(state_a["rng"][0]["torch"], state_b["rng"][0]["torch"])
    assert state_a["data"] == state_b["data"]
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 8


def stop_by_signal_during(trainer: Trainer, step: int) -> None:
    """Make `trainer` receive SIGTERM during its update number `step` (1-based), as a scheduler would send it."""
    train_step = trainer.train_step

    def with_signal():
        if trainer.step == step - 1:
            trainer._stop_signal = "SIGTERM"
        return train_step()

    trainer.train_step = with_signal


def test_signal_at_an_evaluation_step_still_evaluates_it(init_dir, prepared, tmp_path):
    """Stopped by SIGTERM in a step due an evaluation, then resumed: the evaluations, best checkpoint and patience
    are those of the same run left alone (before, the stop skipped that evaluation and the resumed run never made it)."""
    settings = dict(max_steps=8, eval_interval=4, patience=3)
    straight = Trainer(config(init_dir, prepared, tmp_path / "a", **settings)).train()
    stopped = Trainer(config(init_dir, prepared, tmp_path / "b", **settings))
    stop_by_signal_during(stopped, 4)
    assert stopped.train().stopped_by == "SIGTERM" and stopped.step == 4
    resumed = Trainer(config(init_dir, prepared, tmp_path / "b", resume="auto", **settings)).train()

    def evaluations(out: Path) -> list[tuple[int, float]]:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]

    assert evaluations(tmp_path / "a") == evaluations(tmp_path / "b") and len(evaluations(tmp_path / "a")) == 2
    assert (resumed.best_val_loss, resumed.best_checkpoint.name) == (straight.best_val_loss,
                                                                      straight.best_checkpoint.name)
    tracker = ckpt.load_training_state(resumed.last_checkpoint)["tracker"]
    assert tracker == ckpt.load_training_state(straight.last_checkpoint)["tracker"]


def test_overwrite_then_a_signal_before_any_evaluation_deletes_the_replaced_run(init_dir, prepared, tmp_path):
    Trainer(config(init_dir, prepared, tmp_path, max_steps=2, eval_interval=2)).train()
    trainer = Trainer(config(init_dir, prepared, tmp_path, max_steps=8, eval_interval=4, overwrite=True))
    stop_by_signal_during(trainer, 1)
    assert trainer.train().stopped_by == "SIGTERM"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000001"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".replaced-run")]  # not left behind for ever


def test_resume_past_max_steps_is_refused(init_dir, prepared, tmp_path):
    Trainer(config(init_dir, prepared, tmp_path, max_steps=4, eval_interval=4)).train()
    with pytest.raises(ConfigError, match="at step 4, past --max_steps 2"):
        Trainer(config(init_dir, prepared, tmp_path, max_steps=2, resume="auto"))


def test_resume_auto_with_overwrite_continues_a_checkpoint_else_starts_again(init_dir, prepared, tmp_path, capsys):
    """The job script of a preemptible machine: continue the run in --out if it has a checkpoint, else start over."""
    fresh = Trainer(config(init_dir, prepared, tmp_path / "new", max_steps=2, eval_interval=2, resume="auto"))
    assert "--resume auto: no checkpoint in" in capsys.readouterr().out and fresh.step == 0
    fresh.train()
    capsys.readouterr()
    again = Trainer(config(init_dir, prepared, tmp_path / "new", max_steps=3, eval_interval=3, resume="auto",
                           overwrite=True))
    assert "settings changed since that checkpoint: max_steps 2 -> 3, eval_interval 2 -> 3\n" in \
        capsys.readouterr().out
    assert again.step == 2 and again.train().step == 3
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "new")] == ["checkpoint-0000003"]
    assert not [p for p in (tmp_path / "new").iterdir() if p.name.startswith(".replaced-run")]


def test_model_preset_is_one_of_the_presets_in_either_spelling():
    assert TrainConfig(model_preset="openai-community/gpt2-medium").model_preset == "openai-community/gpt2-medium"
    with pytest.raises(ConfigError, match="--model_preset 'gpt3' is not one of gpt2, gpt2-medium"):
        TrainConfig(model_preset="gpt3")


def test_keep_checkpoints_keeps_the_one_to_resume_from():
    """0 used to prune a checkpoint saved on SIGTERM right after writing it, unless it was the best one."""
    with pytest.raises(ConfigError, match="--keep_checkpoints must be at least 1"):
        TrainConfig(keep_checkpoints=0)


@pytest.mark.parametrize("name", ["lr", "weight_decay", "grad_clip", "eps"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_settings_are_refused(name, value):
    with pytest.raises(ConfigError, match=f"--{name} must be a finite number"):
        TrainConfig(**{name: value})


def test_ddp_two_processes_equal_one_process_with_twice_the_accumulation(init_dir, prepared, tmp_path):
    """Weights, every logged loss and gradient norm, and the validation losses of 2 processes with grad_accum 1
    equal one process with grad_accum 2. Adam divides a constant gradient scale away; a large eps and no clipping
    make the update depend on it, so that a gradient averaged over the processes twice (or not at all) shows in the
    weights as well as in the norms. Validation runs at step 2 and 4, each process evaluating half the batches."""
    # A small lr: Adam divides each gradient by its own running size, so where a gradient is rounding noise (the
    # key bias's is zero in exact arithmetic) the two summation orders give updates that differ by up to lr.
    common = dict(max_steps=4, eval_interval=2, dropout=0.0, batch_size=4, lr=1e-4, eps=1e-3, grad_clip=0.0)
    single = Trainer(config(init_dir, prepared, tmp_path / "one", grad_accum=2, **common)).train()
    flags = ["--init", init_dir, "--data", prepared, "--out", tmp_path / "two", "--grad_accum", 1,
             "--max_steps", 4, "--eval_interval", 2, "--dropout", 0.0, "--batch_size", 4, "--block_size", 32,
             "--lr", 1e-4, "--eps", 1e-3, "--grad_clip", 0.0, "--warmup_steps", 2, "--eval_batches", 2, "--dtype",
             "fp32", "--device", "cpu", "--progress", "false", "--samples", 0, "--log_interval", 1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train.py"), *map(str, flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = weights(single.last_checkpoint), weights(tmp_path / "two" / "checkpoint-0000004")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=0, atol=1e-6), name
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [sorted(r) for r in one] == [sorted(r) for r in two]
    for key in ("loss", "grad_norm", "val_loss"):
        logged = [r[key] for r in one if key in r]
        assert len(logged) == (2 if key == "val_loss" else 4)
        assert logged == pytest.approx([r[key] for r in two if key in r], rel=1e-6), key
    start = load_file(init_dir / "model.safetensors")  # the same layout as our checkpoints
    moved = max((ours[n] - start[n]).abs().max().item() for n in ours if n in start)
    assert moved > 1e-4  # training happened: the comparison is not vacuous

    # Errors under torchrun: one line from the main process; the other leaves quietly (it crashed in gloo when the
    # main process failed a check that only it makes, and repeated the errors that both meet).
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert again.returncode != 0 and "[rank1]" not in again.stderr and "Connection closed" not in again.stderr
    assert [line for line in again.stderr.splitlines() if "error: " in line] == [
        f"error: {tmp_path / 'two'} already holds a training run; pass --resume auto to continue it, --overwrite to "
        "replace it, or choose another --out"]
    bad_flag = subprocess.run([*command, "--dropout", "1.5"], capture_output=True, text=True, cwd=ROOT, env=env,
                              timeout=300)
    assert [line for line in bad_flag.stderr.splitlines() if "error: " in line] == [
        "error: --dropout must be in [0, 1), got 1.5"]


def test_validation_loss_is_the_mean_over_the_validation_windows_without_dropout(init_dir, prepared, tmp_path):
    """The validation loss logged at an evaluation (which picks the best checkpoint and drives early stopping)
    equals transformers' GPT-2 on that checkpoint, in eval mode, over the validation split's windows: the mean
    cross-entropy of every token. Trained with dropout, so evaluating in training mode would differ."""
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    result = Trainer(config(init_dir, prepared, tmp_path, max_steps=2, eval_interval=2, eval_batches=3)).train()
    logged = [r["val_loss"] for r in metrics(tmp_path) if "val_loss" in r]
    assert len(logged) == 1
    # The documented windows: eval_batches x batch_size = 12 windows of block_size + 1 tokens (inputs and their
    # next tokens), evenly spaced over val.bin's uint16 tokens at multiples of block_size.
    tokens = np.fromfile(prepared / "val.bin", dtype=np.uint16).astype(np.int64)
    available = (len(tokens) - 1) // 32
    assert available > 12
    rows = torch.from_numpy(np.stack([tokens[i * available // 12 * 32:][:33] for i in range(12)]))
    reference = GPT2LMHeadModel.from_pretrained(result.last_checkpoint).eval()
    with torch.no_grad():
        expected = F.cross_entropy(reference(rows[:, :-1]).logits.flatten(0, 1), rows[:, 1:].flatten()).item()
    assert logged[0] == pytest.approx(expected, rel=1e-5)


def test_save_is_atomic(init_dir, prepared, tmp_path, monkeypatch):
    trainer = Trainer(config(init_dir, prepared, tmp_path, max_steps=2, eval_interval=1))
    trainer.train(stop_after=1)
    good = tmp_path / "checkpoint-0000001"
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def failing_save_file(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # the temporary copy was removed


def test_run_files_are_rewritten_atomically(init_dir, prepared, tmp_path, monkeypatch):
    """A resumed run dying while it rewrites train_config.json or trims metrics.jsonl leaves them as they were."""
    Trainer(config(init_dir, prepared, tmp_path, max_steps=4, eval_interval=2)).train(stop_after=2)
    before = {name: (tmp_path / name).read_bytes() for name in ("train_config.json", "metrics.jsonl")}
    trainer = Trainer(config(init_dir, prepared, tmp_path, max_steps=4, resume="auto"))
    real_write_text = Path.write_text

    def dies_halfway(path, text, *args, **kwargs):
        real_write_text(path, text[:len(text) // 2], *args, **kwargs)
        raise OSError("killed")

    monkeypatch.setattr(Path, "write_text", dies_halfway)
    with pytest.raises(OSError, match="killed"):
        trainer.train()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_kill_while_saving_leaves_previous_checkpoint(init_dir, tmp_path):
    """A process killed in the middle of writing (os._exit: no cleanup at all) cannot damage the last checkpoint."""
    model = GPT.from_pretrained(init_dir)
    previous = ckpt.save_checkpoint(tmp_path, 1, model, {"step": 1})
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    script = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from minigpt2 import GPT, checkpoint as ckpt
def die(*args, **kwargs):
    os._exit(9)
ckpt.save_file = die
ckpt.save_checkpoint({str(tmp_path)!r}, 2, GPT.from_pretrained({str(init_dir)!r}), {{"step": 2}})
"""
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 9
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-checkpoint-0000002")]  # debris left
    assert ckpt.latest_checkpoint(tmp_path) == previous
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000001"]


def test_state_encoding_round_trip_without_pickles():
    import numpy as np

    state = {"a": [1, 2.5, None, "x", True], "t": torch.arange(6).view(2, 3), "rng": ckpt.rng_state(),
             "n": {"u32": np.arange(5, dtype=np.uint32), "f": np.float64(0.25)}}
    json_part, tensors = ckpt.encode_state(state)
    json.dumps(json_part)  # JSON-serialisable
    back = ckpt.decode_state(json.loads(json.dumps(json_part)), tensors)
    assert torch.equal(back["t"], state["t"]) and back["a"] == state["a"]
    assert back["n"]["u32"].dtype == np.uint32 and back["n"]["u32"].tolist() == [0, 1, 2, 3, 4]
    ckpt.set_rng_state(back["rng"])
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])


def test_nonfinite_loss_skips_then_stops(init_dir, prepared, tmp_path, monkeypatch):
    real_loss = trainer_module.lm_loss
    bad_calls = set(range(6, 8)) | set(range(12, 100))  # micro-batches: step 4 is bad, then steps 7 onwards

    def sometimes_nan(logits, targets):
        call = sometimes_nan.calls
        sometimes_nan.calls += 1
        loss = real_loss(logits, targets)
        return loss * float("nan") if call in bad_calls else loss

    sometimes_nan.calls = 0
    monkeypatch.setattr(trainer_module, "lm_loss", sometimes_nan)
    trainer = Trainer(config(init_dir, prepared, tmp_path, max_steps=20, eval_interval=5, max_bad_steps=3))
    monkeypatch.setattr(trainer, "evaluate", lambda: 1.0)  # evaluation calls lm_loss too; keep it out of the count
    with pytest.warns(UserWarning, match="update skipped") as caught:
        with pytest.raises(TrainingError, match="3 updates in a row were skipped.*checkpoint-0000005"):
            trainer.train()
    assert len(caught) == 4  # step 4 once, then steps 7, 8, 9
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-0000005"  # the last good checkpoint stays
    assert trainer.step == 8


def test_skipped_update_leaves_weights_unchanged(init_dir, prepared, tmp_path, monkeypatch):
    trainer = Trainer(config(init_dir, prepared, tmp_path, max_steps=3, grad_accum=1, eval_interval=0))
    trainer.train(stop_after=1)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    monkeypatch.setattr(trainer_module, "lm_loss", lambda logits, targets: logits.sum() * float("inf"))
    with pytest.warns(UserWarning, match="loss is -?(nan|inf)"):
        trainer.train(stop_after=2)
    after = trainer.raw_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_early_stopping_keeps_best_and_last(init_dir, prepared, tmp_path, monkeypatch):
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7])
    trainer = Trainer(config(init_dir, prepared, tmp_path, max_steps=20, eval_interval=2, patience=2,
                             keep_checkpoints=1))
    monkeypatch.setattr(trainer, "evaluate", lambda: next(scripted))
    result = trainer.train()
    assert result.stopped_by == "early stopping" and result.step == 8
    assert result.best_val_loss == 2.0 and result.best_checkpoint.name == "checkpoint-0000004"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000004", "checkpoint-0000008"]
    # The final model in --out is the best one.
    assert (tmp_path / "model.safetensors").read_bytes() == (result.best_checkpoint / "model.safetensors").read_bytes()
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert [e["val_loss"] for e in evals] == [3.0, 2.0, 2.5, 2.6]


def test_early_stopping_logs_the_updates_since_the_last_line(init_dir, prepared, tmp_path, monkeypatch):
    """A run that stops early between two log lines writes a line for its last updates, as a run reaching max_steps
    does (steps 7-8 had none), and its last checkpoint holds no window of updates left to write."""
    scripted = iter([3.0, 2.0, 2.5, 2.6])
    trainer = Trainer(config(init_dir, prepared, tmp_path, max_steps=20, eval_interval=2, patience=2,
                             log_interval=3))
    monkeypatch.setattr(trainer, "evaluate", lambda: next(scripted))
    result = trainer.train()
    assert result.stopped_by == "early stopping" and result.step == 8
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == [3, 6, 8]
    assert ckpt.load_training_state(result.last_checkpoint)["log_window"]["steps"] == 0


def test_a_signal_during_an_evaluation_stops_the_run_at_that_step(init_dir, prepared, tmp_path, monkeypatch):
    """SIGTERM while evaluating: the step just evaluated is saved and the run stops there, where it went on with one
    more update (the stop was read in the next step) and saved that."""
    trainer = Trainer(config(init_dir, prepared, tmp_path, max_steps=8, eval_interval=4))
    evaluate = trainer.evaluate

    def signalled_while_evaluating() -> float:
        trainer._stop_signal = "SIGTERM"  # what the handler does when the signal arrives
        return evaluate()

    monkeypatch.setattr(trainer, "evaluate", signalled_while_evaluating)
    result = trainer.train()
    assert (result.stopped_by, result.step, result.last_checkpoint.name) == ("SIGTERM", 4, "checkpoint-0000004")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000004"]


def test_checkpoint_loads_in_transformers_with_equal_logits(init_dir, prepared, tmp_path):
    from transformers import GPT2LMHeadModel

    result = Trainer(config(init_dir, prepared, tmp_path, max_steps=2, eval_interval=2)).train()
    theirs = GPT2LMHeadModel.from_pretrained(result.last_checkpoint).eval()
    ours = GPT.from_pretrained(result.last_checkpoint).eval()
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x).logits, atol=1e-5)


@pytest.mark.parametrize("compile_optimizer", [False, True])
def test_update_equals_a_reference_loop_with_torch_adamw_and_clip_grad_norm(init_dir, prepared, tmp_path,
                                                                            compile_optimizer):
    """Three updates of the Trainer (grad_accum 2, clipping on; AdamW in waves or in one compiled pass) equal a loop
    written with transformers' GPT-2, F.cross_entropy, clip_grad_norm_ and torch.optim.AdamW on the same batches.
    Adam divides a constant gradient
    scale away, and clipping every update would too; so the clip bites only the first update, and a large eps makes
    the update depend on the scale: a missing or doubled `/ grad_accum` then shows far above the tolerance."""
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    peak, min_lr_ratio, accum, clip, eps = 3e-3, 0.1, 2, 2.0, 1e-3
    trainer = Trainer(config(init_dir, prepared, tmp_path, max_steps=3, warmup_steps=1, grad_accum=accum, lr=peak,
                             min_lr_ratio=min_lr_ratio, grad_clip=clip, eps=eps, weight_decay=0.1, dropout=0.0,
                             eval_interval=0, compile_optimizer=compile_optimizer))
    assert trainer.optimizer.compiled == compile_optimizer
    batches = []
    next_batch = trainer.loader.next_batch
    trainer.loader.next_batch = lambda: batches.append(next_batch()) or batches[-1]
    result = trainer.train()
    assert result.step == 3 and len(batches) == 3

    reference = GPT2LMHeadModel.from_pretrained(init_dir, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0).train()
    named = list(reference.named_parameters())
    decays = {name: not (name.endswith(".bias") or ".ln_" in name) for name, _ in named}
    decay = [p for name, p in named if decays[name]]
    no_decay = [p for name, p in named if not decays[name]]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=peak, betas=(0.9, 0.95), eps=eps)
    # The documented schedule for warmup 1, max_steps 3: peak at step 0 (1/1 of warmup), then cosine from the peak
    # (progress 0) to halfway down to min_lr (progress 1/2, cos(pi/2) = 0).
    min_lr = peak * min_lr_ratio
    rates = [peak, peak, min_lr + (peak - min_lr) * 0.5]
    norms = []
    for lr, (x, y) in zip(rates, batches):
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = x.shape[0] // accum
        for i in range(accum):
            rows = slice(i * micro, (i + 1) * micro)
            logits = reference(x[rows]).logits
            (F.cross_entropy(logits.flatten(0, 1), y[rows].flatten()) / accum).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), clip).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert norms[0] > clip > norms[-1], norms  # clipped at first, not at the end: the gradient's scale matters

    ours = weights(result.last_checkpoint)
    for name, p in named:
        torch.testing.assert_close(ours[name], p.detach(), atol=2e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_gradient_checkpointing_and_bf16_train(init_dir, prepared, tmp_path, saved_for_backward):
    """Recomputed activations give fp32's weights; bf16 autocast gives fp32's losses to bf16 rounding. bf16 rounds
    each value by up to 2^-9 relative (0.02 of a loss near 10.8); a loss, a mean over many tokens, agrees better
    still. So 0.02 nats is bf16-sized, and a tenth of the 0.2 by which one update here lowers the loss."""
    common = dict(max_steps=2, eval_interval=0, dropout=0.0)
    with saved_for_backward() as plain_saved:
        plain = Trainer(config(init_dir, prepared, tmp_path / "a", **common)).train()
    with saved_for_backward() as recomputed_saved:
        recomputed = Trainer(config(init_dir, prepared, tmp_path / "b", gradient_checkpointing=True,
                                    **common)).train()
    # Recomputed, the blocks keep nothing for backward; plain, at least their MLP's hidden activations: (4, 32, 256)
    # fp32 per layer (2), micro-batch (2) and step (2). The logits, kept either way, dwarf them both.
    assert plain_saved.bytes - recomputed_saved.bytes >= 4 * 32 * 256 * 4 * 2 * 2 * 2
    a, b = weights(plain.last_checkpoint), weights(recomputed.last_checkpoint)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    bf16 = Trainer(config(init_dir, prepared, tmp_path / "c", dtype="bf16", **common)).train()
    fp32_losses, bf16_losses = losses(tmp_path / "a"), losses(tmp_path / "c")
    assert len(bf16_losses) == 2 and bf16_losses != fp32_losses  # autocast really ran in bf16
    assert bf16_losses == pytest.approx(fp32_losses, abs=0.02)
    assert bf16.best_val_loss == pytest.approx(plain.best_val_loss, abs=0.02)  # after the bf16 run's updates
    assert bf16_losses[1] < bf16_losses[0] and bf16.best_val_loss < bf16_losses[0]  # and it learned


def test_fp16_loss_scaler_skips_overflows_without_stopping(init_dir, prepared, tmp_path, monkeypatch):
    """fp16 needs a GPU in real runs; forced onto the CPU here, the same code path runs with a real loss scaler."""
    monkeypatch.setattr(trainer_module, "resolve_dtype", lambda name, device: "fp16")
    trainer = Trainer(config(init_dir, prepared, tmp_path, max_steps=12, eval_interval=0, max_bad_steps=2))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # too large: fp16 gradients overflow at first
    start = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    with pytest.warns(UserWarning, match="fp16 gradients overflowed"):
        trainer.train_step()
    assert all(torch.equal(start[k], v) for k, v in trainer.raw_model.state_dict().items())  # update skipped
    with pytest.warns(UserWarning, match="fp16 gradients overflowed"):
        result = trainer.train()  # more overflows than max_bad_steps: the scaler's business, not a reason to stop
    assert result.step == 12 and trainer.scaler.get_scale() < 2.0**24 and trainer.bad_steps == 0
    assert not all(torch.equal(start[k], v) for k, v in trainer.raw_model.state_dict().items())  # then it trained


def test_fp16_on_cpu_and_auto_dtype(monkeypatch):
    """"auto" on a CPU is bf16 exactly where bf16 matmuls timed at least BF16_SPEEDUP times as fast as fp32 ones."""
    device = torch.device("cpu")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        trainer_module.resolve_dtype("fp16", device)
    flags = {flag for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    speedup = trainer_module.bf16_matmul_speedup()
    assert math.isfinite(speedup) and speedup > 0
    if "amx_tile" in flags:  # AMX multiplies bf16 several times faster than AVX-512 does fp32
        assert trainer_module.resolve_dtype("auto", device) == "bf16"
    threshold = trainer_module.BF16_SPEEDUP
    for measured, expected in ((threshold, "bf16"), (threshold * 0.99, "fp32"), (0.5, "fp32")):
        monkeypatch.setattr(trainer_module, "bf16_matmul_speedup", lambda measured=measured: measured)
        assert trainer_module.resolve_dtype("auto", device) == expected, measured


def test_auto_dtype_stays_what_the_resumed_run_trained_in(init_dir, prepared, tmp_path, monkeypatch, capsys):
    """A run resumed with --dtype auto keeps the precision it trained in, whatever the timing says now; an explicit
    --dtype, or a new run, decides afresh."""
    settings = dict(dtype="auto", max_steps=4, eval_interval=2)
    monkeypatch.setattr(trainer_module, "bf16_matmul_speedup", lambda: 3.0)
    first = Trainer(config(init_dir, prepared, tmp_path / "run", **settings))
    assert first.dtype == "bf16"
    first.train(stop_after=2)
    monkeypatch.setattr(trainer_module, "bf16_matmul_speedup", lambda: 1.0)
    capsys.readouterr()
    resumed = Trainer(config(init_dir, prepared, tmp_path / "run", resume="auto", **settings))
    assert resumed.dtype == "bf16"
    assert "--dtype auto: training in bf16, as the run resumed did" in capsys.readouterr().out
    assert Trainer(config(init_dir, prepared, tmp_path / "run", resume="auto", **{**settings, "dtype": "fp32"})
                   ).dtype == "fp32"
    assert Trainer(config(init_dir, prepared, tmp_path / "new", **settings)).dtype == "fp32"
    assert "--dtype auto: training in fp32 on this cpu" in capsys.readouterr().out
    assert resumed.train().step == 4


def test_overwrite_replaces_a_run_only_after_its_first_checkpoint(init_dir, prepared, tmp_path):
    Trainer(config(init_dir, prepared, tmp_path, max_steps=2, eval_interval=2)).train()
    with pytest.raises(ConfigError, match="already holds a training run"):
        Trainer(config(init_dir, prepared, tmp_path, max_steps=2))
    trainer = Trainer(config(init_dir, prepared, tmp_path, max_steps=3, eval_interval=3, overwrite=True))
    trainer.train(stop_after=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000001"]  # the old run is gone
    result = trainer.train()  # a second call continues the new run: nothing of it is set aside
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000003"] and result.step == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".replaced-run")]


def test_a_run_that_fails_puts_the_run_it_was_to_replace_back(init_dir, prepared, tmp_path):
    """--overwrite sets the old run aside until the new one has a checkpoint; a new run that fails before then
    (here its data cannot be read) leaves the folder exactly as it found it, not hidden in .replaced-run-*."""
    Trainer(config(init_dir, prepared, tmp_path, max_steps=2, eval_interval=1)).train()
    before = tree(tmp_path)
    trainer = Trainer(config(init_dir, prepared, tmp_path, max_steps=2, overwrite=True))

    def unreadable():
        raise OSError("I/O error")

    trainer.loader.next_batch = unreadable
    with pytest.raises(OSError, match="I/O error"):
        trainer.train()
    assert tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_run_killed_while_replacing_another_leaves_it_for_the_user_to_choose(init_dir, prepared, tmp_path):
    """SIGKILL (no cleanup runs) after --overwrite set the old run aside and before the new run's first checkpoint:
    the next run there is refused, naming the set-aside folder, rather than told "nothing to resume; pass
    --overwrite", which would leave the old run hidden for good."""
    import signal
    import time

    out = tmp_path / "run"
    Trainer(config(init_dir, prepared, out, max_steps=1, eval_interval=0)).train()
    flags = ["--init", init_dir, "--data", prepared, "--out", out, "--overwrite", "--max_steps", 10**6,
             "--eval_interval", 10**6, "--batch_size", 2, "--block_size", 32, "--device", "cpu", "--progress", "false",
             "--samples", 0, "--report", "false"]
    with subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, flags)], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}) as process:
        deadline = time.monotonic() + 60
        while not list(out.glob(".replaced-run-*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    [set_aside] = out.glob(".replaced-run-*")
    assert (set_aside / "checkpoint-0000001").is_dir()
    done = run_cli(*flags)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: --out {out}: {set_aside.name} holds a run set aside by an --overwrite run that was killed before "
        f"its first checkpoint; move its contents back into {out} to keep that run, or delete it, then run again"]
    assert (set_aside / "checkpoint-0000001").is_dir()


def test_resuming_an_earlier_checkpoint_replaces_the_later_ones_only_if_asked(init_dir, prepared, tmp_path):
    """Resuming checkpoint 2 of a run that went on to 4 starts a new line of checkpoints: refused without
    --overwrite (the later ones would be mixed with the new, and pruning took the new one of them); with it, the
    later ones go, and training on reaches the very weights of the first line (resume is exact)."""
    first = Trainer(config(init_dir, prepared, tmp_path, max_steps=4, eval_interval=1, keep_checkpoints=4)).train()
    straight = weights(first.last_checkpoint)
    earlier = tmp_path / "checkpoint-0000002"
    with pytest.raises(ConfigError, match=r"holds later checkpoints of this run \(up to checkpoint-0000004\); pass "
                                          r"--overwrite to train on from step 2"):
        Trainer(config(init_dir, prepared, tmp_path, max_steps=4, eval_interval=1, resume=str(earlier)))
    again = Trainer(config(init_dir, prepared, tmp_path, max_steps=4, eval_interval=1, keep_checkpoints=1,
                           resume=str(earlier), overwrite=True)).train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-0000004"]
    assert again.last_checkpoint == first.last_checkpoint
    assert all(torch.equal(v, straight[k]) for k, v in weights(again.last_checkpoint).items())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".replaced-run")]


def test_a_diverged_validation_loss_stops_the_run(init_dir, prepared, tmp_path):
    """A learning rate that blows the weights up gives a non-finite validation loss: the run stops with an error
    there instead of saving it as its best checkpoint and reporting success."""
    with pytest.raises(TrainingError, match=r"the validation loss at step 1 is nan: the weights have diverged "
                                            r"\(no checkpoint was written\)"):
        Trainer(config(init_dir, prepared, tmp_path, lr=1e30, grad_clip=0.0, warmup_steps=0, max_steps=2,
                       eval_interval=1, max_bad_steps=5)).train()
    assert ckpt.list_checkpoints(tmp_path) == [] and not (tmp_path / "model.safetensors").exists()


def test_metrics_lines_are_strict_json(tmp_path):
    """A window of skipped steps has no mean loss: metrics.jsonl says null, which every JSON reader takes, not
    Python's NaN, which jq and JSON.parse refuse."""
    from minigpt2.run_folder import RunFolder

    RunFolder(tmp_path, overwrite=False).append_metrics({"step": 3, "loss": float("nan"), "lr": 1e-3})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert line == '{"step": 3, "loss": null, "lr": 0.001}\n'
    assert json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}")) == {
        "step": 3, "loss": None, "lr": 0.001}


def test_empty_resume_is_refused_not_taken_for_unset():
    """In a config file or the API, an empty --resume (an unset shell variable) is an error, not a new run."""
    with pytest.raises(ConfigError, match="--resume is empty"):
        TrainConfig(resume=" ")


def test_training_goes_on_when_stdout_is_a_broken_pipe(init_dir, prepared, tmp_path, monkeypatch):
    """`python train.py | tee log` and Ctrl-C: tee is gone before the trainer says it is saving. Its messages are
    lost, not the run."""
    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Gone())
    result = Trainer(config(init_dir, prepared, tmp_path, max_steps=2, eval_interval=1)).train()
    assert result.step == 2 and result.stopped_by is None and (tmp_path / "model.safetensors").is_file()


def test_toml_config_and_flags(init_dir, prepared, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'init = "{init_dir}"\nmax-steps = 7\nlr = 1\neval_batches = "none"\n')
    cfg = train.parse_config(["--config", str(toml), "--max_steps", "9", "--block-size", "16"])
    assert (cfg.init, cfg.max_steps, cfg.block_size, cfg.lr, cfg.eval_batches) == (str(init_dir), 9, 16, 1.0, None)
    toml.write_text("lr = 'fast'\n")
    with pytest.raises(ConfigError, match=f"--config {toml}: lr must be float"):
        train.parse_config(["--config", str(toml)])
    toml.write_bytes(b"\xef\xbb\xbfout = '~/runs/a'\n")  # a byte-order mark, and ~, which no shell expanded
    assert train.parse_config(["--config", str(toml)]).out == str(Path.home() / "runs" / "a")
    toml.write_text("max_step = 3\n")
    with pytest.raises(ConfigError, match=f"--config {toml}: unknown setting 'max_step'; did you mean 'max_steps'"):
        train.parse_config(["--config", str(toml)])


def test_bool_flags_alone_mean_true(tmp_path):
    """`--overwrite`, as the "already holds a training run" error suggests, used to need a value."""
    out = ["--out", str(tmp_path)]
    cfg = train.parse_config(["--overwrite", "--progress", "false", "--gradient-checkpointing", *out])
    assert (cfg.overwrite, cfg.progress, cfg.gradient_checkpointing, cfg.compile) == (True, False, True, False)
    assert train.parse_config(["--overwrite", "no", *out]).overwrite is False


def run_cli(*flags, cwd=ROOT, env=None, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, flags)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_cli_bad_input_is_one_line_exit_2_and_touches_nothing(init_dir, prepared, tmp_path):
    out = tmp_path / "run"
    Trainer(config(init_dir, prepared, out, max_steps=2, eval_interval=2)).train()
    before = tree(out)
    Trainer(config(init_dir, prepared, tmp_path / "other", max_steps=1, eval_interval=1)).train()
    other_before = tree(tmp_path / "other")
    good = ["--init", init_dir, "--data", prepared, "--out", out, "--block_size", 32, "--device", "cpu"]
    half_prepared = tmp_path / "half"
    shutil.copytree(prepared, half_prepared)
    (half_prepared / "val.bin").unlink()
    init_before = tree(init_dir)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait\n\nun deuxième document\n".encode("latin-1"))
    binary_toml = tmp_path / "binary.toml"
    binary_toml.write_bytes(b"\xdc\xff seed = 1")
    saved_model = tmp_path / "model"
    shutil.copytree(init_dir, saved_model)
    twice_toml = tmp_path / "twice.toml"
    twice_toml.write_text("max_steps = 2\nmax-steps = 3\n")
    unfinished = tmp_path / "unfinished"  # a run that failed before its first checkpoint
    unfinished.mkdir()
    for name in ("train_config.json", "metrics.jsonl"):
        shutil.copy(out / name, unfinished / name)
    cases = {
        "unknown flag": [*good, "--bogus", 1],
        "misspelled flag": [*good, "--max-step", 3],
        "unknown preset": [*good, "--model_preset", "gpt3"],
        "preset of a loaded model": [*good[:6], "--out", tmp_path / "new", *good[6:], "--model_preset", "gpt2"],
        "data needs a prepare.py option": [*good[:2], "--data", latin1, "--out", tmp_path / "new", *good[6:]],
        "prepared data missing a file": [*good[:2], "--data", half_prepared, "--out", tmp_path / "new", *good[6:]],
        "out is the init checkpoint": [*good[:4], "--out", init_dir, *good[6:], "--overwrite"],
        "empty init": [*good, "--init", ""],
        "two config files": [*good, "--config", tmp_path / "a.toml", "--config", tmp_path / "b.toml"],
        "negative report_tokens": [*good, "--report_tokens", -1],
        "bad value": [*good, "--max_steps", "ten"],
        "invalid value": [*good, "--lr", -1],
        "bad choice": [*good, "--dtype", "fp8"],
        "missing data": ["--init", init_dir, "--data", tmp_path / "nowhere", "--out", tmp_path / "new",
                         "--block_size", 32],
        "existing run": good,
        "missing config file": [*good, "--config", tmp_path / "nope.toml"],
        "config not UTF-8": [*good, "--config", binary_toml],
        "seed past 64 bits": [*good, "--seed", 2**64],
        "out is a file": [*good[:4], "--out", out / "train_config.json", *good[6:]],
        "resume past max_steps": [*good, "--resume", "auto", "--max_steps", 1],
        "resume elsewhere into a run": [*good[:4], "--out", tmp_path / "other", *good[6:], "--resume", out,
                                        "--max_steps", 3],
        "init inside out": ["--init", out / "checkpoint-0000002", *good[2:], "--overwrite"],
        "init on resume": [*good, "--resume", "auto", "--max_steps", 3, "--init", tmp_path / "other"],
        "lr beyond float32": [*good, "--lr", "1e39"],
        "no sample tokens": [*good, "--sample_tokens", 0],
        "too few report tokens": [*good, "--report_tokens", 1],
        "out holds a saved model": [*good[:4], "--out", saved_model, *good[6:]],
        "out holds a run without checkpoint": [*good[:4], "--out", unfinished, *good[6:]],
        "out name too long": [*good[:4], "--out", tmp_path / ("z" * 300), *good[6:]],
        "resume a missing folder": [*good, "--resume", tmp_path / "nowhere"],
        "a setting twice in TOML": [*good, "--config", twice_toml],
    }
    errors = {}
    for what, flags in cases.items():
        done = run_cli(*flags)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (what, done.stderr)
        assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in done.stderr, (what, done.stderr)
        assert "settings" not in done.stdout, (what, done.stdout)  # shown once the run's input is accepted
        errors[what] = lines[0]
    assert "already holds a training run" in errors["existing run"] and "--resume" in errors["existing run"]
    assert "nowhere" in errors["missing data"] and "--bogus" in errors["unknown flag"]
    assert errors["misspelled flag"].endswith("did you mean --max-steps? (see --help)")
    assert "--model_preset 'gpt3' is not one of gpt2, gpt2-medium" in errors["unknown preset"]
    assert f"--model_preset shapes a new model (--init scratch); --init {init_dir} loads a model that has its own " \
        "shape" in errors["preset of a loaded model"]
    assert f"run `python data/prepare.py {latin1} --out DIR --errors ...`, then train with --data DIR" in \
        errors["data needs a prepare.py option"]
    assert not (tmp_path / ".prepared").exists()  # the cache folder made for it is gone again
    assert f"{half_prepared} is not a prepared dataset: it has no val.bin" in errors["prepared data missing a file"]
    assert "holds the --init checkpoint" in errors["out is the init checkpoint"] and tree(init_dir) == init_before
    assert f"--out {out} holds the --init checkpoint {out / 'checkpoint-0000002'}" in errors["init inside out"]
    assert f"--init {tmp_path / 'other'}: the run resumed from {out / 'checkpoint-0000002'} started from " \
        f"{init_dir} and goes on from its checkpoint; drop --init" in errors["init on resume"]
    assert "--lr 1e+39 is beyond float32's range" in errors["lr beyond float32"]
    assert "--sample_tokens must be at least 1, got 0" in errors["no sample tokens"]
    assert "--report_tokens must be 0 (the whole validation split) or at least 256" in errors["too few report tokens"]
    assert f"{saved_model} holds a saved model, not a training run" in errors["out holds a saved model"]
    assert f"--resume {tmp_path / 'nowhere'}: no such directory" in errors["resume a missing folder"]
    assert f"--config {twice_toml}: 'max-steps' and 'max_steps' are the same setting, set twice; keep one" in \
        errors["a setting twice in TOML"]
    assert f"{unfinished} holds a training run that ended before its first checkpoint, so there is nothing to " \
        "resume; pass --overwrite" in errors["out holds a run without checkpoint"]
    assert f"--out {tmp_path / ('z' * 300)}: File name too long; choose another --out" in errors["out name too long"]
    assert "--init is empty" in errors["empty init"]
    assert "--config is given more than once" in errors["two config files"]
    assert "--report_tokens must be >= 0" in errors["negative report_tokens"]
    assert "is a file, not a directory" in errors["out is a file"]
    assert "--max_steps above 2" in errors["resume past max_steps"]
    assert "not a readable TOML file" in errors["config not UTF-8"]
    assert "--seed must be between 0 and 2**64 - 1" in errors["seed past 64 bits"]
    elsewhere = errors["resume elsewhere into a run"]
    assert "--resume" in elsewhere and "--overwrite" in elsewhere
    assert tree(out) == before and tree(tmp_path / "other") == other_before and tree(saved_model) == tree(init_dir)
    assert not (tmp_path / "new").exists()


def test_cli_resume_names_the_checkpoint_whose_settings_are_damaged(init_dir, prepared, tmp_path):
    """A setting that no TrainConfig has (a hand edit, or a newer version's file) in the checkpoint resumed from is
    reported against that checkpoint's file, not as if the user had mistyped a flag."""
    out = tmp_path / "run"
    checkpoint = Trainer(config(init_dir, prepared, out, max_steps=2, eval_interval=2)).train().last_checkpoint
    state_file = checkpoint / "training_state.json"
    state = json.loads(state_file.read_text())
    state["config"]["bogus"] = 1
    state_file.write_text(json.dumps(state))
    done = run_cli("--out", out, "--resume", "auto", "--device", "cpu")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {state_file}: damaged settings (unknown setting 'bogus'; known settings: "
        f"{', '.join(sorted(f.name for f in dataclasses.fields(TrainConfig)))}); resume from another checkpoint"]


def test_resume_names_the_state_file_whose_optimizer_part_does_not_fit(init_dir, prepared, tmp_path):
    """Moments saved under a name the model does not have: the weights loaded from the same checkpoint, so the file
    is damaged, and the error says which one and what to do."""
    out = tmp_path / "run"
    checkpoint = Trainer(config(init_dir, prepared, out, max_steps=1, eval_interval=0)).train().last_checkpoint
    state_file = checkpoint / "training_state.json"
    state = json.loads(state_file.read_text())
    state["optimizer"]["transformer.bogus"] = state["optimizer"].pop("transformer.wte.weight")
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError) as error:
        Trainer(config(init_dir, prepared, out, max_steps=2, resume="auto")).train()
    assert str(error.value) == (f"{state_file}: optimizer state for unknown parameters transformer.bogus: the "
                                "checkpoint belongs to a different model; resume from another checkpoint")


def test_a_checkpoint_with_its_state_deleted_is_named_not_taken_for_no_checkpoint(init_dir, prepared, tmp_path):
    """checkpoint-* with training_state.json deleted by hand (saves are atomic, so no run leaves one): every way of
    going on names it and what it lacks, where the run was said to have ended before its first checkpoint, or an
    older checkpoint would have been resumed in its place; --overwrite still replaces the run."""
    out = tmp_path / "run"
    Trainer(config(init_dir, prepared, out, max_steps=4, eval_interval=2, keep_checkpoints=2)).train()
    newest = out / "checkpoint-0000004"
    (newest / "training_state.json").unlink()
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-0000002"  # what --resume auto took before
    lacks = f"{newest} lacks training_state.json, so it cannot be resumed; "
    put_back = f"put it back, or start a new run from its weights with --init {newest} and another --out"
    for resume in ("auto", str(out), str(newest)):
        with pytest.raises(ConfigError) as error:
            Trainer(config(init_dir, prepared, out, max_steps=6, resume=resume))
        assert str(error.value) == f"--resume {resume}: {lacks}{put_back}"
    for name in ("checkpoint-0000002", "checkpoint-0000004"):
        (out / name / "training_state.safetensors").unlink()
    with pytest.raises(ConfigError) as error:
        Trainer(config(init_dir, prepared, out, max_steps=6))
    assert str(error.value) == (f"--out {out}: {newest} lacks training_state.json and training_state.safetensors, "
                                "so it cannot be resumed; pass --overwrite to replace the run, or choose another --out")
    assert Trainer(config(init_dir, prepared, out, max_steps=2, eval_interval=2, overwrite=True)).train().step == 2
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-0000002"]


def test_cli_sizes_beyond_memory_are_one_line(init_dir, prepared, tmp_path):
    """A batch of 10^11 rows cannot be allocated anywhere: one line saying so and how to fix it, not numpy's
    traceback."""
    done = run_cli("--init", init_dir, "--data", prepared, "--out", tmp_path / "huge", "--block_size", 32,
                   "--grad_accum", 10**11, "--max_steps", 1, "--device", "cpu", "--progress", "false")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: out of memory (Unable to allocate ")
    assert done.stderr.strip().splitlines()[-1].endswith("; use smaller sizes (batch, sequence length, beams, ...)")


def test_cli_resume_keeps_the_checkpoints_shape(init_dir, prepared, tmp_path):
    """Resuming a scratch run: its own preset (as the resume hint repeats it, in either spelling) is accepted,
    another is refused rather than ignored; so is any preset for a run that started from a loaded model, even with
    --init scratch given."""
    out = tmp_path / "run"
    Trainer(TrainConfig(init="scratch", model_preset="tiny", data=str(prepared), out=str(out), max_steps=1,
                        batch_size=2, block_size=32, eval_interval=0, device="cpu", progress=False, samples=0,
                        report=False)).train()
    before = tree(out)
    resume = ["--init", "scratch", "--out", out, "--resume", "auto", "--device", "cpu", "--report", "false"]
    done = run_cli(*resume, "--model_preset", "gpt2")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"train.py: error: --model_preset gpt2: the run resumed from {out / 'checkpoint-0000001'} has the shape of "
        "tiny, which its checkpoint keeps; drop --model_preset (see --help)"]
    assert tree(out) == before
    done = run_cli(*resume, "--model_preset", "openai-community/tiny")
    assert done.returncode == 0, done.stderr

    loaded = Trainer(config(init_dir, prepared, tmp_path / "loaded", max_steps=1)).train().last_checkpoint
    done = run_cli("--init", "scratch", "--model_preset", "tiny", "--resume", loaded, "--out", tmp_path / "new",
                   "--device", "cpu")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"train.py: error: --model_preset tiny: the run resumed from {loaded} has the shape of the model it started "
        f"from ({init_dir}), which its checkpoint keeps; drop --model_preset (see --help)"]
    assert not (tmp_path / "new").exists()


def test_settings_a_resumed_run_keeps_are_refused_from_a_config_file_and_for_the_seed(prepared, tmp_path, capsys):
    """A resumed run keeps its shape, its starting model and its seed (the random state goes on from the
    checkpoint). Asked otherwise in a --config file, or --seed, they were accepted, ignored, and recorded in
    train_config.json as if they applied; explicit `none` now wins over a file too."""
    out = tmp_path / "run"
    Trainer(TrainConfig(init="scratch", model_preset="tiny", data=str(prepared), out=str(out), max_steps=1,
                        batch_size=2, block_size=32, eval_interval=0, device="cpu", progress=False, samples=0,
                        report=False, seed=7)).train()
    resumed = out / "checkpoint-0000001"
    toml = tmp_path / "run.toml"

    def refused(*flags: object) -> str:
        with pytest.raises(SystemExit) as exit_info:
            train.parse_config(["--out", str(out), "--resume", "auto", *map(str, flags)])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    toml.write_text('model_preset = "gpt2"\n')
    assert refused("--config", toml) == (
        f"train.py: error: --config {toml}: model_preset = 'gpt2': the run resumed from {resumed} has the shape of "
        f"tiny, which its checkpoint keeps; remove model_preset from {toml} (see --help)\n")
    toml.write_text('init = "gpt2"\n')
    assert refused("--config", toml) == (
        f"train.py: error: --config {toml}: init = 'gpt2': the run resumed from {resumed} started from scratch and "
        f"goes on from its checkpoint; remove init from {toml} (or use --init alone, without --resume, to start a "
        "new run from that model) (see --help)\n")
    assert refused("--seed", 8) == (
        f"train.py: error: --seed 8: the run resumed from {resumed} was seeded with 7, and its random state goes on "
        f"from its checkpoint; drop --seed (or start a new run from its weights with --init {resumed} and another "
        "seed) (see --help)\n")
    toml.write_text("seed = 8\n")
    assert refused("--config", toml).startswith(f"train.py: error: --config {toml}: seed = 8: the run resumed from ")
    toml.write_text('model_preset = "tiny"\nseed = 7\neval_batches = 1\ndropout = 0.2\n')  # the run's own: fine
    config = train.parse_config(["--out", str(out), "--resume", "auto", "--config", str(toml), "--seed", "7"])
    assert (config.seed, config.eval_batches, config.dropout) == (7, 1, 0.2)
    config = train.parse_config(["--out", str(out), "--resume", "auto", "--config", str(toml), "--eval_batches",
                                 "none", "--dropout", "None"])
    assert (config.eval_batches, config.dropout) == (None, None)
    assert train.parse_config(["--out", str(out), "--resume", "none"]).resume is None


def test_resume_with_another_global_batch_names_the_flags(init_dir, prepared, tmp_path):
    """Changing --grad_accum on resume changes the windows per step, which the data cursor cannot follow: the error
    names the flags and both products, where it named the loader's field and blamed batch_size."""
    out = tmp_path / "run"
    Trainer(config(init_dir, prepared, out, max_steps=2, eval_interval=2)).train()
    with pytest.raises(ConfigError) as error:
        Trainer(config(init_dir, prepared, out, max_steps=4, resume="auto", grad_accum=3))
    resumed = out / "checkpoint-0000002"
    assert str(error.value) == (
        f"--resume: the run in {resumed} took 8 windows per step (--batch_size 4 x --grad_accum 2 x 1 process(es)), "
        "and this one would take 12 (4 x 3 x 1); keep that product, or start a new run from its weights with --init "
        f"{resumed} and another --out")
    with pytest.raises(ConfigError, match=r"trained on windows of --block_size 32, not 16; keep it, or start"):
        Trainer(config(init_dir, prepared, out, max_steps=4, resume="auto", block_size=16))


def test_the_resume_hint_names_the_launcher_and_the_script_from_here(monkeypatch, tmp_path):
    """`Resume with:` said `python train.py` from anywhere, under torchrun too, where one process resumes a run of
    two with another global batch (refused)."""
    monkeypatch.chdir(tmp_path)
    assert train.script("train.py") == str(ROOT / "train.py")
    monkeypatch.chdir(ROOT)
    assert train.script("sample.py") == "sample.py"
    assert train.launcher() == "python"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert train.launcher() == "torchrun --nproc_per_node 2"
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert train.launcher().startswith("torchrun --nnodes 4 --nproc_per_node 2 ")


def test_cli_an_empty_resume_is_refused_not_read_as_a_new_run(init_dir, prepared, tmp_path):
    """`--resume "$CKPT"` with CKPT unset: with --overwrite, reading it as "no --resume" would replace the run."""
    out = tmp_path / "run"
    Trainer(config(init_dir, prepared, out, max_steps=1)).train()
    before = tree(out)
    done = run_cli("--init", init_dir, "--data", prepared, "--out", out, "--resume", "", "--overwrite",
                   "--max_steps", 2, "--batch_size", 2, "--block_size", 32, "--device", "cpu", "--progress", "false",
                   "--samples", 0, "--report", "false")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --resume is empty; give auto or a checkpoint directory, or leave --resume out to start a "
        "new run"]
    assert tree(out) == before
    done = run_cli("--out", out, "--eval_batches", "", "--device", "cpu")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "train.py: error: argument --eval_batches/--eval-batches: invalid int value: '' (see --help)"]


def test_cli_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(init_dir, prepared, tmp_path):
    """A write that fails inside safetensors (its error carries the OS's code in its message) is reported as any
    failed write is: one line naming the file, exit 2. A file-size limit stands in for a full disk: it needs no
    mount, and the write fails the same way (EFBIG instead of ENOSPC)."""
    import resource
    import signal

    out = tmp_path / "run"
    Trainer(config(init_dir, prepared, out, max_steps=1, eval_interval=0)).train()
    before = tree(out)
    limit = (out / "checkpoint-0000001" / "model.safetensors").stat().st_size // 2

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    flags = ["--init", init_dir, "--data", prepared, "--out", out, "--resume", "auto", "--max_steps", 2,
             "--batch_size", 4, "--block_size", 32, "--grad_accum", 2, "--device", "cpu", "--progress", "false",
             "--samples", 0, "--report", "false", "--eval_interval", 0]
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, flags)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
                          preexec_fn=limit_file_size)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1].startswith(f"error: {out}") and lines[-1].endswith("model.safetensors: File too large; check "
                                                                         "the path and its permissions"), lines
    after = tree(out)
    assert {name: after[name] for name in before if name.startswith("checkpoint-")} == \
        {name: data for name, data in before.items() if name.startswith("checkpoint-")}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_the_resume_hint_continues_the_run_in_its_own_directory():
    """A run started from another directory's checkpoint has checkpoints of its own once stopped: the hint resumes
    those (--resume auto), whichever way --resume was spelled."""
    assert train.resume_command(["--out", "b", "--resume", "a/checkpoint-0000005", "--lr", "1e-3"], Path("b")) == \
        ["--out", "b", "--resume", "auto", "--lr", "1e-3"]
    assert train.resume_command(["--resume=a/checkpoint-0000005", "--out=b"], Path("b")) == ["--resume=auto", "--out=b"]
    assert train.resume_command(["--out", "b"], Path("b")) == ["--out", "b", "--resume", "auto"]


def test_the_resume_hint_finds_a_run_resumed_without_out(init_dir, prepared, tmp_path, monkeypatch):
    """A run resumed by its checkpoint alone (`--resume DIR`, its --out taken from the checkpoint) and stopped again:
    the hint said `--resume auto`, which looks in the default --out, not in the run's."""
    out = tmp_path / "run"
    Trainer(config(init_dir, prepared, out, max_steps=2, eval_interval=2)).train()
    monkeypatch.chdir(tmp_path)
    given = ["--resume", str(out / "checkpoint-0000002"), "--max_steps", "4"]
    resumed = Trainer(train.parse_config(given)).train(stop_after=3)
    hint = train.parse_config(train.resume_command(given, resumed.out_dir))
    assert trainer_module.find_resume_checkpoint(hint.resume, Path(hint.out)) == resumed.last_checkpoint


@pytest.mark.parametrize("flag", ["--compile", "--compile_optimizer"])
def test_cli_compile_without_a_compiler_is_one_line(init_dir, prepared, tmp_path, flag):
    """Compiling on a CPU with no C++ compiler (CXX names none) fails before anything is written, not in a
    traceback from inside torch at the first step."""
    done = run_cli("--init", init_dir, "--data", prepared, "--out", tmp_path / "out", "--block_size", 32,
                   "--device", "cpu", flag, env={"CXX": "no-such-c++-compiler"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {flag} on a CPU needs a C++ compiler, which torch.compile builds its code with (No working C++ "
        "compiler found in torch._inductor.config.cpp.cxx: (None, 'no-such-c++-compiler')); install g++ or clang++ "
        f"(on Windows, MSVC), or leave out {flag}"]
    assert not (tmp_path / "out").exists()


def test_cli_hub_unreachable_names_the_offline_options(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    done = run_cli("--init", "gpt2", "--out", tmp_path / "out", env=env)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "cannot be reached" in line and "--init scratch" in line and "--init DIR" in line
    assert not (tmp_path / "out").exists()


def test_cli_ctrl_c_saves_and_says_how_to_resume(init_dir, prepared, tmp_path):
    out = tmp_path / "run"
    common = ["--device", "cpu", "--progress", "false", "--samples", 0]
    flags = ["--init", init_dir, "--data", prepared, "--out", out, "--max_steps", 100000, "--batch_size", 2,
             "--block_size", 32, "--eval_interval", 0, "--log_interval", 1, *common]
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, flags)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "Resume with: python train.py" in stdout and "--resume auto" in stdout
    checkpoint = ckpt.latest_checkpoint(out)
    assert checkpoint is not None
    step = int(checkpoint.name.removeprefix(ckpt.PREFIX))
    resumed = run_cli("--out", out, "--resume", "auto", "--max_steps", step + 1, *common)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout


def test_end_of_run_samples_take_every_prompt_token_as_text(capsys):
    """A model whose pad_token_id is the token that ends the first prompt ('):'): the samples at the end of a run
    were refused there (and elsewhere such a token was taken for padding), since generate() got no attention mask."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, n_positions=64))
    ids = torch.tensor([Tokenizer().encode(train.PROMPTS[0])])
    model.generation_config.pad_token_id = int(ids[0, -1])
    train.print_samples(model, TrainConfig(samples=1, sample_tokens=5, seed=3))
    printed = capsys.readouterr().out
    torch.manual_seed(3)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=True, top_k=50,
                              temperature=0.8)
    assert printed == f"--- sample: {train.PROMPTS[0]!r}\n{Tokenizer().decode(expected[0].tolist())}\n\n"


def test_cli_scratch_run_end_to_end(prepared, tmp_path):
    out = tmp_path / "scratch"
    done = run_cli("--init", "scratch", "--data", prepared, "--out", out, "--max_steps", 4, "--batch_size", 2,
                   "--block_size", 32, "--eval_interval", 2, "--samples", 1, "--sample_tokens", 5, "--device", "cpu",
                   "--progress", "false", timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--- sample" in done.stdout and f"the model is in {out}" in done.stdout
    assert f"settings (written to {out / 'train_config.json'} when training starts):\n  init = 'scratch'\n" in \
        done.stdout
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["init"] == "scratch" and saved["max_steps"] == 4
    assert (out / "config.json").exists() and (out / "metrics.jsonl").exists()
    assert (out / "loss.png").exists() or "matplotlib is not installed" in done.stdout
    GPT.from_pretrained(out)  # the final model loads like any checkpoint
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "untrained tiny" in report and "bits per byte" in report and "n/a" not in report, report


def test_triton_attention_trains_like_sdpa(init_dir, prepared, tmp_path, monkeypatch):
    """--attn_impl triton (the kernel, in Triton's interpreter without a GPU) takes the same steps as sdpa."""
    import kernels

    calls = []
    real = kernels.flash_attention
    monkeypatch.setattr(kernels, "flash_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    runs = {impl: Trainer(config(init_dir, prepared, tmp_path / impl, max_steps=2, grad_accum=1, eval_interval=0,
                                 dropout=0.0, attn_impl=impl)).train() for impl in ("sdpa", "triton")}
    assert calls, "the triton run never called the kernel"
    a, b = weights(runs["sdpa"].last_checkpoint), weights(runs["triton"].last_checkpoint)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert len(losses(tmp_path / "sdpa")) == 2
    assert losses(tmp_path / "triton") == pytest.approx(losses(tmp_path / "sdpa"), rel=1e-5)


def test_triton_attention_with_dropout_warns_and_uses_sdpa(init_dir, monkeypatch):
    from minigpt2 import model as model_module

    monkeypatch.setattr(model_module, "_warned", set())
    model = GPT.from_pretrained(init_dir, attn_impl="triton", attn_pdrop=0.1).train()
    with pytest.warns(UserWarning, match="no attention dropout.*--dropout 0"):
        model(torch.randint(0, 50257, (1, 8)))
    with pytest.raises(ConfigError, match="--attn_impl 'flash' is not one of"):
        TrainConfig(attn_impl="flash")


def test_metrics_lines_are_resume_exact_with_a_log_interval(init_dir, prepared, tmp_path):
    """Stopped mid-way through a logging window, the resumed run's metrics.jsonl lines (each averaging its window's
    losses) equal the straight run's; only the measured speed differs."""
    def lines(out: Path) -> list[dict]:
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

    settings = dict(log_interval=3, eval_interval=0, max_steps=7)
    Trainer(config(init_dir, prepared, tmp_path / "a", **settings)).train()
    Trainer(config(init_dir, prepared, tmp_path / "b", **settings)).train(stop_after=4)
    Trainer(config(init_dir, prepared, tmp_path / "b", resume="auto", **settings)).train()
    straight = lines(tmp_path / "a")
    assert [r["step"] for r in straight if "loss" in r] == [3, 6, 7]
    assert lines(tmp_path / "b") == straight


def test_compiled_training_takes_the_eager_steps_in_one_graph(init_dir, prepared, tmp_path, monkeypatch):
    """--compile compiles the model and the loss as one graph (no break between them, none inside; AdamW's update
    stays as it is) and takes the eager loop's updates, to rounding. Inductor sums in another order, and Adam's step
    is about lr whatever a gradient's size, so a weight whose gradient is near zero can move by a part of lr (3e-3)
    more or less: 1e-4 allows that, while a wrong loss or gradient would move the weights by whole steps of lr."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    common = dict(max_steps=2, grad_accum=2, eval_interval=0, dropout=0.0)
    eager = Trainer(config(init_dir, prepared, tmp_path / "eager", **common)).train()
    traced = {"loss": False}  # whether dynamo traced the loss (written, never read: no guard, no recompile)
    real = trainer_module.lm_loss
    monkeypatch.setattr(trainer_module, "lm_loss", lambda logits, y: torch.compiler.is_compiling() and traced.update(
        loss=True) or real(logits, y))
    compiled = Trainer(config(init_dir, prepared, tmp_path / "compiled", compile=True, **common)).train()
    assert traced["loss"]
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-5)
    a, b = weights(eager.last_checkpoint), weights(compiled.last_checkpoint)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture
def lock_held_elsewhere():
    """`hold(folder) -> process`: another process holding `folder`'s FolderLock until it is killed."""
    holders = []

    def hold(folder: Path) -> subprocess.Popen:
        code = ("import sys, time\nfrom minigpt2.atomic import FolderLock\n"
                "assert FolderLock(sys.argv[1]).acquire() is None\nprint('held', flush=True)\ntime.sleep(120)")
        process = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                                   cwd=ROOT)
        holders.append(process)
        assert process.stdout.readline() == "held\n"
        return process

    yield hold
    for process in holders:
        process.kill()
        process.wait()


@pytest.mark.skipif(atomic.fcntl is None, reason="folders are not locked without fcntl (Windows)")
def test_a_run_in_progress_keeps_others_out_of_its_directory(init_dir, prepared, tmp_path, lock_held_elsewhere):
    """A second train.py on an --out that a running process writes is refused (one line, exit 2, nothing touched),
    also when both started on an empty --out and the other took the lock first, or even wrote its whole run before
    this one began training; once the other process is gone, killed without a chance to clean up, the directory is
    free again, and a finished run leaves no lock file."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    holder = lock_held_elsewhere(out)
    flags = ["--init", init_dir, "--data", prepared, "--out", out, "--block_size", 32, "--device", "cpu",
             "--max_steps", 1, "--samples", 0, "--report", "false", "--progress", "false"]
    done = run_cli(*flags)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"error: --out {out} is in use by another training run (process "
                                                    f"{holder.pid}); wait for it to end, or choose another --out")
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt"]

    late = tmp_path / "late"  # no directory yet when the trainer is set up: the lock is taken by train()
    trainer = Trainer(config(init_dir, prepared, late, max_steps=1))
    late.mkdir()
    lock_held_elsewhere(late)
    with pytest.raises(ConfigError, match="is in use by another training run"):
        trainer.train()
    assert [p.name for p in late.iterdir()] == [".lock"]

    holder.kill()
    holder.wait()
    assert run_cli(*flags).returncode == 0
    assert ".lock" not in {p.name for p in out.iterdir()} and (out / "model.safetensors").is_file()

    # Set up on an empty --out, then another run writes there and ends before this one starts training.
    slow = Trainer(config(init_dir, prepared, tmp_path / "raced", max_steps=1))
    Trainer(config(init_dir, prepared, tmp_path / "raced", max_steps=1)).train()
    written = tree(tmp_path / "raced")
    with pytest.raises(ConfigError, match="another training run wrote into .* after this one was set up"):
        slow.train()
    assert tree(tmp_path / "raced") == written

    # A caller that writes more files of the run after train() (train.py: samples, the report) keeps the lock.
    trainer = Trainer(config(init_dir, prepared, tmp_path / "held", max_steps=1))
    lock = atomic.FolderLock(tmp_path / "held")
    with trainer.out_locked():
        trainer.train()
        assert lock.acquire() == os.getpid()  # another opener is refused, even in this process
    assert lock.acquire() is None
    lock.release()


def test_a_text_file_on_read_only_media_says_to_prepare_it_elsewhere(init_dir, tmp_path, monkeypatch):
    """train.py --data FILE prepares FILE into a cache beside it; where that cannot be written, the fix is
    prepare.py's --out, not train.py's (whose --out is the run's)."""
    import errno

    from minigpt2 import prepare as prepare_module
    from minigpt2.errors import DataError

    text = tmp_path / "media" / "notes.txt"
    text.parent.mkdir()
    text.write_text("\n\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(prepare_module, "staging_path", read_only)
    with pytest.raises(DataError) as caught:
        Trainer(config(init_dir, text, tmp_path / "run"))
    assert str(caught.value) == (
        f"--data {text}: cannot write to {text.parent / '.prepared'} (Read-only file system), where train.py keeps "
        f"its prepared copy; run `python data/prepare.py {text} --out DIR` with a folder you can write, then train "
        "with --data DIR")
    assert not (tmp_path / "run").exists()


def test_resume_by_path_goes_on_in_the_folder_that_holds_the_checkpoint(init_dir, prepared, tmp_path):
    """`--resume DIR` without --out continued in the --out saved with the checkpoint, relative to whatever the
    working directory was then: from another directory, or after the run's folder was moved, it started a new run
    elsewhere and left the run it named as it was."""
    Trainer(config(init_dir, prepared, tmp_path / "before", max_steps=2, eval_interval=2)).train()
    moved = tmp_path / "after"
    (tmp_path / "before").rename(moved)
    for resume in (moved, moved / "checkpoint-0000002"):
        resumed = train.parse_config(["--resume", str(resume), "--max_steps", "3"])
        assert Path(resumed.out) == moved
        assert Trainer(resumed).folder.continues


def test_relative_data_and_init_are_found_when_resuming_from_another_directory(init_dir, prepared, tmp_path,
                                                                               monkeypatch):
    """--data and --init typed relative to the working directory were saved as typed, so a run resumed from another
    directory read them against that one: its data was missing, and its before/after report at the end could not
    load the model it started from."""
    monkeypatch.chdir(init_dir.parent)
    Trainer(config(init_dir.name, os.path.relpath(prepared), tmp_path / "run", max_steps=2, eval_interval=2)).train()
    monkeypatch.chdir(tmp_path)
    resumed = train.parse_config(["--resume", str(tmp_path / "run"), "--max_steps", "3"])
    assert (Path(resumed.init), Path(resumed.data)) == (init_dir.resolve(), Path(prepared).resolve())
    assert Trainer(resumed).train().step == 3


def test_a_run_resumed_into_another_folder_ends_with_its_best_model(init_dir, prepared, tmp_path, monkeypatch):
    """Resumed into another --out, a run whose best checkpoint so far stayed best looked for it in the new folder:
    the end of the run failed to export it (no such file). It is copied over with the first save."""
    settings = dict(max_steps=8, eval_interval=2, keep_checkpoints=1)
    first = Trainer(config(init_dir, prepared, tmp_path / "a", **settings))
    monkeypatch.setattr(first, "evaluate", iter([3.0, 2.0]).__next__)
    assert first.train(stop_after=5).best_checkpoint.name == "checkpoint-0000004"
    resumed = Trainer(config(init_dir, prepared, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-0000005"),
                             **settings))
    monkeypatch.setattr(resumed, "evaluate", iter([2.5, 2.6]).__next__)
    result = resumed.train()
    assert result.best_checkpoint == tmp_path / "b" / "checkpoint-0000004"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "b")] == ["checkpoint-0000004", "checkpoint-0000008"]
    best = tmp_path / "a" / "checkpoint-0000004"
    for name in ("model.safetensors", ckpt.STATE_TENSORS):
        assert (result.best_checkpoint / name).read_bytes() == (best / name).read_bytes()
    assert (result.model_dir / "model.safetensors").read_bytes() == (best / "model.safetensors").read_bytes()


def test_resuming_with_the_relative_data_and_init_it_started_with_changes_no_setting(init_dir, prepared, tmp_path,
                                                                                      monkeypatch, capsys):
    """The resume hint repeats the run's own flags, relative --data and --init too, which the checkpoint holds made
    absolute: they name the same files, so resuming changes no setting (it said both had changed)."""
    monkeypatch.chdir(init_dir.parent)
    init, data = init_dir.name, os.path.relpath(prepared)
    Trainer(config(init, data, tmp_path / "run", max_steps=4, eval_interval=2)).train(stop_after=2)
    capsys.readouterr()
    Trainer(config(init, data, tmp_path / "run", max_steps=4, eval_interval=2, resume="auto"))
    assert "settings changed" not in capsys.readouterr().out


def test_a_finished_run_resumed_into_another_folder_is_refused_before_any_file(init_dir, prepared, tmp_path):
    """Resumed at its --max_steps into another --out, a run has no step to train, so nothing copies its checkpoints
    there: exporting its best model then failed with a FileNotFoundError traceback from the empty folder."""
    Trainer(config(init_dir, prepared, tmp_path / "a", max_steps=2, eval_interval=2)).train()
    with pytest.raises(ConfigError, match="at step 2, --max_steps 2: nothing left to train"):
        Trainer(config(init_dir, prepared, tmp_path / "b", max_steps=2, eval_interval=2, resume=str(tmp_path / "a")))
    assert not (tmp_path / "b").exists()


def test_resuming_by_path_from_another_directory_changes_no_setting(init_dir, prepared, tmp_path, monkeypatch,
                                                                     capsys):
    """`--resume DIR` alone goes on in the folder that holds the checkpoint, which its --out named relative to the
    directory the run started in: the same folder, so no setting changed (it said --out had)."""
    monkeypatch.chdir(tmp_path)
    Trainer(config(init_dir, prepared, "run", max_steps=4, eval_interval=2)).train(stop_after=2)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    Trainer(train.parse_config(["--resume", str(tmp_path / "run")]))
    assert "settings changed" not in capsys.readouterr().out
