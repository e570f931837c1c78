"""Capture: what each attention head does on a prompt, from patterns or from streamed kernels.

One package owns every way the workbench looks inside attention:

* :mod:`~workbench.capture.paths` -- the two capture paths (TransformerLens patterns for short
  prompts, streamed kernel statistics at any length) and :func:`resolve_path`, the one rule
  that picks between them;
* :mod:`~workbench.capture.attention` -- the attention-function swap that recording,
  intervening (:mod:`interventions.streamed`) and the KV-policy simulation
  (:mod:`workbench.kv_policy`) share: one parser of what transformers hands an attention
  function (masks, windows, chunks, softcap, learned sinks), one registration, one context
  manager;
* :mod:`~workbench.capture.streamed` -- :class:`StreamedRecorder`, per-head kernel statistics of
  every layer during a forward pass;
* :mod:`~workbench.capture.statistics` -- :func:`head_statistics`, a prompt's per-head
  statistics ``[n_layers, n_heads]`` from either path.
"""

from workbench.capture.attention import AttentionCall, KeyMask, attend, use_attention
from workbench.capture.paths import (
    PATHS,
    PATTERN_PATH_MAX_TOKENS,
    layer_of,
    resolve_path,
    run_streamed,
    run_with_patterns,
)
from workbench.capture.statistics import STATISTICS, QueryLayout, head_statistics, reduce_stats
from workbench.capture.streamed import StreamedRecorder

__all__ = [
    "PATHS",
    "PATTERN_PATH_MAX_TOKENS",
    "STATISTICS",
    "AttentionCall",
    "KeyMask",
    "QueryLayout",
    "StreamedRecorder",
    "attend",
    "head_statistics",
    "layer_of",
    "reduce_stats",
    "resolve_path",
    "run_streamed",
    "run_with_patterns",
    "use_attention",
]
