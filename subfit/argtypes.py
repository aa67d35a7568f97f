"""Argument parsing shared by every `subfit` command: a parser whose errors are one line, and
types that parse their text and refuse a bad value with what was expected, so a bad argument is
one clear line and exit status 2 before any work starts."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from subfit.config import MAX_SPARSITY, check_sparsity
from subfit.runtime.generate import SAMPLING_RULES


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line, `prog: error: what is wrong; see prog --help`, exit
    status 2 as before: the usage block it would print first is what --help shows anyway."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see {self.prog} --help\n")


# What bad input raises, here and in the Python API (PlanError, CalibrationError, OutputError,
# UnsupportedModelError and CacheOverflowError are ValueErrors): refused in one line, exit status 2.
BAD_INPUT = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def one_line(message: object) -> str:
    """A message with its whitespace runs (newlines included) made single spaces."""
    return " ".join(str(message).split())


def refuse(prog: str, error: BaseException) -> int:
    """Print `prog: error: message` on one line to stderr; returns the exit status, 2."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return 2


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
