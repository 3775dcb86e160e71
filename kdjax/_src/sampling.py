"""Sampled sparse teachers: ``sample_teacher`` draws each token's teacher by importance sampling.

A top-k teacher (``sparse.py``) keeps the ``k`` most likely ids of every token. Its sparse
target is biased: the teacher's mass outside the top ``k`` is dropped or lumped together, the
same way at every step, so no amount of training averages it out. Random Sampling KD
(Anshumann et al., 2025) keeps ids drawn at random instead, with importance weights, so that
the stored target is an unbiased estimate of the teacher's distribution and the student's
gradient is, in expectation, the dense one. Per token:

1. the teacher's distribution at the distillation temperature, :math:`p = \\mathrm{softmax}(t / T)`,
   and the proposal, the teacher at ``proposal_temperature``,
   :math:`r = \\mathrm{softmax}(t / T_r)` (by default :math:`T_r = T`, so :math:`r = p`);
2. ``num_samples`` ids :math:`x_1, \\dots, x_N` drawn from :math:`r`, independently and with
   replacement;
3. each distinct drawn id :math:`v`, drawn :math:`c_v` times, weighted by
   :math:`w_v \\propto c_v \\, p_v / r_v`, the weights normalised over the token (self-normalised
   importance sampling). With the default proposal the weights are the draw frequencies
   :math:`c_v / N` and :math:`E[w_v] = p_v` exactly (the counts are multinomial);
4. stored as ``(ids, logprobs)``, ``logprobs = log w``, in the form of a top-k teacher: the
   distinct ids sorted by descending weight, then the slots of the repeated draws padded with
   ids not drawn (the smallest such ids) whose log-probability is ``-inf``. The ids of a token
   are distinct, as :func:`kdjax.sparse_distill_loss` and the teacher cache require, and the
   weights sum to one, so ``num_samples`` slots hold every sample.

What it estimates without bias (default proposal): anything linear in the teacher's
probabilities. That is the soft cross entropy :math:`-\\sum_v p_v \\log q_v` (value and gradient)
and the gradient of the forward KL with respect to the student logits (the same gradient: the
teacher's entropy is a constant). With ``tail="zero"`` the forward KL's gradient is
:math:`((\\sum_K w) q - w) / T = (q - w) / T`, of expectation :math:`(q - p) / T`, the dense one.
The forward KL's *value* adds :math:`\\sum_v w_v \\log w_v`, the negative entropy of the sample,
which is larger than :math:`-H(p)` (Jensen): the value is biased upwards by
:math:`H(p) - E[H(w)] \\ge 0`, a constant of the teacher with no gradient. Reverse KL, the JSDs,
the skew KLs and total variation are not linear in :math:`p`: neither their value nor their
gradient is unbiased, and ``tail="renormalize"`` biases every divergence (it renormalises the
student over the drawn ids). Since the weights sum to one, ``tail="bucket"`` has an empty
remainder category and equals ``"zero"`` up to the rounding of the stored weights.

With another proposal the self-normalised weights are consistent but biased by
:math:`O(1/N)`; a proposal colder than the teacher (:math:`T_r < T`) can leave tokens that the
teacher gives mass with a proposal probability that underflows to 0, never drawn.

Numerics: the proposal's exponentials ``exp((t - max t) / T_r)`` are summed into a float32
running sum and each draw is the entry where a uniform variate falls (inverse CDF), so an entry
is drawn with its probability up to the float32 rounding of the running sum (about ``6e-8``
absolute); an entry whose logit is ``-inf`` has no width in it and is never drawn (a draw that
rounding puts on such an entry is moved to the nearest entry before it with mass). The weights
are computed from the logits in log space, not from the running sum. Draws depend on the key
and the token's position only, not on ``token_block``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from kdjax._src import blocking, checks, meshes, recipe

Array = jax.Array


def _draw(cdf: Array, exps: Array, uniforms: Array) -> Array:
  """Ids ``[rows, N]`` where ``uniforms * total`` falls in each row's running sum ``cdf``."""
  total = cdf[:, -1:]
  # u < total: a draw never falls past the last entry (uniform * total may round up to it).
  u = jnp.minimum(uniforms * total, jnp.nextafter(total, 0.0))
  draws = jax.vmap(lambda row, values: jnp.searchsorted(row, values, side="right"))(cdf, u)
  draws = jnp.minimum(draws, cdf.shape[-1] - 1).astype(jnp.int32)
  # The running sum is a parallel scan: rounding may give an entry without mass a sliver of
  # width. Such a draw moves to the nearest entry before it with mass (else the first one).
  has_mass = exps > 0
  positions = jnp.arange(cdf.shape[-1], dtype=jnp.int32)
  previous = lax.cummax(jnp.where(has_mass, positions, -1), axis=1)
  first = jnp.argmax(has_mass, axis=-1).astype(jnp.int32)[:, None]
  moved = jnp.take_along_axis(previous, draws, axis=-1)
  moved = jnp.where(moved >= 0, moved, first)
  return jnp.where(jnp.take_along_axis(has_mass, draws, axis=-1), draws, moved)


def _runs(sorted_draws: Array) -> tuple[Array, Array]:
  """For sorted draws ``[rows, N]``: whether each is the first of its run of equal ids, and (at
  those) the run's length, the number of times the id was drawn."""
  num = sorted_draws.shape[-1]
  differs = sorted_draws[:, 1:] != sorted_draws[:, :-1]
  edge = jnp.ones(sorted_draws.shape[:1] + (1,), jnp.bool_)
  first = jnp.concatenate([edge, differs], axis=-1)
  last = jnp.concatenate([differs, edge], axis=-1)
  positions = jnp.broadcast_to(jnp.arange(num, dtype=jnp.int32), sorted_draws.shape)
  start = lax.cummax(jnp.where(first, positions, 0), axis=1)
  end = lax.cummin(jnp.where(last, positions, num - 1), axis=1, reverse=True)
  return first, end - start + 1


def _padding_ids(sorted_draws: Array) -> Array:
  """``[rows, N]``: the ids ``0 .. N - 1`` that were not drawn, ascending, then the others.

  A row with ``U`` distinct draws has at least ``N - U`` ids below ``N`` that it did not draw,
  enough to fill its ``N - U`` empty slots with ids distinct from the drawn ones.
  """
  num = sorted_draws.shape[-1]
  candidates = jnp.arange(num, dtype=jnp.int32)

  def one_row(row):
    found = jnp.searchsorted(row, candidates, side="left")
    return row[jnp.minimum(found, num - 1)] == candidates

  drawn = jax.vmap(one_row)(sorted_draws)
  return jnp.sort(jnp.where(drawn, num + candidates, candidates), axis=-1)


def _sample_block(num_samples, same_proposal, inv_temperature, inv_proposal, teacher_logits,
                  uniforms):
  x = teacher_logits.astype(jnp.float32)
  proposal, exps = recipe.statistics(x, inv_proposal, keep=True)
  draws = _draw(jnp.cumsum(exps, axis=-1), exps, uniforms)
  sorted_draws = jnp.sort(draws, axis=-1)
  first, counts = _runs(sorted_draws)
  log_weights = jnp.log(counts.astype(jnp.float32))
  if same_proposal:
    log_weights = log_weights - jnp.log(jnp.float32(num_samples))
  else:
    teacher, _ = recipe.statistics(x, inv_temperature)
    drawn = recipe.gather_entries(x, sorted_draws)
    log_weights = (log_weights + recipe.distribution(drawn, teacher, inv_temperature).log
                   - recipe.distribution(drawn, proposal, inv_proposal).log)
    log_weights = jnp.where(first, log_weights, -jnp.inf)
    log_weights = log_weights - jax.nn.logsumexp(log_weights, axis=-1, keepdims=True)
  log_weights = jnp.where(first, log_weights, -jnp.inf)
  # The distinct ids by descending weight (ties: the lower id), the repeated draws' slots last.
  neg, ids = lax.sort((-log_weights, sorted_draws), dimension=1, num_keys=2)
  logprobs = -neg
  distinct = jnp.sum(first, axis=-1, keepdims=True)
  slots = jnp.arange(num_samples, dtype=jnp.int32)
  padding = jnp.take_along_axis(_padding_ids(sorted_draws),
                                jnp.clip(slots - distinct, 0, num_samples - 1), axis=-1)
  ids = jnp.where(slots < distinct, ids, padding)
  # A token whose logits are all -inf has no distribution to sample: an empty teacher (every
  # tail policy scores it 0). NaN or +inf logits give NaN, which the cache refuses.
  empty = (proposal.sum_exp == 0)[:, None]
  broken = ~jnp.isfinite(proposal.max)[:, None] & ~empty
  ids = jnp.where(empty | broken, slots, ids)
  logprobs = jnp.where(empty, -jnp.inf, jnp.where(broken, jnp.nan, logprobs))
  return ids, logprobs


@functools.partial(jax.jit, static_argnames=("num_samples", "same_proposal", "token_block"))
def _sample(key, teacher_logits, inv_temperature, inv_proposal, *, num_samples, same_proposal,
            token_block):
  vocab = teacher_logits.shape[-1]
  flat = teacher_logits.reshape(-1, vocab)
  num_tokens = flat.shape[0]
  uniforms = jax.random.uniform(key, (num_tokens, num_samples), jnp.float32)
  block = token_block or blocking.token_block(num_tokens, vocab,
                                              groups=blocking.mesh_devices(flat))
  ids, logprobs = blocking.map_token_blocks(
      functools.partial(_sample_block, num_samples, same_proposal, inv_temperature,
                        inv_proposal),
      (flat, uniforms),
      (jnp.zeros((num_tokens, num_samples), jnp.int32),
       jnp.zeros((num_tokens, num_samples), jnp.float32)),
      block=block)
  shape = teacher_logits.shape[:-1] + (num_samples,)
  return ids.reshape(shape), logprobs.reshape(shape)


def _check_key(key) -> Array:
  """A single PRNG key: a typed key array of shape ``()`` or a raw ``uint32`` key."""
  if key is None or isinstance(key, (bool, int, float)):
    hint = f" For a seed, pass jax.random.key({key!r})." if type(key) is int else ""
    raise TypeError(f"key must be a JAX PRNG key (jax.random.key(seed)), got {key!r}.{hint}")
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(
          f"key must be a single PRNG key (shape ()), got a key array of shape {key.shape}; "
          "for one teacher per key, jax.vmap over the keys.")
    return key
  if key.dtype != jnp.uint32 or key.ndim != 1:
    raise TypeError(
        f"key must be a JAX PRNG key (jax.random.key(seed), or a raw uint32 key from "
        f"jax.random.PRNGKey(seed)), got an array of dtype {key.dtype} and shape {key.shape}.")
  return jax.random.wrap_key_data(key)


def sample_teacher(
    key: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    num_samples: int,
    temperature: float | ArrayLike = 1.0,
    proposal_temperature: float | ArrayLike | None = None,
    token_block: int | None = None,
) -> tuple[Array, Array]:
  r"""A sparse teacher drawn by importance sampling, unbiased for the soft cross entropy.

  With :math:`p = \mathrm{softmax}(t / T)` the teacher, :math:`r = \mathrm{softmax}(t / T_r)`
  the proposal, :math:`x_1, \dots, x_N \sim r` independent draws and :math:`c_v` the number of
  draws equal to :math:`v`:

  .. math::

      w_v = \frac{c_v \, p_v / r_v}{\sum_u c_u \, p_u / r_u}, \qquad
      \text{logprobs} = \log w_v \ \text{at the distinct drawn ids } v, \qquad
      E[w_v] = p_v \ \text{when } r = p \ (w_v = c_v / N)

  Duplicate draws are merged into one id with their count; the ``num_samples`` slots of a
  token hold its distinct ids by descending weight, then ids it did not draw with
  log-probability ``-inf`` (the smallest such ids), so ids are distinct per token and the
  result goes to :func:`kdjax.sparse_distill_loss` and :func:`kdjax.write_teacher_cache` as a
  top-k teacher does, at the same storage as ``k = num_samples``.

  Train with ``tail="zero"`` (forward KL): the gradient with respect to the student logits is
  then an unbiased estimate of the dense forward KL's (and soft cross entropy's) gradient. The
  value of ``divergence="soft_cross_entropy"`` is an unbiased estimate of the dense soft cross
  entropy; the forward KL's value is biased upwards by a constant of the teacher (the sample's
  entropy is lower than the teacher's), and no other divergence is unbiased. With another
  proposal the weights are self-normalised: consistent, biased by :math:`O(1/N)`. Computed in
  float32, blockwise over tokens; no gradient flows through it.

  Args:
    key: a JAX PRNG key (``jax.random.key(seed)``, or a raw ``jax.random.PRNGKey(seed)``).
      Tokens draw independently of each other; the same key gives the same teacher.
      ``jax.vmap`` over keys for several draws.
    teacher_logits: ``[..., vocab]`` teacher logits, any float dtype. ``-inf`` entries are
      never drawn; a token whose logits are all ``-inf`` gets ``-inf`` log-probabilities (an
      empty teacher).
    num_samples: draws per token ``N``, ``1 <= N <= vocab``: a Python int (it sets the output
      shape; under ``jax.jit`` pass it as a static argument). The paper matches dense
      distillation with about 12 distinct tokens per position.
    temperature: ``T > 0``, the temperature the student will be distilled at (the stored
      weights estimate :math:`p` at it and cannot be re-tempered later).
    proposal_temperature: ``T_r > 0`` of the proposal, or None (default) for ``T``: the
      teacher itself, whose weights are the draw frequencies, unbiased. A hotter proposal
      (``T_r > T``) draws more distinct tail tokens per token, with self-normalised weights.
    token_block: rows per block (default: about 1 MiB of float32 per block).

  Returns:
    ``(ids, logprobs)``: int32 ``[..., num_samples]`` and float32 ``[..., num_samples]``, the
    log-weights, sorted by descending weight; ``exp(logprobs)`` sums to 1 over each token
    (padding entries are ``-inf``).

  Example:
    >>> import jax, jax.numpy as jnp, kdjax
    >>> teacher = jnp.log(jnp.array([[0.5, 0.25, 0.25, 0.0]]))  # id 3 has no mass
    >>> ids, logprobs = kdjax.sample_teacher(jax.random.key(0), teacher, num_samples=4)
    >>> ids.shape, bool(jnp.isclose(jnp.exp(logprobs).sum(), 1.0))
    ((1, 4), True)
    >>> counts = jnp.round(jnp.exp(logprobs) * 4)  # the draw counts, at distinct ids
    >>> int(counts.sum()), bool(jnp.all(jnp.where(ids == 3, counts == 0, True)))
    (4, True)

  References:
    Anshumann, Zaidi, Kedia, Ahn, Kwon, Lee, Lee and Lee, *Sparse Logit Sampling: Accelerating
    Knowledge Distillation in LLMs*, ACL 2025 (arXiv 2503.16870): Random Sampling KD, teacher
    ids drawn by importance sampling with a tempered teacher as the proposal.
  """
  key = _check_key(key)
  teacher_logits = checks.logits("teacher_logits", teacher_logits)
  num_samples = checks.entries_per_row(
      "num_samples", num_samples, function="sample_teacher", vocab=teacher_logits.shape[-1],
      why=" (the slots of repeated draws are padded with distinct ids not drawn)")
  for name, value in (("temperature", temperature),
                      ("proposal_temperature", proposal_temperature)):
    if isinstance(value, (str, bytes)):
      raise TypeError(f"{name} must be a number or a scalar array, got {value!r}.")
  temperature = checks.temperature(temperature)
  same_proposal = proposal_temperature is None
  if not same_proposal:
    proposal_temperature = checks.temperature(proposal_temperature, "proposal_temperature")
    same_proposal = (isinstance(proposal_temperature, float) and isinstance(temperature, float)
                     and proposal_temperature == temperature)
  else:
    proposal_temperature = temperature
  token_block = checks.positive_int("token_block", token_block, optional=True)
  inv_temperature = jnp.asarray(1.0 / temperature, jnp.float32)
  inv_proposal = jnp.asarray(1.0 / proposal_temperature, jnp.float32)
  run = functools.partial(_sample, num_samples=num_samples, same_proposal=same_proposal,
                          token_block=token_block)
  # On Explicit axes the running sum and the searches along a (possibly vocabulary-sharded)
  # row have no unambiguous sharding: the partitioner decides them, as on Auto axes.
  spec = meshes.token_spec(teacher_logits, teacher_logits.ndim - 1)
  out_spec = P(*spec, None)
  ids, logprobs = meshes.on_auto_axes(
      run, (key, lax.stop_gradient(teacher_logits), inv_temperature, inv_proposal),
      (out_spec, out_spec))
  return lax.stop_gradient(ids), lax.stop_gradient(logprobs)
