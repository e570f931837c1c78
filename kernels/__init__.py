"""Attention-statistics kernels (Triton) and their plain-torch references.

`attention_stats` gives per-query statistics of every head in one streamed pass,
`received_attention` the per-key column sums (a second pass), `top_keys` the keys each query
attends to most (a second pass), `stats_from_pattern` the same statistics from a materialised
pattern. All of them cover causal and bidirectional attention, key padding, grouped-query heads,
sliding windows, chunks, logit softcapping, learned sink logits and ALiBi; `attention_stats`
also values of their own width. The definitions are in `kernels.reference`; the blocks the
kernels visit (and skip) are computed in `kernels.blocks`.
"""

from kernels import reference
from kernels.attention_stats import attention_stats
from kernels.received import received_attention
from kernels.reference import AttentionStats, stats_from_pattern
from kernels.top_keys import top_keys

__all__ = [
    "AttentionStats",
    "attention_stats",
    "received_attention",
    "reference",
    "stats_from_pattern",
    "top_keys",
]
