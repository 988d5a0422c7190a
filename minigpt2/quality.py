"""Cheap figures that help a person judge generated text: diversity, repetition and the model's own confidence.

None of these measure "quality" on their own; read them side by side for several decoding strategies on one prompt:

- **distinct-n** (Li et al., 2016): distinct n-grams / all n-grams over a set of texts. Greedy and beam search tend
  to low values (the same phrases again and again); pure sampling to high values (and incoherence).
- **repeated n-gram rate** (Welleck et al., 2020, "rep-n"): the share of n-grams in one text that already occurred
  earlier in it. Degenerate loops ("the the the", a sentence repeated) push it towards 1.
- **mean token log-probability**: how likely the model itself finds the continuation, per token. Greedy and beam
  text scores high (the model's favourite tokens), sampled text lower; very high values together with a high
  repetition rate are the signature of a loop.

All of them work on token ids, so they are independent of how the text is printed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    if n < 1:
        raise ConfigError(f"n={n} must be at least 1")
    tokens = list(tokens)
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(token_lists: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams divided by all n-grams, pooled over every token list (0.0 when there is no n-gram).

    >>> distinct_n([[1, 2, 1, 2]], 2)   # bigrams (1,2) (2,1) (1,2): two distinct of three
    0.6666666666666666
    """
    grams = [gram for tokens in token_lists for gram in _ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(tokens: Sequence[int], n: int) -> float:
    """Share of the n-grams of `tokens` that repeat an earlier n-gram of the same text (0.0 when there is none).

    >>> repeated_ngram_rate([5, 6, 7, 5, 6, 7], 3)   # 567 675 756 567: the last one is a repeat
    0.25
    """
    grams = _ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def mean_over_texts(texts: Sequence[Sequence[int]], figures: Sequence[float]) -> float:
    """The mean of one figure per text over the texts that have tokens (NaN when none has).

    A sample that ended at once has no log-probability (NaN, which would make any mean NaN) and no n-gram to
    repeat: it is left out of every mean alike, rather than counted as a repeat rate of 0.

    >>> mean_over_texts([[1, 2], [], [3]], [0.5, float("nan"), 1.0])
    0.75
    """
    kept = [figure for text, figure in zip(texts, figures, strict=True) if len(text)]
    return sum(kept) / len(kept) if kept else float("nan")


@torch.no_grad()
def mean_logprob(model: torch.nn.Module, prompt_ids: Sequence[int] | torch.Tensor,
                 continuation_ids: Sequence[int] | torch.Tensor) -> float:
    """Mean log-probability (natural log) per token of `continuation_ids` following `prompt_ids`, under `model`.

    One forward pass over prompt + continuation less its last token (no prediction is needed after it); position t's
    logits score token t + 1, as in training. When that is longer than the model's context, the oldest tokens are
    dropped, so each continuation token is scored with up to n_positions tokens before it; a continuation longer
    than the context keeps only its last n_positions tokens. Returns NaN for an empty continuation: there is
    nothing to average.
    """
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().tolist()
    continuation = torch.as_tensor(continuation_ids, dtype=torch.long).flatten().tolist()
    if not prompt:
        raise ConfigError("prompt_ids is empty: the first continuation token needs at least one token of context")
    if not continuation:
        return float("nan")
    context = model.config.n_positions
    tokens = prompt + continuation
    window = tokens[:-1][-context:]
    scored = min(len(continuation), len(window))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout would make the figure random
    try:
        logits = model(torch.tensor([window], device=device))[0, -scored:].float()  # predictions of the last tokens
    finally:
        model.train(was_training)
    return -F.cross_entropy(logits, torch.tensor(tokens[-scored:], device=device)).item()
