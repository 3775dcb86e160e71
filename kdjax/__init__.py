"""kdjax: knowledge-distillation losses for language models in JAX."""

from kdjax._src.divergences import DIVERGENCES as _DIVERGENCE_SPECS
from kdjax._src.losses import (
    distill_loss,
    distill_loss_sum_and_count,
    distill_with_cross_entropy,
    forward_kl,
    generalized_jsd,
    kd_loss,
    reverse_kl,
    shift_labels,
    skew_forward_kl,
    skew_reverse_kl,
    soft_cross_entropy,
    total_variation,
)

__version__ = "0.1.0"

#: Names accepted by the ``divergence=`` argument.
DIVERGENCES: tuple[str, ...] = tuple(sorted(_DIVERGENCE_SPECS))

__all__ = (
    "DIVERGENCES",
    "distill_loss",
    "distill_loss_sum_and_count",
    "distill_with_cross_entropy",
    "forward_kl",
    "generalized_jsd",
    "kd_loss",
    "reverse_kl",
    "shift_labels",
    "skew_forward_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "total_variation",
)
