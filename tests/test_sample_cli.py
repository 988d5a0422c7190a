"""sample.py: flags with transformers' names (underscored or dashed), presets, streaming, --compare, one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformers import GenerationConfig as HFGenerationConfig
from transformers import GPT2LMHeadModel

from minigpt2 import ConfigError, Tokenizer
from minigpt2.generation_config import GenerationConfig, SettingError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402  (the script at the repository root)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint):
    return str(hf_checkpoint())


def run(argv, capsys):
    """Run sample.py's main as the script does; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        sample.run_main(sample.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def transformers_rows(directory, prompt: str, seed: int | None = None, **settings) -> list[list[int]]:
    """transformers' generate() of `prompt` with `settings`: the new tokens of each row, cut at its first
    end-of-sequence token (the checkpoint's unless `settings` names one)."""
    ids = torch.tensor([Tokenizer().encode(prompt)])
    ref = GPT2LMHeadModel.from_pretrained(directory).eval()
    eos = settings.get("eos_token_id", ref.generation_config.eos_token_id)
    if seed is not None:
        torch.manual_seed(seed)  # the same random stream as sample.py's own generator seeded by --seed
    with torch.no_grad():
        settings.setdefault("pad_token_id", 0 if eos is None else eos)
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), **settings)
    return [row[:row.index(eos)] if eos in row else row for row in out[:, ids.shape[1]:].tolist()]


def printed(prompt: str, rows: list[list[int]]) -> str:
    """What sample.py prints for `rows`: prompt and text, under a `=== sample i/n ===` header when there are several."""
    tok = Tokenizer()
    if len(rows) == 1:
        return prompt + tok.decode(rows[0]) + "\n"
    return "".join(f"=== sample {i + 1}/{len(rows)} ===\n{prompt}{tok.decode(row)}\n" for i, row in enumerate(rows))


def transformers_output(directory, prompt: str, seed: int | None = None, **settings) -> str:
    """What sample.py should print: `printed` of `transformers_rows`."""
    return printed(prompt, transformers_rows(directory, prompt, seed, **settings))


def test_greedy_output_is_transformers_generate_with_the_same_settings(model_dir, capsys):
    code, out, _ = run(["--model", model_dir, "--prompt", "The answer is", "--max-new-tokens", 9,
                        "--repetition_penalty", 1.3, "--eos-token-id", "none"], capsys)
    assert code == 0
    assert out == transformers_output(model_dir, "The answer is", max_new_tokens=9, do_sample=False,
                                      repetition_penalty=1.3, eos_token_id=None)


def test_a_prompt_token_equal_to_the_pad_id_is_text(model_dir, capsys, streamed):
    """A typed prompt has no padding: a token of it that equals pad_token_id (',' is 11) is text, as with the
    attention mask transformers' tokenizer gives. Without a mask it was taken for padding and dropped from the
    prompt ("Hello, world" generated as "Hello world" did), and a prompt ending in it was refused."""
    for prompt in ("Hello, world", "Hello world,"):
        args = ["--model", model_dir, "--prompt", prompt, "--pad_token_id", 11, "--max_new_tokens", 6]
        expected = transformers_output(model_dir, prompt, max_new_tokens=6, do_sample=False, pad_token_id=11)
        assert run(args, capsys)[1] == expected
        assert run([*args, "--stream"], capsys)[1] == expected == prompt + "".join(streamed) + "\n"
        streamed.clear()
    assert transformers_output(model_dir, "Hello, world", max_new_tokens=6) != \
        transformers_output(model_dir, "Hello world", max_new_tokens=6)  # the comma matters to the output


def test_a_prompt_of_whitespace_is_continued(model_dir, capsys):
    """A blank line is a prompt like any other to GPT-2 (it was refused as empty)."""
    code, out, _ = run(["--model", model_dir, "--prompt", "\n\n", "--max_new_tokens", 5], capsys)
    assert code == 0 and out == transformers_output(model_dir, "\n\n", max_new_tokens=5, do_sample=False)


@pytest.fixture
def streamed(monkeypatch) -> list[str]:
    """The pieces sample.py's stream_generate yields from now on, recorded on their way to be printed (the real
    generator still does the work): what shows that --stream streamed, as the printed text alone cannot."""
    pieces = []
    real = sample.stream_generate

    def recording(*args, **kwargs):
        for piece in real(*args, **kwargs):
            pieces.append(piece)
            yield piece

    monkeypatch.setattr(sample, "stream_generate", recording)
    return pieces


def test_stream_prints_the_same_text(model_dir, capsys, streamed):
    """--stream prints, piece by piece as they are generated, the text the plain run prints at the end."""
    args = ["--model", model_dir, "--prompt", "Once", "--max_new_tokens", 8, "--eos_token_id", "none"]
    out = run(args, capsys)[1]
    assert not streamed
    assert run([*args, "--stream"], capsys)[1] == out == "Once" + "".join(streamed) + "\n"
    assert len(streamed) > 1


def test_stop_string_ends_the_printed_text_before_it(model_dir, capsys, streamed):
    tok = Tokenizer()
    ids = torch.tensor([tok.encode("Once")])
    with torch.no_grad():
        free = GPT2LMHeadModel.from_pretrained(model_dir).generate(ids, attention_mask=torch.ones_like(ids),
                                                                   max_new_tokens=12, do_sample=False,
                                                                   eos_token_id=None, pad_token_id=0)
    text = tok.decode(free[0, 1:].tolist())
    stop = text[len(text) // 2:len(text) // 2 + 2]  # ends inside a token, most likely: that token is cut
    expected = "Once" + text[:text.find(stop)] + "\n"
    args = ["--model", model_dir, "--prompt", "Once", "--max_new_tokens", 12, "--eos_token_id", "none", "--stop", stop]
    assert run(args, capsys)[1] == expected
    assert run([*args, "--stream"], capsys)[1] == expected == "Once" + "".join(streamed) + "\n"
    assert len(streamed) > 1
    # A stop string that begins in the prompt ends generation as well (as in transformers), and the text shown after
    # the prompt is nothing: all of it belongs to the stop string. (It was printed.)
    spanning = "ce" + text[:2]
    args[-1] = spanning
    streamed.clear()
    assert run(args, capsys)[1] == run([*args, "--stream"], capsys)[1] == "Once\n" and not streamed


def test_top_p_samples_are_transformers_samples_with_the_same_seed(model_dir, capsys, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("It was a dark", encoding="utf-8")
    args = ["--model", model_dir, "--prompt_file", prompt, "--strategy", "top-p", "--top_p", 0.8, "--num_samples", 2,
            "--seed", 4, "--max_new_tokens", 6]
    code, out, _ = run(args, capsys)
    assert code == 0
    assert out == transformers_output(model_dir, "It was a dark", seed=4, do_sample=True, top_k=0, top_p=0.8,
                                      num_return_sequences=2, max_new_tokens=6)
    assert run([*args[:-4], "--seed", 5, "--max_new_tokens", 6], capsys)[1] != out


def test_beam_preset_with_overrides_is_transformers_beam_search(model_dir, capsys):
    code, out, _ = run(["--model", model_dir, "--prompt", "Hi", "--strategy", "beam", "--num_beams", 3,
                        "--num_samples", 2, "--early_stopping", "never", "--max_new_tokens", 5], capsys)
    assert code == 0
    assert out == transformers_output(model_dir, "Hi", do_sample=False, num_beams=3, no_repeat_ngram_size=2,
                                      early_stopping="never", num_return_sequences=2, max_new_tokens=5)


def hand_distinct(token_lists: list[list[int]], n: int) -> float:
    """distinct-n counted by hand: distinct n-grams / all n-grams, pooled over the lists, none crossing two."""
    grams = [tuple(tokens[i:i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams)


def test_compare_prints_every_strategy_with_figures(model_dir, capsys):
    """Each strategy's texts are transformers' generate() with that preset's settings and the same seed (greedy one
    row, beam search and sampling --num_samples); its distinct-1/2 in the table are counted by hand from them."""
    code, out, _ = run(["--model", model_dir, "--prompt", "The", "--compare", "--num_samples", 2, "--seed", 0,
                        "--max_new_tokens", 8], capsys)
    assert code == 0
    tok = Tokenizer()
    table = out[out.rindex("\nstrategy "):].splitlines()
    # Each preset as "How to generate text" (Hugging Face, 2020) runs it, and as the header shows it.
    recipes = {"greedy": dict(do_sample=False),
               "beam": dict(do_sample=False, num_beams=5, no_repeat_ngram_size=2, early_stopping=True),
               "sample": dict(do_sample=True, top_k=0),
               "top-k": dict(do_sample=True, top_k=50),
               "top-p": dict(do_sample=True, top_k=0, top_p=0.92)}
    headers = {"greedy": "do_sample=False", "beam": "do_sample=False, num_beams=5, no_repeat_ngram_size=2, "
               "early_stopping=True", "sample": "do_sample=True, top_k=0", "top-k": "do_sample=True, top_k=50",
               "top-p": "do_sample=True, top_k=0, top_p=0.92"}
    assert list(sample.STRATEGIES) == list(recipes)
    for name, recipe in recipes.items():
        n = 1 if name == "greedy" else 2
        rows = transformers_rows(model_dir, "The", seed=0, max_new_tokens=8, num_return_sequences=n, **recipe)
        texts = "".join(f"{tok.decode(row).strip() or '(nothing)'}\n\n" for row in rows)
        assert f"=== {name} ({headers[name]}) ===\n{texts}" in out, name
        cells = next(line for line in table if line.startswith(f"{name} ")).split()
        assert int(cells[1]) == n
        assert [float(c) for c in cells[2:4]] == pytest.approx([hand_distinct(rows, 1), hand_distinct(rows, 2)],
                                                               abs=5e-4 + 1e-9), name


@pytest.fixture(scope="module")
def configured_dir(model_dir, tmp_path_factory):
    """The checkpoint, with a generation_config.json that transformers writes: sampling, a repetition penalty, 7 new
    tokens, and an end-of-sequence id that its greedy continuation of "The answer is" produces."""
    ref = GPT2LMHeadModel.from_pretrained(model_dir)
    ids = torch.tensor([Tokenizer().encode("The answer is")])
    with torch.no_grad():
        free = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                            repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)
    ref.generation_config = HFGenerationConfig(do_sample=True, top_k=5, repetition_penalty=1.3, max_new_tokens=7,
                                               eos_token_id=int(free[0, -1]))
    path = tmp_path_factory.mktemp("configured")
    ref.save_pretrained(path)
    return path


@pytest.mark.parametrize(("flags", "overrides"), [
    ([], {}),
    (["--max_new_tokens", 3], dict(max_new_tokens=3)),
    (["--strategy", "greedy"], dict(do_sample=False, num_beams=1)),
    (["--strategy", "beam", "--num_beams", 3], dict(do_sample=False, num_beams=3, no_repeat_ngram_size=2,
                                                      early_stopping=True)),
    (["--top_k", 0, "--temperature", 0.7], dict(top_k=0, temperature=0.7)),
    # A typed max_length wins over the checkpoint's max_new_tokens (else it would be ignored without a word).
    (["--max_length", 6], dict(max_length=6, max_new_tokens=None)),
])
def test_flags_default_to_the_checkpoint_settings(configured_dir, capsys, flags, overrides):
    """What is printed is transformers' generate() of the prompt with the checkpoint's settings, the flags (or the
    preset's settings) overriding theirs."""
    code, out, _ = run(["--model", configured_dir, "--prompt", "The answer is", "--seed", 2, *flags], capsys)
    assert code == 0
    rows = transformers_rows(configured_dir, "The answer is", seed=2, **overrides)
    assert out == printed("The answer is", rows)
    if overrides.get("do_sample") is False and overrides["num_beams"] == 1:
        assert len(rows[0]) < 6  # greedy ends on the checkpoint's end-of-sequence id, the 6th new token or sooner


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "{missing}", "--prompt", "x"], "no such checkpoint"),
    (["--prompt", "x", "--tempreture", "0.7"], "unrecognized arguments: --tempreture 0.7; did you mean "
                                                "--temperature?"),
    (["--prompt", "x", "--temp", "0.7"], "unrecognized arguments: --temp 0.7; did you mean --temperature?"),
    (["--prompt", "x", "--n", "2"], "unrecognized arguments: --n 2 (see --help)"),  # a start of several flags
    (["--prompt", "x", "--compare", "--strategy", "beam"], "--compare runs every strategy, so --strategy beam"),
    (["--model", "", "--prompt", "x"], "argument --model: is empty; give a path"),
    (["--prompt", "x", "--top_p", "1.5"], "--top_p 1.5: must be in (0, 1]"),
    (["--prompt", "x", "--do_sample", "true", "--temperature", "0"], "--temperature 0.0: must be finite and > 0"),
    (["--prompt", "x", "--do_sample", "true", "--temperature", "inf"], "--temperature inf: must be finite"),
    (["--prompt", "x", "--repetition_penalty", "inf"], "--repetition_penalty inf: must be finite"),
    (["--prompt", "x", "--num_beams", "2", "--length_penalty", "nan"], "--length_penalty nan: must be a finite"),
    (["--prompt", "x", "--do_sample", "true", "--temperature", "1e-40"], "--temperature 1e-40: is too small: the "
                                                                         "logits divided by it can overflow float32"),
    (["--prompt", "x", "--do_sample", "true", "--num_beams", "3", "--temperature", "1e-40"], "--temperature 1e-40: "
                                                                                             "is too small"),
    (["--prompt", "x", "--num_beams", "3", "--length_penalty", "1000", "--max_new_tokens", "5"],
     "--length_penalty 1000.0: length ** length_penalty leaves float32's range for hypotheses of up to 5 new tokens"),
    (["--prompt", "x", "--eos_token_id", "1,,2"], "argument --eos_token_id/--eos-token-id: expected a token id, or "
                                                  "ids separated by single commas (e.g. 50256,198), or none; got "
                                                  "'1,,2'"),
    (["--prompt", "x", "--max_new_tokens", "abc"], "argument --max_new_tokens/--max-new-tokens: invalid int value: "
                                                   "'abc'"),
    (["--prompt", "x", "--num_samples", "3"], "--num_samples 3: greedy search gives one sequence"),
    (["--prompt", "x", "--num_samples", "3", "--num-return-sequences", "2"], "--num_samples 3 and "
                                                                              "--num_return_sequences 2 disagree"),
    (["--prompt", "x", "--strategy", "beam", "--num_return_sequences", "6"], "--num_return_sequences 6: beam "
                                                                              "search can return at most"),
    (["--prompt", "x", "--max_length", "1"], "--max_length 1: leaves no room after the prompt"),
    (["--prompt", "x", "--max_length", "500"], "--max_length 500: is longer than the model's context of 128 "
                                                "positions; set max_new_tokens instead"),
    (["--prompt", "x", "--eos_token_id", "60000"], "--eos_token_id 60000: is outside the model's vocabulary"),
    (["--prompt", "x", "--top-k", "abc"], "top-k"),
    (["--prompt", "x", "--early_stopping", "maybe"], "early_stopping"),
    (["--prompt", ""], "--prompt: the prompt is empty"),
    (["--prompt", "x", "--temperature", "0.7"], "--temperature 0.7: applies only when sampling, and this run takes "
                                                "the most likely tokens (do_sample false); add --do_sample true"),
    (["--prompt", "x", "--strategy", "beam", "--top_p", "0.5"], "--top_p 0.5: applies only when sampling"),
    (["--prompt", "x", "--compare", "--num_samples", "0"], "--num_samples 0: must be at least 1"),
    (["--prompt_file", "{long_prompt}"], "--prompt_file {long_prompt}: the prompt is 150 tokens, and the model's "
                                         "context of 128 positions leaves no room after it; shorten it, or pass "
                                         "--sliding_window true"),
    (["--prompt_file", "{long_prompt}", "--max_new_tokens", "3"], "--prompt_file {long_prompt}: the prompt is 150 "
                                                                   "tokens"),
    (["--prompt_file", "{missing}"], "no such file"),
    (["--prompt_file", "{tmp}"], "is a directory; pass a text file"),
    (["--model", "{long}/m", "--prompt", "x"], "{long}/m: File name too long; check the path and its permissions"),
    (["--prompt_file", "{long}"], "File name too long"),
    ([], "no prompt"),
    (["--prompt", "x", "--max_new_tokens", "500"], "--max_new_tokens 500: makes 501 tokens with the prompt, more "
                                                    "than the model's context of 128 positions"),
    (["--prompt", "x", "--num_beams", "2", "--stream"], "stream"),
    (["--prompt", "x", "--device", "gpu0"], "--device"),
    (["--prompt", "x", "--device", "meta"], "torch cannot compute on it"),
    (["--prompt", "x", "--seed", str(2**64)], "--seed: must be between 0 and 2**64 - 1"),
    (["--prompt", "x", "--seed", "-1"], "--seed: must be between 0 and 2**64 - 1"),
    (["--prompt", "x", "--stop", "\\n", "--stop", ""], "--stop_strings '\\n' '': must be a non-empty list of "
                                                     "non-empty strings"),  # as typed, on one line
    (["--prompt", "x", "--stop", "x", "--eos_token_id", "none", "--num_samples", "2", "--do_sample"],
     "pad_token_id=None (the default): is needed to fill the sequences that stop_strings end before the others"),
])
def test_bad_input_is_one_line_and_exit_2(model_dir, capsys, tmp_path, argv, message):
    # A path component over 255 bytes: an OSError from the first check that touches it (even for root)
    places = dict(missing=tmp_path / "missing", tmp=tmp_path, long=tmp_path / ("x" * 300),
                  long_prompt=tmp_path / "long.txt")
    places["long_prompt"].write_text(" the" * 150)  # 150 tokens
    argv = [a.format(**places) for a in argv]
    if "--model" not in argv:
        argv = ["--model", model_dir, *argv]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert message.format(**places) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_prompt_outside_a_small_vocabulary_is_named(hf_checkpoint, capsys):
    """A checkpoint with fewer tokens than GPT-2's tokenizer: the message speaks of the prompt, not of input_ids."""
    small = hf_checkpoint(vocab_size=300)
    capsys.readouterr()  # transformers' progress bar of saving it
    code, out, err = run(["--model", small, "--prompt", "hi"], capsys)
    assert (code, out) == (2, "")
    assert err == ("error: --prompt: token 'hi' (id 5303) of the prompt is outside the model's vocabulary of 300 "
                   "tokens, smaller than GPT-2's tokenizer's; leave that text out of the prompt\n")


def test_a_byte_order_mark_is_not_part_of_the_prompt(model_dir, capsys, tmp_path):
    """Notepad starts UTF-8 files with one; it must not reach the model, the printed text or the emptiness check."""
    (tmp_path / "bom.txt").write_bytes("\ufeffThe answer is".encode())
    code, out, _ = run(["--model", model_dir, "--prompt_file", tmp_path / "bom.txt", "--max_new_tokens", 3], capsys)
    assert code == 0 and out == transformers_output(model_dir, "The answer is", max_new_tokens=3)
    (tmp_path / "only.txt").write_bytes("\ufeff".encode())
    code, _, err = run(["--model", model_dir, "--prompt_file", tmp_path / "only.txt"], capsys)
    assert code == 2 and "the prompt is empty" in err


def test_a_prompt_file_that_is_not_utf8_is_named_with_the_fix(model_dir, capsys, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    code, _, err = run(["--model", model_dir, "--prompt_file", tmp_path / "latin1.txt"], capsys)
    assert code == 2
    assert err == (f"error: --prompt_file {tmp_path / 'latin1.txt'}: not UTF-8 text (invalid continuation byte at "
                   "byte 3); convert it to UTF-8\n")


def test_a_bad_setting_from_the_checkpoint_names_its_file(model_dir, capsys, tmp_path):
    """A value the command line did not give is blamed on the checkpoint's generation_config.json, not on a flag."""
    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    HFGenerationConfig(do_sample=True, num_return_sequences=2).save_pretrained(tmp_path)
    code, _, err = run(["--model", tmp_path, "--prompt", "x", "--do_sample", "false"], capsys)
    assert code == 2
    assert err == (f"error: num_return_sequences=2 from {tmp_path / 'generation_config.json'}: greedy search gives "
                   "one sequence per prompt; set do_sample=True or num_beams > 1\n")


def test_compare_runs_on_a_checkpoint_that_asks_for_several_sequences(model_dir, capsys, tmp_path):
    """--compare gives greedy one sequence whatever the checkpoint's num_return_sequences (it was refused, naming
    a --num_samples the user never typed), and the others what --num_samples asks."""
    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    HFGenerationConfig(do_sample=True, num_return_sequences=3).save_pretrained(tmp_path)
    code, out, err = run(["--model", tmp_path, "--prompt", "The", "--compare", "--num_samples", 2, "--seed", 0,
                          "--max_new_tokens", 4], capsys)
    assert code == 0, err
    table = out[out.rindex("\nstrategy "):].splitlines()
    counts = {line.split()[0]: int(line.split()[1]) for line in table[2:7]}  # after "" and the header
    assert counts == {"greedy": 1, "beam": 2, "sample": 2, "top-k": 2, "top-p": 2}


def test_explain_blames_the_flag_else_the_checkpoint_file_else_the_default(tmp_path):
    args = sample.build_parser().parse_args(["--model", "m", "--top_k", "3"])
    base = GenerationConfig.from_hub_dict({"top_p": 0.5})
    source = tmp_path / "generation_config.json"
    for name, value, expected in (("top_k", 3, "--top_k 3: why"), ("top_p", 0.5, f"top_p=0.5 from {source}: why"),
                                  ("temperature", 1.0, "temperature=1.0 (the default): why")):
        assert sample.explain(SettingError(name, value, "why"), args, base, source) == expected


@pytest.mark.parametrize(("setting", "why"), [
    (dict(max_length=2048), "is longer than the model's context of 128 positions; set max_new_tokens instead (it "
                            "wins over max_length), lower it, or set sliding_window=True to drop the oldest tokens as "
                            "the text grows"),
    (dict(max_new_tokens=500), "makes 503 tokens with the prompt, more than the model's context of 128 positions; "
                               "lower it, shorten the prompt, or set sliding_window=True to drop the oldest tokens as "
                               "the text grows"),
])
def test_a_length_from_the_checkpoint_past_its_context_names_the_file(model_dir, capsys, tmp_path, setting, why):
    """The length the checkpoint's generation_config.json asks for is blamed on that file, under the name it has
    there; a --max_new_tokens that fits wins over it, as max_new_tokens wins over max_length in transformers."""
    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    HFGenerationConfig(**setting).save_pretrained(tmp_path)
    (name, value), = setting.items()
    code, out, err = run(["--model", tmp_path, "--prompt", "The answer is"], capsys)
    assert (code, out) == (2, "")
    assert err == f"error: {name}={value} from {tmp_path / 'generation_config.json'}: {why}\n"
    code, out, _ = run(["--model", tmp_path, "--prompt", "The answer is", "--max_new_tokens", 5], capsys)
    assert code == 0
    assert out == transformers_output(tmp_path, "The answer is", max_new_tokens=5)


def test_script_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(tmp_path / "none"), "--prompt",
                             "x"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_sizes_beyond_memory_are_one_line(model_dir, capsys):
    """torch reports a failed allocation as a RuntimeError, not a MemoryError: one line all the same, saying how much
    and how to fix it, not torch's traceback."""
    code, _, err = run(["--model", model_dir, "--prompt", "x", "--max_new_tokens", 5, "--do_sample", "true",
                        "--num_samples", 10**9], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: out of memory (can't allocate memory: you tried to allocate ")
    assert err.endswith(" bytes); use smaller sizes (batch, sequence length, beams, ...)\n")


@pytest.mark.parametrize("script", ["sample.py", "-m minigpt2.evaluate"])
def test_ctrl_c_while_torch_loads_ends_the_command_quietly(model_dir, tmp_path, script):
    """Ctrl-C during the seconds that `import torch` takes, before run_main takes over: "interrupted" and status 130,
    as later on, not a traceback. The signal is sent once torch's library is mapped into the process: mid-import.
    The command starts with SIGINT's default disposition, as from a terminal: a test run in the background of a
    non-interactive shell inherits SIGINT ignored, and Python then installs no handler for it."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    text = tmp_path / "text.txt"
    text.write_text("Some text to score.\n")
    arguments = (["--prompt", "x", "--max_new_tokens", "5"] if script == "sample.py" else ["--text", str(text)])
    command = [sys.executable, *script.split(), "--model", model_dir, *arguments]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as process:
        maps = Path(f"/proc/{process.pid}/maps")
        deadline = time.monotonic() + 60
        while "libtorch" not in maps.read_text() and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    assert (process.returncode, out.decode(), err.decode()) == (130, "", "interrupted\n")


def test_a_reader_that_goes_away_ends_the_command_quietly(model_dir):
    """`sample.py ... | head -c 1`, here with the pipe closed before sample.py writes to it (as by `| true`). The
    command ends as a Unix tool does: status 141, no traceback, no "Exception ignored" from the last flush."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "sample.py"), "--model", model_dir, "--prompt", "x", "--do_sample", "true",
               "--num_samples", "30", "--max_new_tokens", "40"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT) as process:
        process.stdout.close()  # the reader is gone before the first write (loading torch alone takes longer)
        err = process.stderr.read().decode()
        code = process.wait(timeout=120)
    assert (code, err) == (141, "")


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs /dev/full (Linux), whose writes fail ENOSPC")
def test_output_to_a_full_disk_is_one_line(model_dir):
    """`sample.py ... > file` on a full disk: one line saying so, exit 2, no traceback (and no "Exception ignored"
    from the interpreter's last flush of stdout)."""
    command = [sys.executable, str(ROOT / "sample.py"), "--model", model_dir, "--prompt", "x", "--max_new_tokens", "3"]
    with open("/dev/full", "w") as full:
        done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (done.returncode, done.stderr) == (2, "error: writing the output: No space left on device; free some "
                                                 "space there\n")


def test_warnings_of_a_command_are_one_line():
    """As errors are: the default format adds the file, line and source line of the warn() call."""
    code = ("import warnings; from minigpt2.cli import run_main\n"
            "run_main(lambda argv: [warnings.warn('mind this'), warnings.warn('old', FutureWarning)] and 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    # Another library's kinds of warning keep their kind and origin.
    assert result.returncode == 0
    assert result.stderr == "warning: mind this\nwarning: FutureWarning from <string>:2: old\n"


def test_resolve_device_names_the_device_or_refuses_it():
    """Sampling takes any device torch can compute on; training only cpu and cuda; a GPU must be there."""
    from minigpt2.cli import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="training runs on cpu and cuda only"):
        resolve_device("meta", training=True)
    with pytest.raises(ConfigError, match="torch cannot compute on it"):
        resolve_device("meta")
    if torch.cuda.is_available():
        assert resolve_device("cuda", local_rank=0, training=True) == torch.device("cuda", 0)
    else:
        with pytest.raises(ConfigError, match="torch sees none"):
            resolve_device("cuda")
