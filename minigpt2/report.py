"""The before/after report: did fine-tuning make the model better at *this* text, and how does it write now?

Perplexity answers the first half with one number per model on the same held-out text. The second half needs a
person: the classic recipe ends with "manual assessment" of coherence, relevance, fluency and style. This module
prepares that reading. For a handful of prompts it samples both models with every decoding strategy and lays the
samples side by side, each with three figures from `quality.py` that point at what to look for:

    distinct-1 / distinct-2   share of distinct tokens / token pairs    low  -> the text keeps reusing itself
    repeated 3-gram rate      share of 3-grams seen earlier in the text high -> it is looping
    mean log-prob             the generating model's own confidence     high + looping -> degenerate; low -> erratic

Both models get the same prompts, settings and random seed, so the differences come from the weights; from each
model's own generation_config only how a text ends is taken (its eos and pad ids, its stop strings). Prompts not
given are the openings of validation documents (drawn at evenly spaced documents: deterministic, and spread over the
whole split). The result is one self-contained HTML page (inline CSS, no scripts, every sample HTML-escaped) and the
same content as Markdown; both are written atomically, so a report on disk is always complete.
"""

from __future__ import annotations

import html
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import removed_if_failed, write_texts_atomically
from .errors import DataError
from .evaluate import evaluating, perplexity
from .generate import PromptTooLongError, StopStrings, check_length
from .generation_config import STRATEGIES, GenerationConfig, SettingError, describe_strategy
from .model import GPT
from .quality import distinct_n, mean_logprob, mean_over_texts, repeated_ngram_rate
from .tokenizer import EOT_ID, Tokenizer

HOW_TO_READ = (
    "Perplexity is measured on held-out text of the fine-tuning domain: lower means the model finds that text less "
    "surprising, and a fine-tuned model should beat its base here (a large gap on a tiny dataset can also mean it has "
    "memorised it). Then read the samples side by side, one prompt at a time, and judge four things: coherence (does "
    "the continuation hang together), relevance (does it follow from the prompt), fluency (is it grammatical, "
    "natural text) and style (does it sound like the fine-tuning data). The figures help you look: distinct-1/2 near "
    "1 means varied wording, a repeated 3-gram rate well above 0 means the text loops, and the mean log-prob is the "
    "generating model's own confidence per token, naturally higher for greedy and beam search than for sampling; "
    "high confidence together with a high repetition rate is the signature of degenerate text. Both models get the "
    "same prompts, settings and seed.")
PERPLEXITY_HEADER = ["model", "perplexity", "loss (nats/token)", "bits per byte", "tokens scored", "context / stride"]
SUMMARY_HEADER = ["strategy", "model", "distinct-1", "distinct-2", "repeated 3-grams", "mean log-prob"]


@dataclass
class Sample:
    """One continuation and its figures. `ended` says why it stopped before the limit: "eos" (the model chose an
    end-of-sequence id, which is not part of `tokens`), "stop string" (its text reached one), or None."""

    text: str
    tokens: list[int]
    ended: str | None
    distinct_1: float
    distinct_2: float
    repeated_3: float
    mean_logprob: float


def draw_prompts(val_tokens: Sequence[int] | np.ndarray, num_prompts: int, prompt_tokens: int) -> list[list[int]]:
    """Openings of `num_prompts` validation documents, evenly spaced over the split, each up to `prompt_tokens` long.

    Documents start after `<|endoftext|>`, and at the start of the text (a folder of files is read as documents
    joined by it, with none before the first). With fewer documents than prompts (one long text), the prompts start
    at evenly spaced positions instead. A prompt never crosses a document boundary; duplicates are dropped.
    """
    if num_prompts < 1:
        raise SettingError("num_prompts", num_prompts, "must be at least 1 (or pass prompts)")
    tokens = np.asarray(val_tokens)
    doc_starts = np.flatnonzero(tokens[:-1] == EOT_ID) + 1
    if len(tokens) and tokens[0] != EOT_ID:
        doc_starts = np.concatenate([[0], doc_starts])
    if len(doc_starts) >= num_prompts:
        starts = doc_starts[np.linspace(0, len(doc_starts), num_prompts, endpoint=False).astype(int)]
    else:
        starts = np.linspace(0, len(tokens), num_prompts, endpoint=False).astype(int)
    prompts = []
    for start in starts:
        while start < len(tokens) and tokens[start] == EOT_ID:
            start += 1
        window = tokens[start:start + prompt_tokens]
        ends = np.flatnonzero(window == EOT_ID)
        prompt = window[:ends[0]] if len(ends) else window
        prompt = [int(t) for t in prompt]
        if prompt and prompt not in prompts:  # a repeated document would only repeat a comparison
            prompts.append(prompt)
    if not prompts:
        raise DataError("no prompt could be drawn from the validation text (it holds no text between its "
                        "<|endoftext|> separators); pass prompts explicitly")
    return prompts


def _sample(model: GPT, prompts: list[list[int]], config: GenerationConfig, seed: int,
            tokenizer: Tokenizer) -> list[Sample]:
    """Continue every prompt in one left-padded batch; figures are computed on the tokens up to where each row
    ended (rows that end early are padded after that, and the padding is not part of the sample)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), EOT_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    generator = torch.Generator(device=device).manual_seed(seed)
    with evaluating(model):
        out = model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             generator=generator, tokenizer=tokenizer).cpu()
    stop = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    samples = []
    for row, prompt in enumerate(prompts):
        new, ended = _until_end(out[row], width, config, stop)
        samples.append(Sample(
            text=tokenizer.decode(new), tokens=new, ended=ended,
            distinct_1=distinct_n([new], 1), distinct_2=distinct_n([new], 2), repeated_3=repeated_ngram_rate(new, 3),
            mean_logprob=mean_logprob(model, prompt, new)))
    return samples


def _until_end(sequence: torch.Tensor, start: int, config: GenerationConfig,
               stop: StopStrings | None) -> tuple[list[int], str | None]:
    """The tokens generate() chose for one row (after `start`), and why they ended, by the rules it stopped by:
    an end-of-sequence id (left out), or the token that completes a stop string (kept)."""
    new = sequence[start:].tolist()
    for i, token in enumerate(new):
        if token in config.eos_ids:
            return new[:i], "eos"
        if stop is not None and bool(stop(sequence[None, :start + i + 1])):
            return new[:i + 1], "stop string"
    return new, None


def write_report(base: GPT, finetuned: GPT, val_tokens: Sequence[int] | np.ndarray, out_dir: str | os.PathLike[str],
                 *, prompts: Sequence[str] | None = None, tokenizer: Tokenizer | None = None,
                 strategies: Sequence[str] | None = None, max_new_tokens: int = 60, seed: int = 0,
                 base_name: str = "base", finetuned_name: str = "fine-tuned", num_prompts: int = 4,
                 prompt_tokens: int = 24, context: int | None = None, stride: int | None = None,
                 batch_size: int = 8, n_bytes: int | None = None, text_name: str = "the validation text",
                 progress: bool = False) -> tuple[Path, Path]:
    """Write `out_dir/report.html` and `out_dir/report.md` comparing `base` and `finetuned`; returns both paths.

    val_tokens: held-out token ids (e.g. `PreparedDataset(dir).tokens("val")`), for perplexity and drawn prompts.
    prompts: texts to continue; by default `num_prompts` openings of validation documents, `prompt_tokens` long.
    strategies: names from `generation_config.STRATEGIES` (default: all), each run with `max_new_tokens` and `seed`.
    context, stride, batch_size, n_bytes: passed to `evaluate.perplexity` for both models. Without `context`, both
        use the smaller of their context sizes, so the two perplexities are measured alike.
    """
    tokenizer = tokenizer or Tokenizer()
    strategies = list(STRATEGIES) if strategies is None else list(strategies)
    models = {base_name: base, finetuned_name: finetuned}
    if base_name == finetuned_name:
        models = {f"{base_name} (base)": base, f"{finetuned_name} (fine-tuned)": finetuned}
    if prompts is not None:
        encoded = [tokenizer.encode(p) for p in prompts]
        if not encoded or not all(encoded):
            raise DataError("prompts must be a non-empty list of non-empty texts")
    else:
        encoded = draw_prompts(val_tokens, num_prompts, prompt_tokens)
    # Checked before any work, so a typo fails in a second instead of after the perplexity pass.
    configs = {strategy: {name: GenerationConfig.from_strategy(strategy, _ending(model.generation_config),
                                                               max_new_tokens=max_new_tokens, num_return_sequences=1)
                          for name, model in models.items()} for strategy in strategies}
    for per_model in configs.values():
        for config in per_model.values():
            config.check_batch(len(encoded))
    longest = max(len(p) for p in encoded)
    for name, model in models.items():
        positions = model.config.n_positions
        try:
            check_length(GenerationConfig(max_new_tokens=max_new_tokens), longest, positions)
        except PromptTooLongError:  # no max_new_tokens makes room
            raise DataError(f"a prompt of {longest} tokens fills the context of {name} ({positions} positions), "
                            "leaving no room for new tokens; use shorter prompts") from None
        except SettingError:  # the check's own fix, sliding_window, is not an option of the report
            raise SettingError("max_new_tokens", max_new_tokens, f"makes {longest + max_new_tokens} tokens with the "
                               f"longest prompt ({longest} tokens), more than the context of {name} ({positions} "
                               "positions); lower it or use shorter prompts") from None
    out = Path(out_dir)
    with removed_if_failed(out):
        try:  # before the work, not after it: an unusable --out fails in a second
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create the report folder {out} ({exc.strerror}); choose another --out") from None
        try:
            with tempfile.TemporaryFile(dir=out):
                pass
        except OSError as exc:
            raise DataError(f"cannot write into the report folder {out} ({exc.strerror}); choose another --out") \
                from None
        if context is None:
            context = min(base.config.n_positions, finetuned.config.n_positions)
        scores = {name: perplexity(model, val_tokens, context=context, stride=stride, batch_size=batch_size,
                                   progress=progress, n_bytes=n_bytes) for name, model in models.items()}
        samples = {strategy: {name: _sample(models[name], encoded, config, seed, tokenizer)
                              for name, config in per_model.items()} for strategy, per_model in configs.items()}

        report = _Report(list(models), text_name, scores, [tokenizer.decode(p) for p in encoded], configs, samples,
                         max_new_tokens, seed)
        paths = out / "report.html", out / "report.md"
        write_texts_atomically(dict(zip(paths, (report.html(), report.markdown()))))  # never one new, one old
    return paths


def _ending(config: GenerationConfig) -> GenerationConfig:
    """The defaults, with only how `config` ends a text: every other setting comes from the preset, alike for both
    models, so that their samples differ by the weights alone."""
    return GenerationConfig.from_kwargs(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                        stop_strings=config.stop_strings)


@dataclass
class _Report:
    """Everything the report shows, and its two renderings."""

    names: list[str]
    text_name: str
    scores: dict[str, dict]
    prompts: list[str]
    configs: dict[str, dict[str, GenerationConfig]]  # strategy -> model name -> its settings
    samples: dict[str, dict[str, list[Sample]]]
    max_new_tokens: int
    seed: int

    def title(self) -> str:
        return f"Before/after: {self.names[0]} vs {self.names[1]}"

    def settings(self, strategy: str) -> str:
        """The preset's own settings, as a transformers-style argument list."""
        return describe_strategy(strategy)

    def summary(self, strategy: str, name: str) -> tuple[float, float, float, float]:
        """distinct-1/2 pooled over all prompts' samples, and the mean over the samples with text of rep-3 and mean
        log-prob."""
        runs = self.samples[strategy][name]
        texts = [s.tokens for s in runs]
        return (distinct_n(texts, 1), distinct_n(texts, 2), mean_over_texts(texts, [s.repeated_3 for s in runs]),
                mean_over_texts(texts, [s.mean_logprob for s in runs]))

    def perplexity_rows(self) -> list[list[str]]:
        rows = []
        for name in self.names:
            s = self.scores[name]
            bpb = f"{s['bits_per_byte']:.4f}" if s["bits_per_byte"] is not None else "n/a"
            ppl = f"{s['perplexity']:.3f}" if s["perplexity"] < 1e9 else f"{s['perplexity']:.3e}"  # a diverged model
            rows.append([name, ppl, f"{s['loss']:.4f}", bpb, f"{s['tokens']:,}", f"{s['context']} / {s['stride']}"])
        return rows

    def summary_rows(self) -> list[list[str]]:
        return [[strategy, name, *(_num(x) for x in self.summary(strategy, name))]
                for strategy in self.configs for name in self.names]

    def intro(self) -> str:
        n = len(self.prompts)
        return (f"Base: {self.names[0]}. Fine-tuned: {self.names[1]}. {n} prompt{'s' * (n != 1)}, "
                f"{self.max_new_tokens} new tokens per sample, seed {self.seed}.")

    # -- HTML --------------------------------------------------------------------------------------------------------

    def html(self) -> str:
        e = html.escape
        parts = [
            "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{e(self.title())}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
            f"<h1>{e(self.title())}</h1>", f'<p class="meta">{e(self.intro())}</p>',
            "<h2>How to read this</h2>", f"<p>{e(HOW_TO_READ)}</p>",
            f"<h2>Perplexity on {e(self.text_name)}</h2>", _html_table(PERPLEXITY_HEADER, self.perplexity_rows()),
            "<h2>Decoding strategies at a glance</h2>", _html_table(SUMMARY_HEADER, self.summary_rows()),
            "<h2>Samples</h2>",
        ]
        for strategy in self.configs:
            parts.append(f'<h3>{e(strategy)} <code>{e(self.settings(strategy))}</code></h3>')
            for i, prompt in enumerate(self.prompts):
                parts.append(f'<div class="prompt"><span class="label">Prompt {i + 1}</span>'
                             f"<pre>{e(prompt)}</pre></div>")
                parts.append('<div class="pair">')
                for name in self.names:
                    s = self.samples[strategy][name][i]
                    end = f'<span class="end">{e(_end_marker(s))}</span>' if s.ended else ""
                    parts.append(f'<div class="sample"><h4>{e(name)}</h4>'
                                 f'<pre><span class="echo">{e(prompt)}</span>{e(s.text)}{end}</pre>'
                                 f'<p class="figures">{e(_figures(s))}</p></div>')
                parts.append("</div>")
        parts += ["</body>", "</html>", ""]
        return "\n".join(parts)

    # -- Markdown ----------------------------------------------------------------------------------------------------

    def markdown(self) -> str:
        lines = [f"# {_md_text(self.title())}", "", _md_text(self.intro()), "", "## How to read this", "",
                 HOW_TO_READ, "", f"## Perplexity on {_md_text(self.text_name)}", "",
                 *_md_table(PERPLEXITY_HEADER, self.perplexity_rows()), "",
                 "## Decoding strategies at a glance", "", *_md_table(SUMMARY_HEADER, self.summary_rows()), "",
                 "## Samples", ""]
        for strategy in self.configs:
            lines += [f"### {strategy} (`{self.settings(strategy)}`)", ""]
            for i, prompt in enumerate(self.prompts):
                lines += [f"#### Prompt {i + 1}", "", *_md_code(prompt), ""]
                for name in self.names:
                    s = self.samples[strategy][name][i]
                    lines += [f"**{_md_text(name)}**: {_figures(s)}", "",
                              *_md_code(prompt + s.text + _end_marker(s)), ""]
        return "\n".join(lines)


def _end_marker(s: Sample) -> str:
    """A note after a sample that ended by itself, saying how; not a token's text, which could be anything (a
    fine-tuned model's eos id need not be <|endoftext|>)."""
    return f" [ended: {s.ended}]" if s.ended else ""


def _num(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.3f}"


def _figures(s: Sample) -> str:
    return (f"distinct-1 {_num(s.distinct_1)} · distinct-2 {_num(s.distinct_2)} · repeated 3-grams "
            f"{_num(s.repeated_3)} · mean log-prob {_num(s.mean_logprob)} · {len(s.tokens)} tokens")


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_text(text: str) -> str:
    """Text safe outside code in Markdown: no raw HTML, no table-breaking pipes."""
    return html.escape(text).replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in [header, ["---"] * len(header), *rows]]


def _md_code(text: str) -> list[str]:
    """A fenced block that `text` cannot close: the fence is longer than any run of backticks inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; } h3 { margin-top: 2em; }
h3 code { font-size: 0.75em; color: #555; font-weight: normal; }
.meta { color: #555; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
th { background: #f4f4f4; }
pre { white-space: pre-wrap; word-wrap: break-word; margin: 0.3em 0; font: 14px/1.45 ui-monospace, monospace; }
.prompt { margin-top: 1.5em; }
.label { font-weight: bold; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 0.8em; background: #fcfcfc; }
.sample h4 { margin: 0 0 0.3em; }
.echo { color: #888; }
.end { color: #a33; }
.figures { color: #555; font-size: 0.85em; margin: 0.3em 0 0; }
"""
