"""Losses on meshes with ``Explicit`` axes: the partitioned program runs with the axes ``Auto``.

``jax.make_mesh`` makes ``Explicit`` axes by default in recent JAX: every array's type then
carries its sharding, and an operation whose output sharding is ambiguous, or would need a
collective, is a ``ShardingTypeError`` unless the code names one. Several steps of the engines
are such operations on sharded inputs: a gather or scatter of a sparse teacher's ids along a
vocabulary-sharded row, ``lax.top_k`` and ``lax.sort`` over the vocabulary, a vocabulary tile
sliced out of a sharded kernel, loop carries whose sharding the loop body decides. With
``Auto`` axes the partitioner decides each of them, and the programs are tested there: the
single-device answer, no token gathered.

So the losses that hold such steps run their program inside :func:`jax.sharding.auto_axes`
over the mesh's ``Explicit`` axes: the inputs keep their shardings (as the partitioner's
starting point), inside they are ``Auto``, and the outputs are given back with explicit types
(a loss replicated, per-token values sharded like the tokens). The gradient follows the same
path back, so each input's gradient has the input's sharding type. Elsewhere (no mesh, ``Auto``
axes, inside ``shard_map``) the program runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, PartitionSpec

Array = jax.Array


def _explicit_axes(mesh) -> tuple[Any, ...]:
  names = getattr(mesh, "axis_names", ())
  types = getattr(mesh, "axis_types", ())
  return tuple(name for name, kind in zip(names, types, strict=False)
               if kind == AxisType.Explicit)


def explicit_mesh(*arrays: Any) -> tuple[Any, tuple[Any, ...]]:
  """``(mesh, its Explicit axes)``: the current mesh's, else that of the first array whose type
  carries a mesh with ``Explicit`` axes; ``(None, ())`` when there is none."""
  candidates: list[Any] = [jax.sharding.get_abstract_mesh()]
  candidates += [getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
                 for x in arrays if x is not None]
  for mesh in candidates:
    axes = _explicit_axes(mesh)
    if axes:
      return mesh, axes
  return None, ()


def token_spec(x: Array, token_ndim: int) -> PartitionSpec:
  """The sharding of the first ``token_ndim`` axes of ``x``'s type (replicated if none)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = tuple(getattr(sharding, "spec", ()))
  return PartitionSpec(*(spec + (None,) * token_ndim)[:token_ndim])


def on_auto_axes(fn: Callable[..., Any], args: Sequence[Any], out_specs: Any) -> Any:
  """``fn(*args)``; on a mesh with ``Explicit`` axes, run with those axes ``Auto`` inside and
  the outputs given the shardings ``out_specs`` (a pytree of ``PartitionSpec``s like the
  outputs)."""
  mesh, axes = explicit_mesh(*jax.tree.leaves(args))
  if not axes:
    return fn(*args)
  wrapped = jax.sharding.auto_axes(fn, axes=axes, out_sharding=out_specs)
  if _explicit_axes(jax.sharding.get_abstract_mesh()):
    return wrapped(*args)
  # Arrays typed with a mesh, and no mesh set: the outputs' specs refer to the arrays' mesh.
  with jax.sharding.use_abstract_mesh(mesh):
    return wrapped(*args)
