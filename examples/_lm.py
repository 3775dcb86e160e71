"""The pieces of ``distill_lm.py``: corpus, byte tokenizer, a Flax NNX transformer, train loop.

Everything here is deterministic given a seed: the corpus is a sorted list of files from the
running interpreter's standard library, training batch ``k`` is drawn from a NumPy generator
seeded with ``(seed, k)``, the student's own samples (on-policy batches) are drawn with a JAX key
derived from ``(seed, k)``, and the model has no dropout. A run resumed from a checkpoint (which
holds the parameters, the optimizer state -- including its step count, which drives the
learning-rate schedule -- and the step) therefore replays exactly the batches and updates of an
uninterrupted run.

Every saved step gets a SHA-256 digest of its files, written once the save is complete; a step
whose files no longer match (a flipped bit, a truncated file) or that has no digest (its save was
interrupted) is never restored: it is moved aside with a one-line warning, and the phase resumes
from the latest step that passes, or starts afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import sys
import sysconfig
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

import kdjax

VOCAB = 256  # byte-level tokenizer: a token is a byte.
IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------
# Corpus and byte tokenizer.
# ----------------------------------------------------------------------------------------------


def stdlib_files() -> list[pathlib.Path]:
  """The top-level ``.py`` files of the running interpreter's standard library, sorted."""
  lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(lib.glob("*.py"))
  if not files:
    raise FileNotFoundError(f"no .py files found in the standard library folder {lib}")
  return files


def encode(text: str | bytes) -> np.ndarray:
  """Byte-level tokenizer: UTF-8 bytes as ``uint8`` token ids (vocabulary of 256)."""
  data = text.encode("utf-8") if isinstance(text, str) else text
  return np.frombuffer(data, dtype=np.uint8)


def decode(tokens) -> str:
  return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def load_corpus(holdout_every: int = 10) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """``(train_tokens, heldout_tokens, heldout_file_names)``, split by whole files.

  Every ``holdout_every``-th file (in sorted order, starting at the middle of the first group)
  is held out, so the held-out text is from modules the models never saw.
  """
  train, heldout, heldout_names = [], [], []
  for index, path in enumerate(stdlib_files()):
    if index % holdout_every == holdout_every // 2:
      heldout.append(path.read_bytes())
      heldout_names.append(path.name)
    else:
      train.append(path.read_bytes())
  return encode(b"\n\n".join(train)), encode(b"\n\n".join(heldout)), heldout_names


def train_batch(tokens: np.ndarray, step: int, *, seed: int, batch_size: int,
                seq_len: int) -> np.ndarray:
  """Batch ``step`` of training windows ``[batch_size, seq_len]`` int32: a pure function of
  ``(seed, step)``, so a resumed run needs no data-loader state."""
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - seq_len + 1, size=batch_size)
  return np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int32)


def heldout_batches(tokens: np.ndarray, *, windows: int, batch_size: int,
                    seq_len: int) -> list[np.ndarray]:
  """Fixed, evenly spaced held-out windows, grouped into batches (the same for every model)."""
  windows = min(windows, len(tokens) // seq_len)
  starts = np.linspace(0, len(tokens) - seq_len, windows).astype(np.int64)
  data = np.stack([tokens[s:s + seq_len] for s in starts]).astype(np.int32)
  return [data[i:i + batch_size] for i in range(0, windows, batch_size)]


# ----------------------------------------------------------------------------------------------
# A small decoder-only transformer in Flax NNX.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  layers: int
  dim: int
  heads: int
  max_len: int
  vocab: int = VOCAB


class Block(nnx.Module):
  """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.attention_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, rngs=rngs)
    self.attention_out = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x):
    batch, seq, dim = x.shape
    qkv = self.qkv(self.attention_norm(x)).reshape(batch, seq, 3, self.heads, dim // self.heads)
    attended = jax.nn.dot_product_attention(
        qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True)
    x = x + self.attention_out(attended.reshape(batch, seq, dim))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class Transformer(nnx.Module):
  """Decoder-only language model: ``tokens [batch, seq]`` -> ``logits [batch, seq, vocab]``."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(config.vocab, config.dim, rngs=rngs)
    self.position = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (config.max_len, config.dim)))
    self.blocks = nnx.List([Block(config.dim, config.heads, rngs=rngs)
                            for _ in range(config.layers)])
    self.final_norm = nnx.LayerNorm(config.dim, rngs=rngs)
    self.head = nnx.Linear(config.dim, config.vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[:tokens.shape[-1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.final_norm(x))


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config: ModelConfig, key):
  return nnx.split(Transformer(config, rngs=nnx.Rngs(key)))[1]


def build(config: ModelConfig, seed: int):
  """``(graphdef, params)``: the static structure and the parameter pytree (an ``nnx.State``).

  Initialised under ``jit`` with the seed traced: one compilation per architecture.
  """
  graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(seed))))[0]
  return graphdef, _init_params(config, jax.random.key(seed))


def apply(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------------------------
# Objectives. Labels are the input tokens shifted left: logits at t predict token t + 1.
# ----------------------------------------------------------------------------------------------


def cross_entropy(logits, tokens):
  """Mean next-token cross entropy (nats per byte) over the positions that have a next token."""
  labels = kdjax.shift_labels(tokens, ignore_index=IGNORE_INDEX)
  valid = labels != IGNORE_INDEX
  per_token = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.where(valid, labels, 0))
  return jnp.sum(jnp.where(valid, per_token, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def distill_objective_with_metrics(logits, teacher_logits, tokens, *, kd_coef, divergence,
                                   temperature):
  """``(1 - kd_coef) * cross_entropy + kd_coef * divergence(teacher || student)`` from kdjax,
  returned with its ``kdjax.DistillMetrics`` (the two components, the entropies and the top-1
  agreement, from the same pass over the logits)."""
  return kdjax.distill_with_cross_entropy_with_metrics(
      logits, teacher_logits, kdjax.shift_labels(tokens, ignore_index=IGNORE_INDEX),
      kd_coef=kd_coef, divergence=divergence, temperature=temperature,
      ignore_index=IGNORE_INDEX)


def distill_objective(logits, teacher_logits, tokens, **objective):
  """The objective of :func:`distill_objective_with_metrics` with its two components
  ``(ce, kd)``."""
  loss, metrics = distill_objective_with_metrics(logits, teacher_logits, tokens, **objective)
  return loss, (metrics.cross_entropy, metrics.divergence)


# What a train step logs of a distillation objective (kdjax.DistillMetrics' fields, under the
# names of the history), next to the cross entropy "ce".
TRAIN_METRICS = {"kd": "divergence", "student_entropy": "student_entropy",
                 "teacher_entropy": "teacher_entropy", "top1_agreement": "top1_agreement"}


def _logs(ce, metrics=None) -> dict:
  logs = {"ce": ce}
  if metrics is not None:
    logs.update({name: getattr(metrics, field) for name, field in TRAIN_METRICS.items()})
  return logs


def make_optimizer(*, learning_rate: float, steps: int,
                   warmup: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=learning_rate / (warmup + 1), peak_value=learning_rate, warmup_steps=warmup,
      decay_steps=max(steps, 1), end_value=0.1 * learning_rate)
  # Weight decay on matrices (including the embedding tables), not on biases or norm scales.
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(schedule, b2=0.98, weight_decay=0.01,
                  mask=lambda params: jax.tree.map(lambda x: x.ndim == 2, params)))


def make_loss_fn(graphdef, teacher=None, *, kd_coef=0.0, divergence="forward_kl",
                 temperature=1.0):
  """``loss_fn(params, tokens) -> (loss, logs)`` of a student, ``logs`` a dict of scalars.

  Without ``teacher`` the loss is the cross entropy, logged as ``"ce"``; with
  ``teacher=(graphdef, params)`` it is kdjax's combined objective against the teacher's logits,
  and ``logs`` also holds its metrics (:data:`TRAIN_METRICS`).
  """

  def loss_fn(params, tokens):
    logits = apply(graphdef, params, tokens)
    if teacher is None:
      ce = cross_entropy(logits, tokens)
      return ce, _logs(ce)
    teacher_graphdef, teacher_params = teacher
    # No gradient reaches the teacher: its parameters are not differentiated, and kdjax treats
    # teacher_logits as a constant anyway.
    teacher_logits = apply(teacher_graphdef, teacher_params, tokens)
    loss, metrics = distill_objective_with_metrics(
        logits, teacher_logits, tokens, kd_coef=kd_coef, divergence=divergence,
        temperature=temperature)
    return loss, _logs(metrics.cross_entropy, metrics)

  return loss_fn


def make_train_step(graphdef, optimizer, teacher=None, **objective):
  """A jitted ``(params, opt_state, tokens) -> (params, opt_state, loss, logs)`` step of the
  objective of :func:`make_loss_fn` (``logs``: its dict of scalars)."""
  loss_fn = make_loss_fn(graphdef, teacher, **objective)

  @jax.jit
  def train_step(params, opt_state, tokens):
    (loss, logs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, logs

  return train_step


@functools.partial(jax.jit, static_argnums=0)
def _batch_cross_entropy(graphdef, params, tokens):
  # graphdef is static (hashable): models of the same architecture share one compilation.
  return cross_entropy(apply(graphdef, params, tokens), tokens)


def make_evaluate(graphdef, batches: list[np.ndarray]) -> Callable[[Any], float]:
  """Mean held-out cross entropy (nats per byte) over fixed batches."""

  def evaluate(params) -> float:
    return float(np.mean([float(_batch_cross_entropy(graphdef, params, b)) for b in batches]))

  return evaluate


# ----------------------------------------------------------------------------------------------
# On-policy distillation (GKD): the student's own continuations, scored by the teacher.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0, static_argnames="length")
def sample_continuation(graphdef, params, prompts, key, *, length: int, temperature):
  """``[batch, prompt_len + length]`` int32: the prompts followed by ``length`` tokens sampled
  one at a time from the model at ``temperature`` (as it goes to 0, greedy decoding: ties among
  the largest logits are drawn uniformly).

  A ``lax.scan`` over the generated positions; each step runs the causal model on the whole
  (fixed-size) window and samples from the logits at the last filled position. The positions
  not yet filled hold 0 and cannot affect those logits (causal attention). Without a key-value
  cache this costs ``length`` full forward passes, which is cheap at the demo's sizes and keeps
  the model code unchanged. A pure function of ``(params, prompts, key)``.
  """
  batch, prompt_len = prompts.shape
  if prompt_len < 1:
    raise ValueError(f"prompts must hold at least one token per sequence, got shape "
                     f"{prompts.shape}")
  tokens = jnp.concatenate(
      [jnp.asarray(prompts, jnp.int32), jnp.zeros((batch, length), jnp.int32)], axis=1)

  def tempered(logits):
    # Shifted by the row's max before scaling, so the largest logit is 0 and the others are <= 0
    # at any temperature: a tiny one (whose float32 value may even flush to 0) gives -inf to
    # every other entry and greedy decoding, never inf - inf = NaN.
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(shifted == 0, 0.0, shifted / temperature)

  def generate(tokens, position_and_key):
    position, step_key = position_and_key
    logits = apply(graphdef, params, tokens)
    last = jax.lax.dynamic_index_in_dim(logits, position - 1, axis=1, keepdims=False)
    token = jax.random.categorical(step_key, tempered(last.astype(jnp.float32)))
    return jax.lax.dynamic_update_index_in_dim(tokens, token.astype(jnp.int32), position,
                                               axis=1), None

  positions = prompt_len + jnp.arange(length)
  tokens, _ = jax.lax.scan(generate, tokens, (positions, jax.random.split(key, length)))
  return tokens


def continuation_mask(total_len: int, prompt_len: int) -> np.ndarray:
  """``[total_len]`` bool: the logits positions that predict a generated token.

  The logits at position ``t`` predict token ``t + 1``, so the tokens generated at positions
  ``prompt_len .. total_len - 1`` are predicted at ``prompt_len - 1 .. total_len - 2``: exactly
  the positions at which the student sampled them.
  """
  positions = np.arange(total_len)
  return (positions >= prompt_len - 1) & (positions < total_len - 1)


def on_policy_objective_with_metrics(logits, teacher_logits, prompt_len: int, *, divergence,
                                     beta, temperature):
  """Divergence between the teacher and the student on the generated positions only (no
  hard-label cross entropy, since the labels there are the student's own samples), with its
  ``kdjax.DistillMetrics`` on those positions."""
  mask = jnp.broadcast_to(continuation_mask(logits.shape[-2], prompt_len), logits.shape[:-1])
  return kdjax.distill_loss_with_metrics(logits, teacher_logits, divergence=divergence,
                                         beta=beta, temperature=temperature, where=mask)


def on_policy_objective(logits, teacher_logits, prompt_len: int, **objective):
  """The loss of :func:`on_policy_objective_with_metrics`."""
  return on_policy_objective_with_metrics(logits, teacher_logits, prompt_len, **objective)[0]


def is_on_policy_step(step: int, fraction: float) -> bool:
  """Whether training batch ``step`` is sampled from the student: evenly spaced, a fraction
  ``fraction`` of all steps, and a pure function of the step (nothing to checkpoint)."""
  return math.floor((step + 1) * fraction) > math.floor(step * fraction)


def sampling_key(seed: int, step: int, *, stream: str = "train"):
  """The JAX key of training batch ``step`` (``stream="train"``) or of held-out batch ``step``
  (``stream="eval"``); both derive from ``seed`` alone, so a resumed run redraws the same
  samples."""
  train_root, eval_root = jax.random.split(jax.random.key(seed))
  return jax.random.fold_in({"train": train_root, "eval": eval_root}[stream], step)


def make_on_policy_step(graphdef, optimizer, teacher, *, sample_length, sample_temperature,
                        divergence, beta, temperature):
  """A jitted ``(params, opt_state, tokens, key) -> (params, opt_state, loss, logs)`` step on
  the student's own samples: the first ``seq_len - sample_length`` tokens of each training
  window are the prompt, the student continues it, the teacher scores the continuation, and the
  student is trained with :func:`on_policy_objective`. ``logs["ce"]`` is the student's cross
  entropy on the training window itself (no gradient), the other entries the objective's
  metrics on the generated positions (:data:`TRAIN_METRICS`)."""
  teacher_graphdef, teacher_params = teacher

  @jax.jit
  def on_policy_step(params, opt_state, tokens, key):
    prompt_len = tokens.shape[1] - sample_length
    samples = sample_continuation(graphdef, params, tokens[:, :prompt_len], key,
                                  length=sample_length, temperature=sample_temperature)
    teacher_logits = apply(teacher_graphdef, teacher_params, samples)

    def loss_fn(params):
      return on_policy_objective_with_metrics(
          apply(graphdef, params, samples), teacher_logits, prompt_len, divergence=divergence,
          beta=beta, temperature=temperature)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    ce = cross_entropy(apply(graphdef, params, tokens), tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, _logs(ce, metrics)

  return on_policy_step


@functools.partial(jax.jit, static_argnums=(0, 2), static_argnames="length")
def _sample_log_likelihood(graphdef, params, teacher_graphdef, teacher_params, prompts, key, *,
                           length, temperature):
  """``[batch]``: the teacher's mean log-likelihood of each sequence's generated tokens."""
  samples = sample_continuation(graphdef, params, prompts, key, length=length,
                                temperature=temperature)
  teacher_logits = apply(teacher_graphdef, teacher_params, samples).astype(jnp.float32)
  mask = jnp.broadcast_to(continuation_mask(samples.shape[1], prompts.shape[1]),
                          samples.shape)
  labels = jnp.where(mask, kdjax.shift_labels(samples, ignore_index=IGNORE_INDEX), 0)
  log_likelihood = -optax.softmax_cross_entropy_with_integer_labels(teacher_logits, labels)
  return jnp.sum(jnp.where(mask, log_likelihood, 0.0), axis=1) / length


def make_sample_score(teacher, batches: list[np.ndarray], *, sample_length: int,
                      temperature: float, seed: int) -> Callable[[Any, Any], tuple[float, float]]:
  """``score(graphdef, params) -> (mean, standard_error)``: the teacher's mean log-likelihood
  (nats per byte, at temperature 1) of a model's continuations of the held-out prompts (the
  first ``seq_len - sample_length`` bytes of each held-out window), sampled at ``temperature``,
  and the standard error of that mean over the prompts. Every model gets the same prompts and
  the same keys."""
  teacher_graphdef, teacher_params = teacher

  def score(graphdef, params) -> tuple[float, float]:
    per_sequence = np.concatenate([np.asarray(_sample_log_likelihood(
        graphdef, params, teacher_graphdef, teacher_params,
        batch[:, :batch.shape[1] - sample_length], sampling_key(seed, index, stream="eval"),
        length=sample_length, temperature=temperature)) for index, batch in enumerate(batches)])
    standard_error = (float(np.std(per_sequence, ddof=1) / math.sqrt(len(per_sequence)))
                      if len(per_sequence) > 1 else float("nan"))
    return float(np.mean(per_sequence)), standard_error

  return score


# ----------------------------------------------------------------------------------------------
# Train loop with orbax checkpoints.
# ----------------------------------------------------------------------------------------------


def config_hash(config: dict) -> str:
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def step_file_digests(step_folder: pathlib.Path) -> dict[str, str]:
  """SHA-256 of every file of a saved step, by its path relative to the step's folder."""
  digests = {}
  for path in sorted(step_folder.rglob("*")):
    if path.is_file():
      sha = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          sha.update(block)
      digests[path.relative_to(step_folder).as_posix()] = sha.hexdigest()
  return digests


def record_step_digest(checkpoints: pathlib.Path, digests: pathlib.Path, step: int) -> None:
  """Writes the digest of saved step ``step`` to ``digests/<step>.json`` (atomically)."""
  digests.mkdir(parents=True, exist_ok=True)
  path = digests / f"{step}.json"
  staged = digests / f".{step}.json.tmp"
  with open(staged, "w") as f:
    json.dump({"step": step, "sha256": step_file_digests(checkpoints / str(step))}, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(staged, path)


def step_problem(checkpoints: pathlib.Path, digests: pathlib.Path, step: int) -> str | None:
  """Why saved step ``step`` must not be restored, or ``None`` if its files match its digest."""
  path = digests / f"{step}.json"
  try:
    recorded = json.loads(path.read_text())["sha256"]
    if not (isinstance(recorded, dict) and recorded):
      raise ValueError
  except FileNotFoundError:
    return "it has no digest (its save did not finish, or it was saved without one)"
  except (OSError, ValueError, KeyError, TypeError):
    return f"its digest file {path} is unreadable"
  actual = step_file_digests(checkpoints / str(step))
  for name in sorted(set(recorded) | set(actual)):
    if name not in actual:
      return f"its file {name} is missing"
    if name not in recorded:
      return f"its file {name} was not part of the save"
    if actual[name] != recorded[name]:
      return f"its file {name} does not match its SHA-256 digest (corrupted or truncated)"
  return None


@dataclasses.dataclass
class Phase:
  """One model's training run: its folder, model, objective and schedule."""

  name: str
  folder: pathlib.Path
  model: ModelConfig
  steps: int
  batch_size: int
  seq_len: int
  learning_rate: float
  seed: int
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: int = 3
  teacher: tuple | None = None  # (graphdef, params) for a distilled student.
  kd: dict = dataclasses.field(default_factory=dict)  # kd_coef, divergence, temperature.
  # For an on-policy student: fraction, sample_length, sample_temperature, divergence, beta,
  # temperature (see make_on_policy_step). Its other batches use the objective of ``kd``.
  on_policy: dict = dataclasses.field(default_factory=dict)


def _history_entry(history, step, tokens_seen, heldout_loss, logs=None):
  history["step"].append(step)
  history["tokens"].append(tokens_seen)
  history["heldout_loss"].append(heldout_loss)
  history["train_loss"].append(None if logs is None else float(logs["ce"]))
  # The last step's metrics of a distillation objective (None for the others and at step 0);
  # a history restored from a checkpoint saved without them gets None before.
  for name in TRAIN_METRICS:
    values = history.setdefault(f"train_{name}", [None] * (len(history["step"]) - 1))
    values.append(float(logs[name]) if logs is not None and name in logs else None)


def _set_aside(phase: Phase, checkpoints: pathlib.Path, digests: pathlib.Path,
               step: int) -> pathlib.Path:
  """Moves a saved step that must not be restored (and its digest) out of the manager's way."""
  aside = phase.folder / "unusable_checkpoints"
  aside.mkdir(exist_ok=True)
  destination, copy = aside / f"step-{step}", 1
  while destination.exists():
    destination, copy = aside / f"step-{step}-{copy}", copy + 1
  os.replace(checkpoints / str(step), destination)
  digest = digests / f"{step}.json"
  if digest.exists():
    os.replace(digest, destination.with_name(destination.name + ".digest.json"))
  return destination


class _DrainingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that, as ``asyncio.run`` does, cancels the tasks still running on it and waits
  for them before it closes, and drops the completions that arrive after it closed.

  orbax runs each restore on a fresh loop that it closes as soon as the restore returns or
  raises, without cancelling what still runs on it. When one array fails to read, the reads of
  the other arrays are still in flight: their tasks are destroyed unfinished ("Task exception
  was never retrieved", "coroutine ... was never awaited"), and TensorStore's threads, finishing
  those reads, hand the results to the closed loop, which raises "Event loop is closed" in each
  of them. Nothing awaits that work once the loop is closed, so its completion is dropped.
  """

  def close(self) -> None:
    if not self.is_closed() and not self.is_running():
      pending = [task for task in asyncio.all_tasks(self) if not task.done()]
      for task in pending:
        task.cancel()
      if pending:
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
      self.run_until_complete(self.shutdown_asyncgens())
    super().close()

  def call_soon_threadsafe(self, callback, *args, context=None):
    try:
      return super().call_soon_threadsafe(callback, *args, context=context)
    except RuntimeError:
      if self.is_closed():  # the completion of abandoned work: nothing awaits it any more
        return None
      raise


class _DrainingEventLoopPolicy(asyncio.DefaultEventLoopPolicy):
  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingEventLoop()


@contextlib.contextmanager
def _loops_that_finish_their_tasks():
  """Within the block, new event loops (orbax's) finish their tasks before they close."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingEventLoopPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def _restore_latest_good_step(phase: Phase, manager, digests: pathlib.Path, abstract):
  """``(step, restored)`` of the latest saved step that passes its digest check and restores,
  or ``(0, None)``. Steps that fail are moved aside, each with a one-line warning."""
  checkpoints = pathlib.Path(manager.directory)
  skipped = False
  for step in sorted(manager.all_steps(), reverse=True):
    problem = step_problem(checkpoints, digests, step)
    if problem is None:
      try:
        with _loops_that_finish_their_tasks():
          return step, manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()))
      except Exception as error:  # Whatever the cause, this step is unusable.
        reason = (str(error).splitlines() or [""])[0][:200]
        problem = f"it does not restore ({type(error).__name__}: {reason})"
    destination = _set_aside(phase, checkpoints, digests, step)
    print(f"{phase.name}: warning: skipping the checkpoint at step {step}: {problem}; moved it "
          f"to {destination}", file=sys.stderr, flush=True)
    manager.reload()
    skipped = True
  if skipped:
    print(f"{phase.name}: no usable checkpoint is left; starting from step 0", flush=True)
  return 0, None


def train(phase: Phase, train_tokens: np.ndarray, heldout: list[np.ndarray], *,
          progress: bool = True, step_sleep: float = 0.0) -> tuple[Any, Any, dict]:
  """Trains (or resumes, or just loads) one model. Returns ``(graphdef, params, history)``.

  A checkpoint holds ``{"params", "opt_state"}`` and the evaluation history so far; its step
  number is the number of updates applied. The latest one whose files match their digest is
  restored on start, so a run killed at any point loses at most ``checkpoint_every`` steps and
  then continues bit for bit, and a corrupted checkpoint costs the steps since the one before.
  """
  graphdef, params = build(phase.model, phase.seed)
  optimizer = make_optimizer(learning_rate=phase.learning_rate, steps=phase.steps,
                             warmup=max(1, phase.steps // 20))
  opt_state = jax.jit(optimizer.init)(params)
  tokens_per_step = phase.batch_size * phase.seq_len
  history = {"step": [], "tokens": [], "heldout_loss": [], "train_loss": [],
             **{f"train_{name}": [] for name in TRAIN_METRICS}}

  checkpoints = (phase.folder / "checkpoints").absolute()
  digests = phase.folder / "checkpoint_digests"
  # Synchronous saves: a step's digest is recorded right after its save completes.
  manager = ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(
      max_to_keep=phase.keep_checkpoints, create=True, enable_async_checkpointing=False))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"params": params, "opt_state": opt_state})
  start, restored = _restore_latest_good_step(phase, manager, digests, abstract)
  if restored is not None:
    params, opt_state = restored.state["params"], restored.state["opt_state"]
    history = restored.history
  if start >= phase.steps:
    print(f"{phase.name}: loaded the finished checkpoint at step {start} from {phase.folder}")
    manager.close()
    return graphdef, params, history
  if start:
    print(f"{phase.name}: resuming from the checkpoint at step {start}")

  train_step = make_train_step(graphdef, optimizer, phase.teacher, **phase.kd)
  fraction = phase.on_policy.get("fraction", 0.0)
  if fraction:
    on_policy = {k: v for k, v in phase.on_policy.items() if k != "fraction"}
    on_policy_step = make_on_policy_step(graphdef, optimizer, phase.teacher, **on_policy)
  evaluate = make_evaluate(graphdef, heldout)

  def save(step):
    (digests / f"{step}.json").unlink(missing_ok=True)  # never a stale digest for a new save
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
        history=ocp.args.JsonSave(history)), force=True)
    manager.wait_until_finished()
    record_step_digest(checkpoints, digests, step)
    kept = set(manager.all_steps())
    for path in digests.glob("*.json"):
      if path.stem.isdigit() and int(path.stem) not in kept:
        path.unlink(missing_ok=True)  # the manager removed that step (max_to_keep)

  if start == 0:
    _history_entry(history, 0, 0, evaluate(params), None)
  bar = tqdm(range(start, phase.steps), initial=start, total=phase.steps, desc=phase.name,
             disable=not progress, dynamic_ncols=True, mininterval=0.5)
  clock, clock_step, rate = time.perf_counter(), start, 0.0
  for step in bar:
    batch = train_batch(train_tokens, step, seed=phase.seed, batch_size=phase.batch_size,
                        seq_len=phase.seq_len)
    if fraction and is_on_policy_step(step, fraction):
      params, opt_state, loss, logs = on_policy_step(params, opt_state, batch,
                                                     sampling_key(phase.seed, step))
    else:
      params, opt_state, loss, logs = train_step(params, opt_state, batch)
    ce = logs["ce"]
    done = step + 1
    if step_sleep:
      time.sleep(step_sleep)  # Test hook: widens the window in which a test kills the run.
    if done % 10 == 0 or done == phase.steps:
      now = time.perf_counter()
      rate = (done - clock_step) * tokens_per_step / max(now - clock, 1e-9)
      clock, clock_step = now, done
      bar.set_postfix(loss=f"{float(loss):.3f}", ce=f"{float(ce):.3f}", tok_s=f"{rate:,.0f}")
    if done % phase.eval_every == 0 or done == phase.steps:
      _history_entry(history, done, done * tokens_per_step, evaluate(params), logs)
      if not progress:
        print(f"{phase.name} step {done}: train ce {float(ce):.4f}, "
              f"held-out {history['heldout_loss'][-1]:.4f}{_metrics_text(logs)}, "
              f"{rate:,.0f} tokens/s", flush=True)
    if done % phase.checkpoint_every == 0 or done == phase.steps:
      save(done)
  bar.close()
  manager.wait_until_finished()
  manager.close()
  return graphdef, params, history


def _metrics_text(logs) -> str:
  """The distillation metrics of a log line (empty without them)."""
  if "kd" not in logs:
    return ""
  return (f", kd {float(logs['kd']):.4f}, entropy student {float(logs['student_entropy']):.3f}"
          f" teacher {float(logs['teacher_entropy']):.3f}, top-1 agreement "
          f"{float(logs['top1_agreement']):.3f}")


def perplexity(loss: float) -> float:
  return math.exp(loss)
