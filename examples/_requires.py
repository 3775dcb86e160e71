"""The examples' optional dependencies: a missing one is a one-line error, not a traceback."""

from __future__ import annotations

import importlib
import os
import sys

INSTALL = 'pip install "kdjax[examples]"'


def require(*modules: str) -> None:
  """Imports ``modules``; if one is missing, says which and how to install it, and exits 2."""
  for module in modules:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as error:
      missing = error.name or module
      print(f"{os.path.basename(sys.argv[0])}: error: the module {missing!r} is missing; the "
            f"examples need the examples extra: {INSTALL}", file=sys.stderr)
      raise SystemExit(2) from None
