"""Generate text from a GPT-2 checkpoint: one decoding strategy, or all of them side by side.

    python sample.py --model gpt2 --prompt "The meaning of life is" --strategy top-p --max_new_tokens 80
    python sample.py --model out/pydocs-gpt2 --prompt_file prompt.txt --num_samples 3 --seed 1
    python sample.py --model gpt2 --prompt "Once upon a time" --stream --do_sample true --temperature 0.8
    python sample.py --model gpt2 --prompt "Return the number of" --compare

Every setting of `generate()` is a flag of the same name (`--top_p 0.9`, or `--top-p 0.9`). The checkpoint's own
settings (its generation_config.json) are the defaults, as for transformers' `model.generate()`; a --strategy preset
overrides the settings that make it that strategy, and explicit flags win over both. The prompt is all text: a token
of it equal to pad_token_id is not padding. --compare runs every preset on the prompt and
prints, for each, its text and a few figures (distinct-1/2, repeated 3-gram rate, mean token log-prob; see
minigpt2/quality.py) that help judge repetition against incoherence.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from minigpt2.cli import (add_flag, interrupt_quietly, make_parser, parse_bool, parse_path, parse_seed, read_text_file,
                          resolve_device, run_main)

with interrupt_quietly():  # torch loads here, for a second or two
    import torch
    from tqdm import tqdm

    from minigpt2 import GPT, Tokenizer
    from minigpt2.errors import ConfigError
    from minigpt2.generate import PromptTooLongError, TextStream, check_length, stream_generate
    from minigpt2.generation_config import (SAMPLING_SETTINGS, STRATEGIES, GenerationConfig, SettingError,
                                           describe_strategy)
    from minigpt2.hub import generation_settings_file, resolve_checkpoint
    from minigpt2.quality import distinct_n, mean_logprob, mean_over_texts, repeated_ngram_rate


def _optional(convert: Callable[[str], typing.Any]) -> Callable[[str], typing.Any]:
    def parse(text: str) -> typing.Any:
        return None if text.strip().lower() == "none" else convert(text)

    parse.__name__ = convert.__name__  # argparse names the type in its message: "invalid int value: 'x'"
    return parse


def _early_stopping(text: str) -> bool | str:
    return "never" if text.strip().lower() == "never" else parse_bool(text)


def _token_ids(text: str) -> int | list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token id, or ids separated by single commas (e.g. 50256,198), "
                                         f"or none; got {text!r}") from None
    return ids[0] if len(ids) == 1 else ids


def _unescape(text: str) -> str:
    # A shell cannot easily pass a newline; "\n" and "\t" in a stop string mean the characters.
    return text.replace("\\n", "\n").replace("\\t", "\t")


# Flags whose values are not a plain int/float/bool.
SPECIAL_PARSERS: dict[str, dict[str, typing.Any]] = {
    "early_stopping": dict(type=_early_stopping, metavar="{true,false,never}"),
    "eos_token_id": dict(type=_optional(_token_ids), metavar="ID[,ID...]|none"),
    "stop_strings": dict(type=_unescape, action="append", metavar="TEXT"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser("sample.py", description="Generate text from a GPT-2 checkpoint.")
    add_flag(parser, "model", required=True, type=parse_path,
             help="Hub id (gpt2, gpt2-medium, ...) or a save_pretrained directory")
    add_flag(parser, "prompt", help="the text to continue")
    add_flag(parser, "prompt_file", type=parse_path, help="read the prompt from this UTF-8 file instead")
    add_flag(parser, "num_samples", type=int, default=argparse.SUPPRESS, metavar="N",
             help="continuations to print (same as --num_return_sequences)")
    add_flag(parser, "seed", type=parse_seed, help="seed of the sampler, for reproducible samples")
    add_flag(parser, "stream", action="store_true", help="print the text as it is generated")
    add_flag(parser, "strategy", choices=list(STRATEGIES), help="a named preset of generation settings")
    add_flag(parser, "compare", action="store_true", help="run every --strategy on the prompt, side by side")
    add_flag(parser, "device", default="auto", help="cpu, cuda, cuda:N, or auto: the GPU if there is one")
    hints = typing.get_type_hints(GenerationConfig)
    for field in dataclasses.fields(GenerationConfig):
        options = SPECIAL_PARSERS.get(field.name)
        if options is None:
            base = next(t for t in (bool, int, float) if t in typing.get_args(hints[field.name]) + (hints[field.name],))
            convert = parse_bool if base is bool else base
            options = dict(type=_optional(convert) if field.default is None else convert, metavar=base.__name__.upper())
            if base is bool:  # --do_sample alone means true, as train.py's switches do
                options.update(nargs="?", const=True)
        # Unset flags stay out of the namespace, so that "--eos_token_id none" can be told from no flag at all.
        add_flag(parser, field.name, default=argparse.SUPPRESS,
                 help=f"{field.metadata['help']} (default: the checkpoint's, else {field.default})", **options)
    parser.add_argument("--stop", dest="stop_strings", type=_unescape, action="append", default=argparse.SUPPRESS,
                        metavar="TEXT", help="same as --stop_strings; repeat for several; \\n means a newline")
    return parser


def read_prompt(args: argparse.Namespace) -> str:
    """The text to continue, from --prompt or the file --prompt_file names; ConfigError or DataError if there is
    none."""
    if args.prompt is not None and args.prompt_file is not None:
        raise ConfigError("give --prompt or --prompt_file, not both")
    if args.prompt_file is not None:
        prompt = read_text_file(args.prompt_file, "prompt_file")
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        raise ConfigError("no prompt: pass --prompt TEXT or --prompt_file PATH")
    if not prompt:  # whitespace is text to GPT-2 (a blank line is a fine prompt); nothing at all is not
        raise ConfigError(f"{prompt_flag(args)}: the prompt is empty; give some text to continue")
    return prompt


def prompt_flag(args: argparse.Namespace) -> str:
    """The flag that gave the prompt, for messages about it."""
    return f"--prompt_file {args.prompt_file}" if args.prompt_file is not None else "--prompt"


def settings_from_flags(args: argparse.Namespace) -> dict[str, typing.Any]:
    """The generation settings given explicitly on the command line."""
    settings = {f.name: getattr(args, f.name) for f in dataclasses.fields(GenerationConfig) if hasattr(args, f.name)}
    if hasattr(args, "num_samples"):
        given = settings.setdefault("num_return_sequences", args.num_samples)
        if given != args.num_samples:
            raise ConfigError(f"--num_samples {args.num_samples} and --num_return_sequences {given} disagree; they "
                              "are the same setting, give one of them")
    return settings


def explain(exc: SettingError, args: argparse.Namespace, base: GenerationConfig, source: Path) -> str:
    """A generation setting's error in the command line's terms: the flag that gave the value, else the file
    `source` that gave the checkpoint's settings `base`, else the default. (A --strategy preset sets only values that
    are valid on their own, so it is never the one named, though it may be what a named value clashes with.)"""
    name = exc.name
    if name == "num_return_sequences" and hasattr(args, "num_samples"):
        name = "num_samples"
    if hasattr(args, name):
        return exc.as_flag(name)
    # The checkpoint's settings are the defaults but for what its file sets: exactly what to_hub_dict writes back.
    where = f"from {source}" if exc.name in base.to_hub_dict() else "(the default)"
    return f"{exc.name}={exc.value!r} {where}: {exc.why}"


def continuation(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """New tokens up to (not including) the first end-of-sequence: what a reader sees."""
    tokens = list(tokens)
    ends = [i for i, t in enumerate(tokens) if t in set(eos_ids)]
    return tokens[:ends[0]] if ends else tokens


def shown_text(tok: Tokenizer, prompt: str, tokens: Sequence[int], config: GenerationConfig) -> str:
    """The text of a `continuation` of `prompt` as --stream prints it: generation stops on the token that completes
    a stop string, which may run past it; the text ends just before the stop string (which may begin in the
    prompt)."""
    stream = TextStream(tok, config.stop_strings or [], context=prompt)
    return "".join(stream.push(token) for token in tokens) + stream.finish()


def run_strategy(model: GPT, tok: Tokenizer, prompt_ids: torch.Tensor, config: GenerationConfig,
                 seed: int | None) -> list[list[int]]:
    """The continuations (token lists) of one prompt, with a progress bar over the new tokens."""
    generator = torch.Generator(prompt_ids.device).manual_seed(seed) if seed is not None else None
    total = config.new_tokens(prompt_ids.shape[1])
    with tqdm(total=total, unit="tok", leave=False, disable=None, file=sys.stderr) as bar:
        # The mask says every token is text: without one, a token equal to pad_token_id would be taken for padding.
        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), generation_config=config,
                             generator=generator, streamer=lambda tokens: bar.update(1))
    return [continuation(row, config.eos_ids) for row in out[:, prompt_ids.shape[1]:].tolist()]


def compare(model: GPT, tok: Tokenizer, prompt_ids: torch.Tensor, settings: dict, samples: int,
            seed: int | None) -> None:
    """Every preset on one prompt: the texts, then a table of figures to compare them by."""
    prompt = prompt_ids[0].tolist()
    prompt_text = tok.decode(prompt)
    rows = []
    for name in STRATEGIES:
        # One sequence first (the checkpoint may ask for more than greedy gives), then as many as this preset gives:
        # sampling as many as asked, greedy one, beam search its best few.
        config = GenerationConfig.from_strategy(name, model.generation_config, **settings, num_return_sequences=1)
        n = samples if config.do_sample else min(samples, config.num_beams)
        config = dataclasses.replace(config, num_return_sequences=n)
        texts = run_strategy(model, tok, prompt_ids, config, seed)
        print(f"=== {name} ({describe_strategy(name)}) ===")
        for tokens in texts:
            print(shown_text(tok, prompt_text, tokens, config).strip() or "(nothing)")
            print()
        rows.append((name, len(texts), distinct_n(texts, 1), distinct_n(texts, 2),
                     mean_over_texts(texts, [repeated_ngram_rate(t, 3) for t in texts]),
                     mean_over_texts(texts, [mean_logprob(model, prompt, t) for t in texts]),
                     sum(len(t) for t in texts) / len(texts)))
    print(f"{'strategy':<10}{'samples':>8}{'distinct-1':>12}{'distinct-2':>12}{'rep-3':>8}{'logprob/tok':>13}"
          f"{'tokens':>8}")
    for name, n, d1, d2, rep, logprob, length in rows:
        print(f"{name:<10}{n:>8}{d1:>12.3f}{d2:>12.3f}{rep:>8.3f}{logprob:>13.3f}{length:>8.1f}")
    print("distinct-n: unique n-grams / all n-grams across the samples (higher = more varied); rep-3: share of "
          "3-grams that repeat an earlier one in the same sample (higher = loops); logprob/tok: the model's mean "
          "log-probability of the text (higher = more predictable).")


def main(argv: Sequence[str] | None = None) -> int:
    return sample(build_parser().parse_args(argv))


def sample(args: argparse.Namespace) -> int:
    """Everything `main` does once the flags are parsed."""
    prompt = read_prompt(args)
    if args.compare and args.strategy:
        raise ConfigError(f"--compare runs every strategy, so --strategy {args.strategy} would be ignored; give one "
                          "of them")
    settings = settings_from_flags(args)
    device = resolve_device(args.device)
    # Loaded before the settings are put together: the checkpoint's generation_config is their base.
    checkpoint = resolve_checkpoint(args.model)
    model = GPT.from_pretrained(checkpoint).to(device)
    try:
        decode(args, model, prompt, settings)
    except SettingError as exc:
        source = generation_settings_file(checkpoint)
        raise ConfigError(explain(exc, args, model.generation_config, source)) from None
    return 0


def decode(args: argparse.Namespace, model: GPT, prompt: str, settings: dict[str, typing.Any]) -> None:
    """Put the flags' `settings` over the checkpoint's, and print what the flags ask for: the samples, a stream, or
    every strategy side by side."""
    samples = settings.pop("num_return_sequences", 1) if args.compare else None
    if samples is not None and samples < 1:
        raise SettingError("num_return_sequences", samples, "must be at least 1")
    if "max_length" in settings and "max_new_tokens" not in settings:
        settings["max_new_tokens"] = None  # else a checkpoint's max_new_tokens would win over the flag, unseen
    base = model.generation_config
    config = GenerationConfig.from_strategy(args.strategy, base, **settings) if args.strategy \
        else GenerationConfig.from_kwargs(base, **settings)
    unused = [name for name in SAMPLING_SETTINGS if name in settings and settings[name] != getattr(base, name)]
    if unused and not config.do_sample and not args.compare:
        raise SettingError(unused[0], settings[unused[0]], "applies only when sampling, and this run takes the most "
                           "likely tokens (do_sample false); add --do_sample true, or a --strategy that samples")
    if args.stream and (config.num_beams > 1 or config.num_return_sequences > 1 or args.compare):
        raise ConfigError("--stream prints one sequence as it grows: it does not combine with beam search "
                          "(num_beams > 1, from --num_beams or the checkpoint), --num_samples > 1 or --compare")

    device = next(model.parameters()).device
    tok = Tokenizer()
    prompt_ids = torch.tensor([tok.encode(prompt)], device=device)
    vocab, bad = model.config.vocab_size, int(prompt_ids.max())
    if bad >= vocab:  # a checkpoint with a smaller vocabulary than GPT-2's tokenizer
        raise ConfigError(f"{prompt_flag(args)}: token {tok.decode([bad])!r} (id {bad}) of the prompt is outside the "
                          f"model's vocabulary of {vocab} tokens, smaller than GPT-2's tokenizer's; leave that text "
                          "out of the prompt")
    if not config.sliding_window:
        try:
            check_length(config, prompt_ids.shape[1], model.config.n_positions)
        except PromptTooLongError as exc:
            raise ConfigError(f"{prompt_flag(args)}: the prompt is {exc.prompt_length} tokens, and the model's "
                              f"context of {exc.context} positions leaves no room after it; shorten it, or pass "
                              "--sliding_window true to drop its oldest tokens as the text grows") from None
    if args.compare:
        compare(model, tok, prompt_ids, settings, samples, args.seed)
    elif args.stream:
        generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
        print(prompt, end="", flush=True)
        for piece in stream_generate(model, prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                     generation_config=config, generator=generator, tokenizer=tok):
            print(piece, end="", flush=True)
        print()
    else:
        texts = run_strategy(model, tok, prompt_ids, config, args.seed)
        for i, tokens in enumerate(texts):
            if len(texts) > 1:
                print(f"=== sample {i + 1}/{len(texts)} ===")
            print(prompt + shown_text(tok, prompt, tokens, config))


if __name__ == "__main__":
    run_main(main)
