"""argparse types every ``flowbp`` command shares: numbers refused at the command line with what was expected."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (steps, seeds, batch sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite, non-negative number (guidance scales)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number ≥ 0")
    return value
