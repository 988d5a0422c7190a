"""quality.py: distinct-n and repeated n-gram rate on hand-counted cases, mean log-prob against transformers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from minigpt2 import GPT, ConfigError
from minigpt2.quality import distinct_n, mean_logprob, mean_over_texts, repeated_ngram_rate

N_POSITIONS = 16  # small, so that a prompt and continuation overflow the context cheaply

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    path = hf_checkpoint(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=N_POSITIONS)
    return GPT.from_pretrained(path), GPT2LMHeadModel.from_pretrained(path).eval()


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_mean_logprob(ref, window: list[int], targets: list[int]) -> float:
    """The mean log-probability transformers' logits over `window` give `targets`, the tokens its last positions
    predict (the token after the window last)."""
    with torch.no_grad():
        logprobs = ref(torch.tensor([window])).logits[0, -len(targets):].log_softmax(-1)
    return logprobs[torch.arange(len(targets)), torch.tensor(targets)].mean().item()


def test_distinct_n_pools_ngrams_over_lists_without_crossing_them():
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == 3 / 4  # (1,2) (2,3) (1,2) (2,4)
    assert distinct_n([[1, 1, 2], [2, 3]], 1) == 3 / 5
    assert distinct_n([[1, 2], [1, 2]], 2) == 1 / 2  # across the boundary (2,1) would be a third bigram
    assert distinct_n([[5, 6, 7, 8]], 2) == 1.0


def test_ngram_figures_are_zero_when_no_ngram_fits():
    assert distinct_n([[1, 2], [3]], 3) == 0.0
    assert distinct_n([[1, 2, 3], [4]], 3) == 1.0  # the short list adds nothing, the long one its single trigram
    assert distinct_n([], 1) == 0.0
    assert repeated_ngram_rate([1, 2], 3) == 0.0
    assert repeated_ngram_rate([], 1) == 0.0


def test_means_over_samples_leave_out_the_empty_ones_alike():
    """An empty sample has no log-probability (NaN) and no n-gram: sample.py --compare averaged the NaN into its
    table (one sample that ended at once made the strategy's figure NaN), and the report counted it as a repeat
    rate of 0 while leaving it out of the log-probability."""
    texts = [[1, 2, 3, 1, 2, 3], [], [4, 5]]
    rates = [repeated_ngram_rate(t, 3) for t in texts]  # 1/4, 0 (no 3-gram), 0
    assert mean_over_texts(texts, rates) == (1 / 4 + 0 + 0) / 2
    assert mean_over_texts(texts, [-1.0, math.nan, -3.0]) == -2.0
    assert math.isnan(mean_over_texts([[], []], [math.nan, math.nan]))
    with pytest.raises(ValueError):  # one figure per text
        mean_over_texts(texts, rates[:2])


@pytest.mark.parametrize("n", [0, -1])
def test_ngram_size_below_one_is_a_config_error(n):
    with pytest.raises(ConfigError, match="n="):
        distinct_n([[1, 2, 3]], n)
    with pytest.raises(ConfigError, match="n="):
        repeated_ngram_rate([1, 2, 3], n)


def test_repeated_ngram_rate_counts_repeats_of_earlier_ngrams():
    assert repeated_ngram_rate([1, 2, 3, 4], 2) == 0.0
    # A sentence looping three times: 123 231 312 123 231 312 123, the last four of which occurred before.
    assert repeated_ngram_rate([1, 2, 3, 1, 2, 3, 1, 2, 3], 3) == pytest.approx(4 / 7)
    assert repeated_ngram_rate([7, 7, 7, 7, 7], 1) == pytest.approx(4 / 5)  # "the the the": all but the first
    assert repeated_ngram_rate([7, 7, 7, 7, 7], 2) == pytest.approx(3 / 4)


def test_mean_logprob_scores_exactly_the_continuation(models):
    ours, ref = models
    prompt, continuation = tokens(0, 5), tokens(1, 4)
    expected = hf_mean_logprob(ref, prompt + continuation[:-1], continuation)
    assert mean_logprob(ours, prompt, continuation) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # Tensors are read like lists, and a one-token continuation is scored from the prompt alone.
    assert mean_logprob(ours, torch.tensor([prompt]), torch.tensor(continuation)) == pytest.approx(expected, rel=1e-5,
                                                                                                   abs=1e-6)
    assert mean_logprob(ours, prompt, continuation[:1]) == pytest.approx(
        hf_mean_logprob(ref, prompt, continuation[:1]), rel=1e-5, abs=1e-6)


def test_mean_logprob_drops_the_oldest_prompt_tokens_past_the_context(models):
    ours, ref = models
    prompt, continuation = tokens(2, 12), tokens(3, 8)  # 20 tokens: 19 to predict from, 3 more than the context
    expected = hf_mean_logprob(ref, prompt[3:] + continuation[:-1], continuation)
    assert mean_logprob(ours, prompt, continuation) == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_mean_logprob_of_a_continuation_longer_than_the_context_scores_its_tail(models):
    ours, ref = models
    prompt, continuation = tokens(4, 3), tokens(5, 20)
    # The window is the 16 tokens before the continuation's last; they predict its last 16.
    expected = hf_mean_logprob(ref, continuation[3:19], continuation[4:])
    assert mean_logprob(ours, prompt, continuation) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # Exactly the context long: every token is scored, the first from the last prompt token.
    exact = continuation[:N_POSITIONS]
    assert mean_logprob(ours, prompt, exact) == pytest.approx(
        hf_mean_logprob(ref, prompt[-1:] + exact[:-1], exact), rel=1e-5, abs=1e-6)


def test_mean_logprob_empty_inputs(models):
    ours, _ = models
    assert math.isnan(mean_logprob(ours, [1, 2], []))  # nothing to average
    with pytest.raises(ConfigError, match="prompt_ids"):
        mean_logprob(ours, [], [1, 2])


def test_mean_logprob_scores_without_dropout_and_restores_the_mode(models):
    """Scoring a model mid-training must give the deterministic eval-mode figure and leave it training."""
    ours, ref = models
    prompt, continuation = tokens(6, 6), tokens(7, 6)
    expected = hf_mean_logprob(ref, prompt + continuation[:-1], continuation)
    ours.train()
    try:
        assert mean_logprob(ours, prompt, continuation) == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert ours.training
    finally:
        ours.eval()
    mean_logprob(ours, prompt, continuation)
    assert not ours.training
