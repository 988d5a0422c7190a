"""Sliding-window perplexity against transformers on the same weights, the evaluate CLI, and the before/after report."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from minigpt2 import GPT, ConfigError, DataError, Tokenizer
from minigpt2.cli import run_main
from minigpt2.evaluate import load_eval_text, main, perplexity, sliding_windows
from minigpt2.generation_config import STRATEGIES
from minigpt2.report import draw_prompts, write_report

N_POSITIONS = 64  # small, so that a few hundred tokens need many windows

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Perplexity measures surprise; lower is better. "
        "A sliding window gives every token some context, at the cost of more forward passes. ") * 4


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint):
    return hf_checkpoint(n_positions=N_POSITIONS)


@pytest.fixture(scope="module")
def models(checkpoint):
    return GPT.from_pretrained(checkpoint), GPT2LMHeadModel.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(0, 50257, (300,), generator=torch.Generator().manual_seed(0))


def reference_nll_sum(ref: GPT2LMHeadModel, ids: torch.Tensor, context: int, stride: int) -> tuple[float, int]:
    """The sliding window done one window at a time with transformers: labels of already-scored targets are -100,
    and the NLL is summed over the scored targets (not averaged per window)."""
    total, scored_until, n_scored = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids) - 1)
        labels = ids[begin + 1:end + 1].clone()
        labels[:scored_until - begin] = -100  # targets 1..scored_until belong to earlier windows
        with torch.no_grad():
            logits = ref(ids[begin:end].unsqueeze(0)).logits[0]
        total += F.cross_entropy(logits.double(), labels, ignore_index=-100, reduction="sum").item()
        n_scored += int((labels != -100).sum())
        scored_until = end
        if end == len(ids) - 1:
            break
    return total, n_scored


# (context, stride, tokens): stride 1 on a shorter text, as it costs one forward pass per token.
@pytest.mark.parametrize(("context", "stride", "n"), [(64, 1, 90), (64, 17, 300), (64, 32, 300), (64, 64, 300),
                                                      (40, 13, 300), (40, 40, 300), (64, 64, 64), (64, 64, 65)])
def test_perplexity_matches_transformers(models, token_ids, context, stride, n):
    ours, ref = models
    token_ids = token_ids[:n]
    result = perplexity(ours, token_ids, context=context, stride=stride, batch_size=3, progress=False)
    nll_sum, n_scored = reference_nll_sum(ref, token_ids, context, stride)
    assert n_scored == result["tokens"] == len(token_ids) - 1
    expected = math.exp(nll_sum / n_scored)
    assert abs(result["perplexity"] - expected) / expected <= 1e-5
    assert abs(result["loss"] - nll_sum / n_scored) <= 1e-5 * nll_sum / n_scored
    assert result["windows"] == len(sliding_windows(len(token_ids), context, stride))


def test_stride_equal_to_context_is_disjoint_chunks(models, token_ids):
    ours, _ = models
    C = N_POSITIONS
    result = perplexity(ours, token_ids, stride=C, progress=False)
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(token_ids) - 1, C):  # inputs ids[i:i+C] predict ids[i+1:i+C+1]
            x, y = token_ids[i:i + C], token_ids[i + 1:i + C + 1]
            total += F.cross_entropy(ours(x[:len(y)].unsqueeze(0))[0].double(), y, reduction="sum").item()
    assert result["windows"] == math.ceil((len(token_ids) - 1) / C)
    assert result["loss"] == pytest.approx(total / (len(token_ids) - 1), rel=1e-6)


@pytest.mark.parametrize("n", [2, 3, 63, 64, 65, 66, 130, 301])
@pytest.mark.parametrize(("context", "stride"), [(1, 1), (4, 1), (4, 3), (4, 4), (64, 17), (64, 64)])
def test_windows_score_every_token_once(n, context, stride):
    counts = np.zeros(n, dtype=int)
    windows = sliding_windows(n, context, stride)
    for k, w in enumerate(windows):
        assert w.begin == k * stride and 0 < w.end - w.begin <= context
        assert 0 < w.scored <= w.end - w.begin
        counts[w.end + 1 - w.scored:w.end + 1] += 1  # the window's last `scored` targets
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_batching_and_input_types_do_not_change_the_result(models, token_ids):
    ours, _ = models
    one = perplexity(ours, token_ids, stride=20, batch_size=1, progress=False)
    many = perplexity(ours, token_ids.numpy().astype(np.uint16), stride=20, batch_size=16, progress=False)
    listed = perplexity(ours, token_ids.tolist(), stride=20, batch_size=5, progress=False)
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert listed["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert one["stride"] == 20 and one["context"] == N_POSITIONS


def test_bits_per_byte_and_defaults(models):
    ours, _ = models
    text = Tokenizer().encode(TEXT)
    result = perplexity(ours, text, n_bytes=len(TEXT.encode()), progress=False)
    assert result["stride"] == N_POSITIONS // 2 and result["tokens"] == len(text) - 1
    loss_sum = result["loss"] * result["tokens"]
    assert result["bits_per_byte"] == pytest.approx(loss_sum / (math.log(2) * len(TEXT.encode())), rel=1e-12)
    assert perplexity(ours, text, progress=False)["bits_per_byte"] is None


def test_model_mode_is_restored(models, token_ids):
    """Evaluating a model mid-training (dropout on) must give transformers' eval-mode figure, not a dropout-noised
    one, and leave the model training."""
    ours, ref = models
    assert ours.config.resid_pdrop > 0  # else leaving dropout on would not change the figure
    tokens = token_ids[:50]
    nll_sum, n_scored = reference_nll_sum(ref, tokens, N_POSITIONS, N_POSITIONS // 2)  # ref is in eval mode
    ours.train()
    try:
        result = perplexity(ours, tokens, progress=False)
        assert ours.training
    finally:
        ours.eval()
    assert result["loss"] == pytest.approx(nll_sum / n_scored, rel=1e-5)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(stride=65), ConfigError, "stride=65"),
    (dict(stride=0), ConfigError, "stride=0"),
    (dict(context=65), ConfigError, "n_positions=64"),
    (dict(context=16, stride=17), ConfigError, "context of 16"),
    (dict(batch_size=0), ConfigError, "batch_size"),
])
def test_bad_settings(models, token_ids, kwargs, error, match):
    with pytest.raises(error, match=match):
        perplexity(models[0], token_ids, progress=False, **kwargs)


@pytest.mark.parametrize("ids", [[], [5], [5, 50257], [-1, 3]])
def test_bad_tokens(models, ids):
    with pytest.raises(DataError):
        perplexity(models[0], ids, progress=False)


def test_folder_is_documents_joined_by_endoftext(tmp_path):
    (tmp_path / "b.md").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first é", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    # The folders data/prepare.py would read, and only those: hidden ones (an editor's backups) are not text.
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("stale copy", encoding="utf-8")
    (tmp_path / "c-linked").symlink_to(tmp_path / ".ipynb_checkpoints", target_is_directory=True)
    loaded = load_eval_text(tmp_path)
    assert loaded.source == f"{tmp_path} (3 files)"
    tok = Tokenizer()
    assert loaded.tokens.tolist() == (tok.encode("first é") + [tok.eot_token] + tok.encode("second")
                                      + [tok.eot_token] + tok.encode("stale copy"))  # c-linked/a-checkpoint.txt
    assert loaded.n_bytes == len("first é".encode()) + len(b"second") + len(b"stale copy")


def test_empty_files_are_skipped_and_line_endings_read_as_newlines(tmp_path):
    """An empty file of a folder adds no <|endoftext|> (prepare drops empty documents; it added one per file), and
    CRLF or CR line endings are scored as the newlines that prepared training text holds."""
    (tmp_path / "a.txt").write_bytes(b"one\r\ntwo\rthree")
    (tmp_path / "b.txt").write_bytes(b"")
    (tmp_path / "c.txt").write_bytes(b"four\n")
    loaded = load_eval_text(tmp_path)
    tok = Tokenizer()
    assert loaded.tokens.tolist() == tok.encode("one\ntwo\nthree") + [tok.eot_token] + tok.encode("four\n")
    assert loaded.n_bytes == len(b"one\ntwo\nthree") + len(b"four\n")


def test_byte_order_mark_is_not_text(tmp_path):
    """A UTF-8 file saved with a BOM evaluates like the same file without one (data/prepare.py drops it too)."""
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "caf\u00e9 au lait".encode())
    loaded = load_eval_text(tmp_path / "bom.txt")
    assert loaded.tokens.tolist() == Tokenizer().encode("caf\u00e9 au lait")
    assert loaded.n_bytes == len("caf\u00e9 au lait".encode())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minigpt2.evaluate", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_json(models, checkpoint, tmp_path):
    text_file = tmp_path / "val.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    done = run_cli("--model", str(checkpoint), "--text", str(text_file), "--stride", "16", "--json",
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    expected = perplexity(models[0], Tokenizer().encode(TEXT), stride=16, progress=False,
                          n_bytes=len(TEXT.encode()))
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-6), key


def test_a_diverged_model_gets_a_capped_perplexity_not_an_overflow(checkpoint, tmp_path):
    """A finite loss past ~709 nats overflows exp(); the perplexity is capped at exp(700) (JSON has no infinity),
    the loss itself is reported as it is."""
    model = GPT.from_pretrained(checkpoint)
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(1e6)  # logits of ~1e6: a model whose training blew up
    model.save_pretrained(tmp_path / "diverged")
    text_file = tmp_path / "val.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    done = run_cli("--model", str(tmp_path / "diverged"), "--text", str(text_file), "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["loss"] > 1000 and result["perplexity"] == math.exp(700)


def test_cli_error_is_one_line(tmp_path):
    done = run_cli("--model", "gpt2", "--text", str(tmp_path / "missing.txt"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "missing.txt" in done.stderr


def bad_inputs(tmp_path, checkpoint) -> dict[str, tuple[list[str], str]]:
    ok = tmp_path / "ok.txt"
    ok.write_text(TEXT, encoding="utf-8")
    (tmp_path / "one_token.txt").write_text("a", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "utf16.txt").write_bytes("text".encode("utf-16-le"))  # valid UTF-8 too, with a NUL after each letter
    (tmp_path / "empty_dir").mkdir()
    # Token files made elsewhere may hold a split of no tokens, which numpy cannot memory-map.
    (tmp_path / "empty_val").mkdir()
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "empty_val" / "train.bin")
    (tmp_path / "empty_val" / "val.bin").write_bytes(b"")
    (tmp_path / "empty_val" / "meta.json").write_text(json.dumps(
        {"format": "minigpt2-tokens/1", "counts": {"train_tokens": 10, "val_tokens": 0}}), encoding="utf-8")
    model = ["--model", str(checkpoint)]
    return {
        "missing text": (model + ["--text", str(tmp_path / "nope.txt")], "no such file"),
        "one token": (model + ["--text", str(tmp_path / "one_token.txt")], "at least 2"),
        "empty text": (model + ["--text", str(tmp_path / "empty.txt")], "at least 2"),
        "not utf-8": (model + ["--text", str(tmp_path / "latin1.txt")], "not UTF-8"),
        "NUL bytes": (model + ["--text", str(tmp_path / "utf16.txt")], "not text, a NUL byte at byte 1"),
        "empty folder": (model + ["--text", str(tmp_path / "empty_dir")], "no .txt or .md"),
        "empty validation split": (model + ["--text", str(tmp_path / "empty_val")], "0 token(s)"),
        "stride > context": (model + ["--text", str(ok), "--stride", "65"], "--stride 65"),
        "context > n_positions": (model + ["--text", str(ok), "--context", "100"], "n_positions=64"),
        "missing model": (["--model", str(tmp_path / "no_model"), "--text", str(ok)], "no_model"),
        "report without --out": (["report", "--base", str(checkpoint), "--finetuned", str(checkpoint), "--text",
                                  str(ok)], "--out"),
        "unknown strategy": (["report", "--base", str(checkpoint), "--finetuned", str(checkpoint), "--text",
                              str(ok), "--out", str(tmp_path / "r"), "--strategies", "greedy,nope"], "'nope'"),
        "report --out is a file": (["report", "--base", str(checkpoint), "--finetuned", str(checkpoint), "--text",
                                    str(ok), "--out", str(ok), "--max_new_tokens", "8"], "cannot create the report"),
        "no prompts to draw": (["report", "--base", str(checkpoint), "--finetuned", str(checkpoint), "--text",
                                str(ok), "--out", str(tmp_path / "r"), "--num_prompts", "0"], "--num_prompts 0"),
    }


def test_bad_input_exits_2_with_one_line(tmp_path, checkpoint, capsys):
    for name, (argv, match) in bad_inputs(tmp_path, checkpoint).items():
        with pytest.raises(SystemExit) as exit_info:
            run_main(main, argv + ["--quiet"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, name
        assert err.count("\n") == 1 and "error: " in err and match in err, (name, err)


def cli_error(argv: list[str], capsys) -> str:
    """The one line a CLI mistake prints, checked to be that: exit status 2, `error: ...`, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [*argv, "--quiet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "error: " in err, err
    return err


def report_argv(checkpoint, text, out) -> list[str]:
    return ["report", "--base", str(checkpoint), "--finetuned", str(checkpoint), "--text", str(text), "--out",
            str(out), "--max_new_tokens", "2", "--strategies", "greedy", "--device", "cpu"]


@pytest.mark.parametrize("subcommand", ["perplexity", "report"])
def test_text_too_short_to_score_names_the_flag(checkpoint, tmp_path, capsys, subcommand):
    """Refused before any model is loaded, naming --text and the fix; the report makes no folder."""
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "one_token.txt").write_text("a", encoding="utf-8")
    (tmp_path / "empty_dir").mkdir()
    for name, fix in (("empty.txt", "longer text"), ("one_token.txt", "longer text"), ("empty_dir", "add text")):
        text = tmp_path / name
        argv = (["--model", str(checkpoint), "--text", str(text)] if subcommand == "perplexity"
                else report_argv(checkpoint, text, tmp_path / "out"))
        err = cli_error(argv, capsys)
        assert f"--text {text}: " in err and fix in err, err
        assert not (tmp_path / "out").exists()


def test_bad_strategies_name_the_flag_and_the_choices(checkpoint, tmp_path, capsys):
    text = tmp_path / "val.txt"
    text.write_text(TEXT, encoding="utf-8")
    err = cli_error([*report_argv(checkpoint, text, tmp_path / "out"), "--strategies", "greedy,nope"], capsys)
    assert "--strategies" in err and "'nope'" in err and all(name in err for name in STRATEGIES), err
    err = cli_error([*report_argv(checkpoint, text, tmp_path / "out"), "--strategies", " , "], capsys)
    assert "--strategies" in err and "no strategy" in err, err
    assert not (tmp_path / "out").exists()


def test_bad_prompts_file_names_the_flag(checkpoint, tmp_path, capsys):
    text = tmp_path / "val.txt"
    text.write_text(TEXT, encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "utf16.txt").write_bytes("text".encode("utf-16-le"))  # valid UTF-8 too, with a NUL after each letter
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "a_dir").mkdir()
    for name, fix in (("missing.txt", "no such file; check the path"), ("a_dir", "is a directory; pass a text file"),
                      ("latin1.txt", "convert it to UTF-8"), ("blank.txt", "one prompt per line")):
        prompts = tmp_path / name
        err = cli_error([*report_argv(checkpoint, text, tmp_path / "out"), "--prompts_file", str(prompts)], capsys)
        assert f"--prompts_file {prompts}: " in err and fix in err, err
    assert not (tmp_path / "out").exists()


def test_settings_from_flags_are_spelled_as_flags(checkpoint, tmp_path, capsys):
    text = tmp_path / "val.txt"
    text.write_text(TEXT, encoding="utf-8")
    perplexity_argv = ["--model", str(checkpoint), "--text", str(text)]
    for argv, flag in ((perplexity_argv + ["--stride", "65"], "--stride 65: "),
                       (perplexity_argv + ["--context", "100"], "--context 100: "),
                       (perplexity_argv + ["--batch_size", "0"], "--batch_size 0: "),
                       (report_argv(checkpoint, text, tmp_path / "out") + ["--context", "0"], "--context 0: "),
                       (report_argv(checkpoint, text, tmp_path / "out") + ["--num_prompts", "0"], "--num_prompts 0: "),
                       (report_argv(checkpoint, text, tmp_path / "out") + ["--max_new_tokens", "0"],
                        "--max_new_tokens 0: ")):
        err = cli_error(argv, capsys)
        assert flag in err and f"{flag.split()[0][2:]}=" not in err, err
    assert "argument --text: is empty; give a path" in cli_error([*perplexity_argv[:2], "--text", ""], capsys)
    assert "argument --out: is empty" in cli_error([*report_argv(checkpoint, text, tmp_path), "--out", ""], capsys)
    assert "--prompt: a prompt is empty" in cli_error([*report_argv(checkpoint, text, tmp_path / "out"), "--prompt",
                                                       ""], capsys)


def test_failed_report_leaves_no_folder_and_keeps_an_existing_one(checkpoint, tmp_path, capsys):
    text = tmp_path / "val.txt"
    text.write_text(TEXT, encoding="utf-8")
    new = tmp_path / "new" / "nested"
    for bad in (["--stride", "65"], ["--finetuned", str(tmp_path / "no_model")]):  # after / before the folder is made
        cli_error([*report_argv(checkpoint, text, new), *bad], capsys)
        assert not (tmp_path / "new").exists(), bad
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "report.md").write_text("the last report", encoding="utf-8")
    cli_error([*report_argv(checkpoint, text, existing), "--stride", "65"], capsys)
    assert "cannot create the report folder" in cli_error(report_argv(checkpoint, text, tmp_path / ("x" * 300)),
                                                          capsys)  # too long a name: the check of it fails too
    assert [p.name for p in existing.iterdir()] == ["report.md"]
    assert (existing / "report.md").read_text(encoding="utf-8") == "the last report"


def test_a_report_that_cannot_be_written_whole_leaves_the_last_one_whole(checkpoint, tmp_path, capsys, monkeypatch):
    """The disk filling up while the Markdown is written: the HTML was already replaced, so the folder held a new
    report.html beside the last report.md. Now both are written before either is replaced."""
    text = tmp_path / "val.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    last = {"report.html": "<p>the last report</p>", "report.md": "the last report"}
    for name, content in last.items():
        (out / name).write_text(content, encoding="utf-8")
    write_text = Path.write_text

    def disk_full_for_markdown(path: Path, *args, **kwargs):
        if path.name.endswith(".md"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full_for_markdown)
    err = cli_error([*report_argv(checkpoint, text, out), "--overwrite"], capsys)
    assert "No space left on device" in err, err
    assert {p.name: p.read_text(encoding="utf-8") for p in out.iterdir()} == last


def test_report_refuses_a_length_past_the_context_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    """The report has no sliding window (beam search cannot slide), so it must not suggest one; and it says so
    before the perplexity pass rather than after."""
    from minigpt2 import report

    text = tmp_path / "val.txt"
    text.write_text(TEXT, encoding="utf-8")
    monkeypatch.setattr(report, "perplexity", lambda *a, **k: pytest.fail("perplexity ran before the check"))
    prompt = "The quick brown fox"  # 4 tokens
    argv = [*report_argv(checkpoint, text, tmp_path / "out"), "--prompt", prompt, "--max_new_tokens", "61"]
    err = cli_error(argv, capsys)
    assert err == (f"error: --max_new_tokens 61: makes 65 tokens with the longest prompt (4 tokens), more than the "
                   f"context of {checkpoint} (base) ({N_POSITIONS} positions); lower it or use shorter prompts\n")
    # A prompt that fills the context alone is named as such: lowering max_new_tokens cannot help (it said to).
    argv = [*report_argv(checkpoint, text, tmp_path / "out"), "--prompt", " the" * N_POSITIONS]
    assert cli_error(argv, capsys) == (f"error: a prompt of {N_POSITIONS} tokens fills the context of {checkpoint} "
                                       f"(base) ({N_POSITIONS} positions), leaving no room for new tokens; use "
                                       "shorter prompts\n")
    assert not (tmp_path / "out").exists()


def test_report_refuses_a_folder_it_cannot_write_into_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    """A read-only --out (simulated: the tests may run as root, whom permissions do not stop) fails in a second,
    naming the folder, not after the perplexity pass and naming a temporary file."""
    import errno

    from minigpt2 import report

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    text = tmp_path / "val.txt"
    text.write_text(TEXT, encoding="utf-8")
    monkeypatch.setattr(report, "perplexity", lambda *a, **k: pytest.fail("perplexity ran before the check"))
    monkeypatch.setattr(report.tempfile, "TemporaryFile", refuse)
    err = cli_error(report_argv(checkpoint, text, tmp_path), capsys)
    assert err == f"error: cannot write into the report folder {tmp_path} (Permission denied); choose another --out\n"


# -- the before/after report -------------------------------------------------------------------------------------------

DOCS = ["Fine-tuning adapts a pretrained model to a new domain.", "<script>alert('x')</script> & <b>bold</b> text",
        "Sampling with top-p keeps the smallest set of likely tokens.", "A fourth document, for good measure."]


def test_draw_prompts_opens_documents():
    tok = Tokenizer()
    ids = [tok.eot_token] + [t for doc in DOCS for t in tok.encode(doc) + [tok.eot_token]]
    assert draw_prompts(ids, 2, 5) == [tok.encode(DOCS[0])[:5], tok.encode(DOCS[2])[:5]]
    assert draw_prompts(ids, 4, 100) == [tok.encode(doc) for doc in DOCS]
    assert draw_prompts(ids + ids, 8, 100) == [tok.encode(doc) for doc in DOCS]  # duplicates dropped
    one_text = tok.encode(TEXT)
    assert draw_prompts(one_text, 3, 4)[0] == one_text[:4] and len(draw_prompts(one_text, 3, 4)) == 3
    with pytest.raises(DataError):
        draw_prompts([tok.eot_token] * 5, 2, 4)


def test_draw_prompts_opens_every_file_of_a_folder(tmp_path):
    """A folder's files are joined by <|endoftext|> with none before the first: the first file is a document too.
    It was not counted, so four files gave too few documents for four prompts, and the prompts were cut from
    evenly spaced positions (three from inside the first file) instead of the files' openings."""
    tok = Tokenizer()
    texts = [DOCS[0] * 4, *DOCS[1:]]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    tokens = load_eval_text(tmp_path).tokens
    assert draw_prompts(tokens, 4, 6) == [tok.encode(text)[:6] for text in texts]
    assert draw_prompts(tokens, 2, 6) == [tok.encode(texts[0])[:6], tok.encode(texts[2])[:6]]


@pytest.fixture(scope="module")
def report_dir(hf_checkpoint, tmp_path_factory):
    base = GPT.from_pretrained(hf_checkpoint(n_positions=N_POSITIONS))
    finetuned = GPT.from_pretrained(hf_checkpoint(n_positions=N_POSITIONS, seed=1))
    tok = Tokenizer()
    val = np.array([t for doc in DOCS for t in [tok.eot_token] + tok.encode(doc)] * 3, dtype=np.uint16)
    out = tmp_path_factory.mktemp("report")
    paths = write_report(base, finetuned, val, out, strategies=["greedy", "top-p"], max_new_tokens=6,
                         num_prompts=2, prompt_tokens=12, base_name="base <model>", finetuned_name="tuned",
                         prompts=["<i>Once</i> upon a time", DOCS[1]], n_bytes=1000)
    expected = {name: perplexity(model, val, progress=False, n_bytes=1000)
                for name, model in (("base &lt;model&gt;", base), ("tuned", finetuned))}
    return out, paths, expected


def test_report_writes_both_files_with_their_sections(report_dir):
    out, (html_path, md_path), _ = report_dir
    assert (html_path, md_path) == (out / "report.html", out / "report.md")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]  # no temporary files left
    for text in (html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")):
        for section in ("How to read this", "Perplexity on", "Decoding strategies at a glance", "Samples",
                        "greedy", "top-p", "Prompt 1", "Prompt 2", "distinct-1", "distinct-2", "repeated 3-grams",
                        "mean log-prob", "coherence", "base &lt;model&gt;", "tuned"):
            assert section in text, section
        assert "### beam" not in text and "<h3>beam" not in text  # only the strategies asked for


def test_report_html_is_self_contained_and_escaped(report_dir):
    _, (html_path, _), _ = report_dir
    page = html_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "<script" not in page and "<link" not in page and "http" not in page
    assert "<i>" not in page and "<b>" not in page and "<model>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "&lt;i&gt;Once&lt;/i&gt; upon a time" in page
    assert page.count('<div class="pair">') == 2 * 2  # strategies x prompts, each pair side by side


def test_report_perplexities_equal_perplexity(report_dir):
    _, (html_path, md_path), expected = report_dir
    md = md_path.read_text(encoding="utf-8")
    for name, result in expected.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} | "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == [f"{result['perplexity']:.3f}", f"{result['loss']:.4f}", f"{result['bits_per_byte']:.4f}"]
        assert f"<td>{result['perplexity']:.3f}</td>" in html_path.read_text(encoding="utf-8")
    assert expected["base &lt;model&gt;"]["perplexity"] != expected["tuned"]["perplexity"]


def test_report_cli(checkpoint, tmp_path, capsys):
    text_file = tmp_path / "val.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["report", "--base", str(checkpoint), "--finetuned", str(checkpoint), "--text", str(text_file),
                 "--out", str(out), "--strategies", "greedy", "--num_prompts", "1", "--max_new_tokens", "4",
                 "--device", "cpu", "--quiet"]) == 0
    assert "report.html" in capsys.readouterr().out
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "(base)" in md and "(fine-tuned)" in md and "bits per byte" in md

    # A report already there (a training run writes one into its folder) is replaced only when asked.
    (out / "report.md").write_text("the run's own report", encoding="utf-8")
    again = ["report", "--base", str(checkpoint), "--finetuned", str(checkpoint), "--text", str(text_file),
             "--out", str(out), "--strategies", "greedy", "--num_prompts", "1", "--max_new_tokens", "4", "--quiet"]
    assert cli_error(again, capsys) == f"error: --out {out} already holds report.html; pass --overwrite to replace " \
        "it, or choose another --out\n"
    assert (out / "report.md").read_text(encoding="utf-8") == "the run's own report"
    assert main([*again, "--overwrite"]) == 0
    assert (out / "report.md").read_text(encoding="utf-8") == md
    # A prompt of whitespace is text to GPT-2, continued like any other (it was refused as empty).
    assert main([*again, "--overwrite", "--prompt", "\n"]) == 0


def test_prepared_dataset_gives_its_validation_split(tmp_path):
    from minigpt2.dataset import FORMAT, PreparedDataset

    tok = Tokenizer()
    split = {name: np.array([t for doc in docs for t in [tok.eot_token] + tok.encode(doc)], dtype=np.uint16)
             for name, docs in (("train", DOCS[:2]), ("val", DOCS[2:]))}
    for name, tokens in split.items():
        tokens.tofile(tmp_path / f"{name}.bin")
    counts = {f"{name}_tokens": len(tokens) for name, tokens in split.items()}
    (tmp_path / "meta.json").write_text(json.dumps({"format": FORMAT, "counts": counts}), encoding="utf-8")
    loaded = load_eval_text(tmp_path)
    assert np.array_equal(loaded.tokens, PreparedDataset(tmp_path).tokens("val")) and "validation" in loaded.source
    assert loaded.n_bytes == len("".join(DOCS[2:]).encode("utf-8"))


def test_report_decodes_with_each_models_generation_config(hf_checkpoint, tmp_path, monkeypatch):
    """The presets go over each model's own generate() defaults: a fine-tuned model whose generation_config ends
    on the very token greedy decoding picks first shows an empty, ended sample; the base model does not stop."""
    from minigpt2 import report

    base = GPT.from_pretrained(hf_checkpoint(n_positions=N_POSITIONS))
    finetuned = GPT.from_pretrained(hf_checkpoint(n_positions=N_POSITIONS, seed=1))
    tok = Tokenizer()
    prompt = tok.encode(DOCS[0])[:10]
    with torch.no_grad():
        first = int(finetuned(torch.tensor([prompt]))[0, -1].argmax())  # the hand-computed first greedy token
    assert first != tok.eot_token
    finetuned.generation_config.eos_token_id = first
    shown = {}
    real = report._sample
    monkeypatch.setattr(report, "_sample", lambda model, *a: shown.setdefault(id(model), real(model, *a)))
    val = np.array([t for doc in DOCS for t in [tok.eot_token] + tok.encode(doc)] * 3, dtype=np.uint16)
    write_report(base, finetuned, val, tmp_path, strategies=["greedy"], max_new_tokens=5, prompts=[tok.decode(prompt)],
                 n_bytes=1000)
    (tuned,), (untouched,) = shown[id(finetuned)], shown[id(base)]
    assert tuned.ended == "eos" and tuned.tokens == []
    assert untouched.ended is None and len(untouched.tokens) == 5


def _greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by hand: argmax of the full forward, one token at a time (no cache, no generate())."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def hand_distinct(token_lists: list[list[int]], n: int) -> float:
    """distinct-n counted by hand: distinct n-grams / all n-grams, pooled over the lists, none crossing two."""
    grams = [tuple(tokens[i:i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams)


def hand_repeated(tokens: list[int], n: int) -> float:
    """The repeated n-gram rate counted by hand: the share of n-grams that already occurred earlier in `tokens`."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return sum(gram in grams[:i] for i, gram in enumerate(grams)) / len(grams) if grams else 0.0


def hf_mean_logprob(ref: GPT2LMHeadModel, prompt: list[int], new: list[int]) -> float:
    """transformers' mean log-probability of `new` after `prompt`: log_softmax of its logits, each new token read
    at the position before it."""
    with torch.no_grad():
        logprobs = ref(torch.tensor([prompt + new[:-1]])).logits[0, len(prompt) - 1:].log_softmax(-1)
    return logprobs[torch.arange(len(new)), torch.tensor(new)].mean().item()


def test_report_cuts_stop_string_rows_before_their_padding(hf_checkpoint, tmp_path, monkeypatch):
    """A row that stops on a stop string ends with the token that completes it, whatever id pads it afterwards;
    the other row runs to the limit. Expected tokens are hand-computed greedy continuations; the figures of each
    sample and of the summary table are counted by hand from them, the mean log-prob scored by transformers."""
    from minigpt2 import report

    model = GPT.from_pretrained(hf_checkpoint(n_positions=N_POSITIONS))
    tok = Tokenizer()
    prompts = [tok.encode(DOCS[0])[:8], tok.encode(DOCS[1])[:10]]
    greedy = [_greedy(model, p, 6) for p in prompts]
    stop = tok.decode(greedy[0][1:2])
    assert stop not in tok.decode(greedy[0][:1]) and stop not in tok.decode(prompts[1] + greedy[1])
    model.generation_config.eos_token_id = None  # rows are then filled with pad_token_id, not an end id
    model.generation_config.pad_token_id = greedy[0][0]  # an id the sample itself holds: no trailing-run guess
    model.generation_config.stop_strings = [stop]
    shown = []
    real = report._sample
    monkeypatch.setattr(report, "_sample", lambda *a: shown.append(real(*a)) or shown[-1])
    val = np.array([t for doc in DOCS for t in [tok.eot_token] + tok.encode(doc)] * 3, dtype=np.uint16)
    _, md_path = write_report(model, model, val, tmp_path, strategies=["greedy"], max_new_tokens=6,
                              prompts=[tok.decode(p) for p in prompts], n_bytes=1000)
    stopped, full = shown[0]
    assert stopped.tokens == greedy[0][:2] and stopped.ended == "stop string"
    assert full.tokens == greedy[1] and full.ended is None
    md = md_path.read_text(encoding="utf-8")
    assert "[ended: stop string]" in md

    ref = GPT2LMHeadModel.from_pretrained(hf_checkpoint(n_positions=N_POSITIONS)).eval()
    texts = [greedy[0][:2], greedy[1]]
    assert hand_distinct(texts[1:], 1) != hand_distinct(texts[1:], 2)  # a repeated token: a mix-up of n shows
    logprobs = [hf_mean_logprob(ref, prompt, new) for prompt, new in zip(prompts, texts)]
    for sample, new, logprob in zip((stopped, full), texts, logprobs):
        figures = (sample.distinct_1, sample.distinct_2, sample.repeated_3, sample.mean_logprob)
        expected = (hand_distinct([new], 1), hand_distinct([new], 2), hand_repeated(new, 3), logprob)
        assert figures == pytest.approx(expected, rel=1e-5), new
    # The summary pools distinct-n over both prompts' samples and averages the rest; its rows are shown to 3 places.
    row = next(line for line in md.splitlines() if line.startswith("| greedy | base | "))
    cells = [float(c) for c in row.strip("|").split("|")[2:]]
    summary = (hand_distinct(texts, 1), hand_distinct(texts, 2), np.mean([hand_repeated(t, 3) for t in texts]),
               np.mean(logprobs))
    assert cells == pytest.approx(summary, abs=5e-4 + 1e-6), row


def test_report_takes_only_the_endings_from_each_generation_config(hf_checkpoint, tmp_path, monkeypatch):
    """Sampling settings in a model's generation_config do not reach the report: both models run the preset."""
    from minigpt2 import report
    from minigpt2.generation_config import STRATEGIES

    base = GPT.from_pretrained(hf_checkpoint(n_positions=N_POSITIONS))
    finetuned = GPT.from_pretrained(hf_checkpoint(n_positions=N_POSITIONS, seed=1))
    finetuned.generation_config.temperature = 0.05
    finetuned.generation_config.repetition_penalty = 3.0
    finetuned.generation_config.eos_token_id = 11
    used = {}
    monkeypatch.setattr(report, "_sample", lambda model, prompts, config, *a: used.setdefault(id(model), config)
                        and [report.Sample("", [], None, 0.0, 0.0, 0.0, 0.0)] * len(prompts))
    tok = Tokenizer()
    val = np.array([t for doc in DOCS for t in [tok.eot_token] + tok.encode(doc)] * 3, dtype=np.uint16)
    write_report(base, finetuned, val, tmp_path, strategies=["top-p"], max_new_tokens=4, prompts=["Hello"],
                 n_bytes=1000)
    theirs, ours = used[id(finetuned)], used[id(base)]
    assert theirs.temperature == ours.temperature == STRATEGIES["top-p"].get("temperature", 1.0)
    assert theirs.repetition_penalty == ours.repetition_penalty == 1.0
    assert (theirs.eos_token_id, ours.eos_token_id) == (11, tok.eot_token)


def test_report_refuses_unfillable_stop_strings_before_any_work(hf_checkpoint, tmp_path, monkeypatch):
    from minigpt2 import report

    model = GPT.from_pretrained(hf_checkpoint(n_positions=N_POSITIONS))
    model.generation_config.eos_token_id = None
    model.generation_config.stop_strings = ["."]
    monkeypatch.setattr(report, "perplexity", lambda *a, **k: pytest.fail("perplexity ran before the check"))
    with pytest.raises(ConfigError, match="pad_token_id=None: is needed to fill the sequences that stop_strings end "
                                          "before the others"):
        write_report(model, model, np.zeros(100, dtype=np.uint16), tmp_path, strategies=["greedy"],
                     prompts=["One", "Two"])
