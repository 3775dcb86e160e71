"""kdjax: knowledge-distillation losses for language models in JAX."""

from kdjax._src.cache import (
    TeacherCacheError,
    open_hidden_state_cache,
    open_teacher_cache,
    read_hidden_state_cache,
    read_teacher_cache,
    read_teacher_head,
    write_hidden_state_cache,
    write_teacher_cache,
)
from kdjax._src.divergences import DIVERGENCES as _DIVERGENCE_SPECS
from kdjax._src.features import hidden_state_loss, hidden_state_loss_sum_and_count
from kdjax._src.fused import (
    fused_linear_distill_loss,
    fused_linear_distill_loss_sum_and_count,
    fused_linear_distill_loss_with_metrics,
    fused_linear_distill_with_cross_entropy,
    fused_linear_distill_with_cross_entropy_sum_and_count,
    fused_linear_distill_with_cross_entropy_with_metrics,
)
from kdjax._src.implementations import IMPLEMENTATIONS
from kdjax._src.losses import (
    distill_loss,
    distill_loss_sum_and_count,
    distill_loss_with_metrics,
    distill_with_cross_entropy,
    distill_with_cross_entropy_sum_and_count,
    distill_with_cross_entropy_with_metrics,
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
from kdjax._src.metrics import DistillMetrics, TokenMetrics
from kdjax._src.sampling import sample_teacher
from kdjax._src.sharded import (
    vocab_parallel_distill_loss,
    vocab_parallel_fused_linear_distill_loss,
)
from kdjax._src.sparse import (
    TAILS,
    sparse_distill_loss,
    sparse_distill_loss_sum_and_count,
    sparse_distill_loss_with_metrics,
    topk_teacher,
)
from kdjax._src.uld import align_tokenizations, align_tokenizations_batch, uld_loss
from kdjax._src.vocab import align_vocab

__version__ = "0.1.0"

#: Names accepted by the ``divergence=`` argument.
DIVERGENCES: tuple[str, ...] = tuple(sorted(_DIVERGENCE_SPECS))

__all__ = (
    "DIVERGENCES",
    "DistillMetrics",
    "IMPLEMENTATIONS",
    "TAILS",
    "TeacherCacheError",
    "TokenMetrics",
    "align_tokenizations",
    "align_tokenizations_batch",
    "align_vocab",
    "distill_loss",
    "distill_loss_sum_and_count",
    "distill_loss_with_metrics",
    "distill_with_cross_entropy",
    "distill_with_cross_entropy_sum_and_count",
    "distill_with_cross_entropy_with_metrics",
    "forward_kl",
    "fused_linear_distill_loss",
    "fused_linear_distill_loss_sum_and_count",
    "fused_linear_distill_loss_with_metrics",
    "fused_linear_distill_with_cross_entropy",
    "fused_linear_distill_with_cross_entropy_sum_and_count",
    "fused_linear_distill_with_cross_entropy_with_metrics",
    "generalized_jsd",
    "hidden_state_loss",
    "hidden_state_loss_sum_and_count",
    "kd_loss",
    "open_hidden_state_cache",
    "open_teacher_cache",
    "read_hidden_state_cache",
    "read_teacher_cache",
    "read_teacher_head",
    "reverse_kl",
    "sample_teacher",
    "shift_labels",
    "skew_forward_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "sparse_distill_loss",
    "sparse_distill_loss_sum_and_count",
    "sparse_distill_loss_with_metrics",
    "topk_teacher",
    "total_variation",
    "uld_loss",
    "vocab_parallel_distill_loss",
    "vocab_parallel_fused_linear_distill_loss",
    "write_hidden_state_cache",
    "write_teacher_cache",
)
