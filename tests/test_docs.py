"""The docstring examples and the README's self-contained Python blocks run as written."""

import doctest
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = [
    "kdjax._src.losses", "kdjax._src.sharded", "kdjax._src.sparse", "kdjax._src.vocab",
    "kdjax._src.cache", "kdjax._src.fused", "kdjax._src.uld"]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
  module = importlib.import_module(module_name)
  failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert tried > 0 and failures == 0


def _readme_blocks():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  # Blocks that start with an import are complete programs; the others are fragments.
  return [b for b in blocks if b.startswith("import")]


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_readme_examples_run(index):
  exec(compile(_readme_blocks()[index], f"README block {index}", "exec"), {})
