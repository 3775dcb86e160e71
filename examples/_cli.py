"""The examples' command lines: one-line errors for bad flags, and the value checks they share."""

from __future__ import annotations

import argparse
import math

import numpy as np

_FLOAT32 = np.finfo(np.float32)


class Parser(argparse.ArgumentParser):
  """An ``ArgumentParser`` that shows every default in ``--help`` and reports a bad flag in one
  line on stderr (exit code 2), without the long usage block."""

  def __init__(self, **kwargs):
    kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
    super().__init__(**kwargs)

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _integer(text: str, minimum: int, expected: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
  if value < minimum:
    raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
  return value


def positive_int(text: str) -> int:
  return _integer(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
  return _integer(text, 0, "an integer >= 0")


def finite_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
  return value


def positive_float(text: str) -> float:
  value = finite_float(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
  return value


def unit_interval(text: str) -> float:
  value = finite_float(text)
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
  return value


def temperature(text: str) -> float:
  """A temperature the losses accept: ``T > 0`` whose reciprocal is a finite, normal float32
  (they multiply logits by ``1 / T`` in float32), as ``kdjax`` checks it at the call."""
  value = positive_float(text)
  with np.errstate(over="ignore"):
    inverse = np.float32(1.0 / value)
  if not (np.isfinite(inverse) and inverse >= _FLOAT32.tiny):
    raise argparse.ArgumentTypeError(
        f"expected a temperature whose reciprocal is a finite, normal float32 (about "
        f"[{1 / _FLOAT32.max:.3g}, {1 / _FLOAT32.tiny:.3g}]) as kdjax's losses require, got "
        f"{value!r}: they multiply logits by 1 / temperature in float32")
  return value
