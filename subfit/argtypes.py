"""Argument types shared by every `subfit` command: each parses its text and refuses a bad value
with what was expected, so argparse prints one clear line and exits 2 before any work starts."""
from __future__ import annotations

import argparse
from typing import Callable

from subfit.config import MAX_SPARSITY, check_sparsity
from subfit.runtime.generate import SAMPLING_RULES


def number(convert: Callable, valid: Callable, expected: str) -> Callable[[str], object]:
    """An argparse type: `convert` the text, and refuse it unless `valid(value)`, saying what was expected."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


def _valid_sparsity(value: float) -> bool:
    try:
        check_sparsity(value)
    except ValueError:
        return False
    return True


positive_int = number(int, lambda v: v >= 1, "a positive integer")
sparsity = number(float, _valid_sparsity,
                  f"a sparsity (fraction of transformer-block parameters) between 0 and {MAX_SPARSITY}, e.g. 0.25")
temperature = number(float, *SAMPLING_RULES["temperature"])  # the runtime's own rules: one set for CLI and Python
probability = number(float, *SAMPLING_RULES["top_p"])
