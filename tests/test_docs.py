"""The docstring examples, and the README's and the docs pages' self-contained Python blocks, run
as written; the API reference lists every public name."""

import doctest
import importlib
import pathlib
import re

import pytest

import kdjax

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = [
    "kdjax._src.losses", "kdjax._src.sharded", "kdjax._src.sparse", "kdjax._src.vocab",
    "kdjax._src.cache", "kdjax._src.fused", "kdjax._src.uld", "kdjax._src.features",
    "kdjax._src.sampling"]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
  module = importlib.import_module(module_name)
  failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert tried > 0 and failures == 0


def test_every_module_with_examples_is_doctested():
  with_examples = {
      f"kdjax._src.{path.stem}" for path in (ROOT / "kdjax" / "_src").glob("*.py")
      if ">>>" in path.read_text()}
  assert with_examples <= set(MODULES)


def _python_blocks(page):
  blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
  # Blocks that start with an import are complete programs; the others are fragments.
  return [b for b in blocks if b.startswith("import")]


BLOCKS = [(page, index) for page in PAGES for index in range(len(_python_blocks(page)))]


def _needs_tunix(block):
  """Blocks that import Tunix (or kdjax's adapter for it) run where Tunix is installed, as in
  CI's own environment for it (.ci/tunix, which selects them by the id suffix -needs_tunix),
  and skip elsewhere."""
  return re.search(r"^(import|from) (tunix|kdjax\.integrations)\b", block, flags=re.M) is not None


def _block_id(page, index):
  suffix = "-needs_tunix" if _needs_tunix(_python_blocks(page)[index]) else ""
  return f"{page.relative_to(ROOT)}:{index}{suffix}"


@pytest.mark.parametrize("page, index", BLOCKS, ids=[_block_id(p, i) for p, i in BLOCKS])
def test_examples_run(page, index):
  name = f"{page.relative_to(ROOT)} block {index}"
  block = _python_blocks(page)[index]
  if _needs_tunix(block):
    pytest.importorskip("tunix", reason='the block needs Tunix: pip install "kdjax[tunix]"')
  exec(compile(block, name, "exec"), {"__name__": "__docs__"})


def test_readme_and_docs_have_examples():
  assert _python_blocks(ROOT / "README.md")
  assert len(BLOCKS) > 20


def test_api_reference_lists_every_public_name():
  api = (ROOT / "docs" / "api.md").read_text()
  listed = set(re.findall(r"^   (\w+)$", api, flags=re.M))
  assert listed == set(kdjax.__all__)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_pages_use_the_public_api(page):
  text = page.read_text()
  assert "_src" not in text, f"{page.name} refers to a private module"


def test_supported_versions_are_declared_and_tested():
  """No upper bound on jax, Python 3.11-3.13 in the classifiers, and CI running the whole suite
  on the newest releases on Python 3.13 as well as the floors (the policy the docs state)."""
  import tomllib

  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  jax_requirement = next(r for r in project["dependencies"] if re.match(r"jax\b", r))
  assert re.fullmatch(r"jax>=[\d.]+", jax_requirement.replace(" ", "")), jax_requirement
  assert project["requires-python"] == ">=3.11"
  versions = {c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
              if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
  assert versions == {"3.11", "3.12", "3.13"}, versions
  ci = (ROOT / ".ci" / "run").read_text()
  assert "bash .ci/floors" in ci and "make test" in ci and "bash .ci/newest" in ci
  newest = (ROOT / ".ci" / "newest").read_text()
  assert "3.13" in newest and "--upgrade" in newest
  assert re.search(r'pip install .*-e "\.\[test\]" jax jaxlib flax optax', newest, flags=re.S)
  assert re.search(r"^\"\$py\" -m pytest -q -p no:cacheprovider -n 2$", newest, flags=re.M)
  assert "| newest | 3.13 |" in (ROOT / "docs" / "implementations.md").read_text()
