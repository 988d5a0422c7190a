"""The `>>>` examples in minigpt2's docstrings run, and print what they show: a reader copies them."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import minigpt2

MODULES = sorted(info.name for info in pkgutil.iter_modules(minigpt2.__path__, "minigpt2."))


def test_there_are_examples_to_run():
    finder = doctest.DocTestFinder()
    with_examples = [name for name in MODULES
                     if any(test.examples for test in finder.find(importlib.import_module(name)))]
    assert len(with_examples) >= 3, with_examples  # cleaning, quality, tokenizer at the time of writing


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (printed above)"
