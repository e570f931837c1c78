"""Positional heads: previous-token, duplicate-token and induction heads, scored exactly as
TransformerLens's ``transformer_lens.head_detector.detect_head`` with ``error_measure="mul"``.

Definitions (TransformerLens ``head_detector``; Elhage et al. 2021 and Olsson et al. 2022 for the
head types). A *detection pattern* P over one token sequence t is a 0/1 lower-triangular
``[q_pos, k_pos]`` matrix:

* previous-token: ``P[i, i-1] = 1`` for i >= 1;
* duplicate-token: ``P[i, j] = 1`` for j < i with ``t[j] == t[i]``;
* induction: the duplicate pattern shifted one key to the right, ``P[i, j+1] = 1`` for every
  duplicate pair (i, j) (column 0 stays empty).

With the head's pattern A (``[q_pos, k_pos]``), optionally with the first column (``exclude_bos``)
and the diagonal (``exclude_current_token``) set to 0, the score is ``Σ(A ⊙ P) / Σ A``: the share
of the head's attention that lands on the pattern. Over several sequences the scores are averaged
(as ``detect_head`` does for a list). A test holds these scores to ``detect_head``'s within 1e-4.
This module does not copy the two bugs of older ``detect_head`` versions (the list path dropped
keyword arguments; the exclude options wrote into the cached pattern).

Inputs. As in TransformerLens's induction demos: ``n`` random content tokens repeated twice behind
the tokenizer's prefix (``<bos>``), from :func:`workbench.tasks.domains.repeated_random_tokens`.
Options: ``positional_prompts`` (default 4), ``positional_tokens`` (n, default 50, capped so the
sequence fits the model's context), ``positional_seed`` (0), ``positional_exclude_bos`` and
``positional_exclude_current`` (both False, TransformerLens's defaults).

Capture paths. *Pattern path*: the scores are computed from ``hook_pattern``. *Streamed path*
(long inputs, causal models): a detection pattern is a set of (query, key) pairs, and every pair
has an offset d = i − j. The mass at one offset per query, ``A[i, i−d]``, is the difference of two
kernel statistics, the mass outside sink + recent window for windows d and d + 1 (with one sink
token: ``outside_W[i] = Σ_{1 <= j <= i−W} A[i, j]``); ``A[i, 0]`` is the sink mass and
``A[i, i] = 1 − sink[i] − outside_1[i]``. Each window costs one streamed forward, so the streamed
path serves sequences with few distinct offsets (the repeated random tokens need windows 1, 2,
n − 1, n, n + 1); ``positional_max_forwards`` (default 8) bounds the cost and natural text with
many offsets is refused with an error.

Threshold. TransformerLens gives none. A head is labelled when its score exceeds 0.4 of the score
a perfect head of its type reaches on the same inputs (0.4 as in ARENA 1.2's attention-pattern
detectors); the coverage (share of query rows that have a target) is kept per prompt. On ``<bos>``
+ 2 × 50 tokens a perfect induction head scores 50/101, so its threshold is 0.198.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from probes.basic import decode
from workbench.capture import resolve_path, run_streamed, run_with_patterns
from workbench.errors import ProbeOptionError
from workbench.models import Model
from workbench.probe import Measurement, ScanContext
from workbench.scores import ScoreTable
from workbench.tasks.domains import repeated_random_tokens, special_tokens

POSITIONAL = "positional"
HEAD_TYPES = ("previous_token", "duplicate_token", "induction")
LABEL_FRACTION = 0.4  # of a perfect head's score (ARENA 1.2 detectors use 0.4)
DEFAULT_TOKENS = 50
MAX_FORWARDS = 8

Pairs = tuple[np.ndarray, np.ndarray]  # (query positions [n], key positions [n])


def detection_pairs(tokens: np.ndarray) -> dict[str, Pairs]:
    """The ones of TransformerLens's three detection patterns for ``tokens [seq]``, as (query,
    key) index arrays."""
    n = len(tokens)
    queries = np.arange(1, n)
    by_token: dict[int, list[int]] = defaultdict(list)
    dup_q: list[int] = []
    dup_k: list[int] = []
    for i, token in enumerate(tokens.tolist()):
        earlier = by_token[token]
        dup_q.extend([i] * len(earlier))
        dup_k.extend(earlier)
        earlier.append(i)
    dq, dk = np.asarray(dup_q, dtype=np.int64), np.asarray(dup_k, dtype=np.int64)
    return {
        "previous_token": (queries, queries - 1),
        "duplicate_token": (dq, dk),
        "induction": (dq, dk + 1),
    }


def pattern_scores(
    pattern: torch.Tensor, pairs: dict[str, Pairs], *, exclude_bos: bool, exclude_current: bool
) -> dict[str, torch.Tensor]:
    """``{type: [head]}`` "mul" scores of one layer's ``pattern [head, q_pos, k_pos]``."""
    a = pattern.float().clone()
    if exclude_bos:
        a[:, :, 0] = 0
    if exclude_current:
        a.diagonal(dim1=1, dim2=2).zero_()
    total = a.sum((1, 2))  # [head]
    out = {}
    for name, (q, k) in pairs.items():
        q_t, k_t = torch.as_tensor(q, device=a.device), torch.as_tensor(k, device=a.device)
        out[name] = a[:, q_t, k_t].sum(-1) / total
    return out


def offset_masses(
    model: Model, token_ids: torch.Tensor, offsets: set[int]
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Streamed path: ``{d: [layer, head, q_pos]}`` with ``A[i, i−d]`` (0 where i < d) and the
    sink mass ``A[i, 0]`` as ``[layer, head, q_pos]``, from one forward per recent window."""
    windows = sorted({w for d in offsets for w in ((1,) if d == 0 else (d, d + 1))})
    outside: dict[int, torch.Tensor] = {}
    sink = torch.empty(0)
    for window in windows:
        rec = run_streamed(model, token_ids, sink_size=1, recent_window=window)
        outside[window] = torch.stack([s.outside_mass[0] for s in rec.stats]).double()
        sink = torch.stack([s.sink_mass[0] for s in rec.stats]).double()  # [layer, head, q]
    n = token_ids.numel()
    position = torch.arange(n)  # [q_pos]
    masses = {}
    for d in offsets:
        if d == 0:
            diag = 1.0 - sink - outside[1]
            diag[..., 0] = sink[..., 0]  # the first query sees only itself
            masses[d] = diag
            continue
        mass = outside[d] - outside[d + 1]  # keys i - d >= 1
        mass = torch.where(position == d, sink, mass)  # key i - d == 0 is the sink token
        masses[d] = torch.where(position < d, 0.0, mass)
    return masses, sink


def streamed_scores(
    model: Model,
    token_ids: torch.Tensor,
    pairs: dict[str, Pairs],
    *,
    exclude_bos: bool,
    exclude_current: bool,
    max_forwards: int = MAX_FORWARDS,
) -> dict[str, np.ndarray]:
    """``{type: [layer, head]}`` "mul" scores from the streamed statistics (causal models)."""
    if not model.info.causal:
        raise ProbeOptionError(
            "positional scores on the streamed path need a causal model; use path='pattern'"
        )
    offsets = {int(d) for q, k in pairs.values() for d in np.unique(q - k)}
    if exclude_current:
        offsets.add(0)
    windows = {w for d in offsets for w in ((1,) if d == 0 else (d, d + 1))}
    if len(windows) > max_forwards:
        raise ProbeOptionError(
            f"these inputs need {len(windows)} streamed forwards (one per query-key offset "
            f"window; limit positional_max_forwards={max_forwards}); use repeated random "
            "tokens or the pattern path"
        )
    masses, sink = offset_masses(model, token_ids, offsets)
    n = token_ids.numel()
    total = torch.full(sink.shape[:2], float(n), dtype=torch.float64)  # [layer, head]
    if exclude_bos:
        total -= sink.sum(-1)
    if exclude_current:
        total -= masses[0][..., 1 if exclude_bos else 0 :].sum(-1)
    out = {}
    for name, (q, k) in pairs.items():
        keep = np.ones(len(q), dtype=bool)
        if exclude_bos:
            keep &= k != 0
        if exclude_current:
            keep &= k != q
        numerator = torch.zeros_like(total)
        for d in np.unique(q[keep] - k[keep]):
            rows = torch.as_tensor(q[keep][(q[keep] - k[keep]) == d])
            numerator += masses[int(d)][..., rows].sum(-1)
        out[name] = (numerator / total).float().numpy()
    return out


def positional_statistics(
    model: Model,
    token_ids: torch.Tensor,
    *,
    path: str = "auto",
    exclude_bos: bool = False,
    exclude_current: bool = False,
    max_forwards: int = MAX_FORWARDS,
) -> dict[str, np.ndarray]:
    """The three "mul" scores ``[n_layers, n_heads]`` of one sequence ``[seq]``, plus each
    type's coverage (share of query rows with a target; a perfect head's score)."""
    tokens = token_ids.cpu().numpy()
    n = len(tokens)
    if n < 2:
        raise ProbeOptionError(f"positional scores need >= 2 tokens, got {n}")
    pairs = detection_pairs(tokens)
    if resolve_path(path, n) == "pattern":
        per_layer: list[dict[str, torch.Tensor]] = [{}] * model.info.n_layers

        def on_pattern(layer: int, pattern: torch.Tensor) -> None:  # [head, q_pos, k_pos]
            per_layer[layer] = pattern_scores(
                pattern, pairs, exclude_bos=exclude_bos, exclude_current=exclude_current
            )

        run_with_patterns(model, token_ids, on_pattern)
        out = {
            name: torch.stack([s[name] for s in per_layer]).cpu().numpy().astype(np.float32)
            for name in HEAD_TYPES
        }
    else:
        out = streamed_scores(
            model,
            token_ids,
            pairs,
            exclude_bos=exclude_bos,
            exclude_current=exclude_current,
            max_forwards=max_forwards,
        )
    for name, (q, _) in pairs.items():
        out[f"{name}_coverage"] = np.float32(len(np.unique(q)) / n)
    return out


def positional_inputs(ctx: ScanContext) -> list[np.ndarray]:
    """Repeated random tokens sized by the options (see the module docstring)."""
    tokenizer = ctx.model.tokenizer
    prefix, _ = special_tokens(tokenizer)
    fits = (ctx.model.info.max_context - len(prefix)) // 2
    n_tokens = ctx.option("positional_tokens", min(DEFAULT_TOKENS, fits))
    if not 2 <= n_tokens <= fits:
        raise ProbeOptionError(
            f"positional_tokens={n_tokens}: need 2 <= n <= {fits} so that 2n tokens plus the "
            f"prefix fit the context of {ctx.model.info.max_context}"
        )
    return repeated_random_tokens(
        tokenizer,
        n_prompts=ctx.option("positional_prompts", 4),
        n_tokens=n_tokens,
        seed=ctx.option("positional_seed", 0),
    )


@dataclass(frozen=True)
class PositionalProbe:
    """Previous-token, duplicate-token and induction scores (three tables, one measurement)."""

    name: str = "positional"

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        token_ids = positional_inputs(ctx)
        exclude_bos = ctx.option("positional_exclude_bos", False)
        exclude_current = ctx.option("positional_exclude_current", False)
        max_forwards = ctx.option("positional_max_forwards", MAX_FORWARDS)
        definitions = {
            name: f"transformer_lens.head_detector {name}_head 'mul' score (exclude_bos="
            f"{exclude_bos}, exclude_current_token={exclude_current})"
            for name in HEAD_TYPES
        }
        definitions |= {
            f"{name}_coverage": f"share of query rows with a {name} target (a perfect head's "
            "score without exclusions)"
            for name in HEAD_TYPES
        }
        return [
            Measurement(
                key=POSITIONAL,
                texts=[decode(ctx.model.tokenizer, ids) for ids in token_ids],
                token_ids=token_ids,
                definitions=definitions,
                measure=lambda i: positional_statistics(
                    ctx.model,
                    torch.as_tensor(token_ids[i]),
                    path=ctx.path,
                    exclude_bos=exclude_bos,
                    exclude_current=exclude_current,
                    max_forwards=max_forwards,
                ),
            )
        ]

    def score(self, stats: dict[str, dict[str, np.ndarray]]) -> list[ScoreTable]:
        s = stats[POSITIONAL]
        tables = []
        for name in HEAD_TYPES:
            coverage = float(s[f"{name}_coverage"].mean())
            threshold = round(LABEL_FRACTION * coverage, 4)
            tables.append(
                ScoreTable.from_items(
                    name=name,
                    per_item=s[name],
                    definition=f"TransformerLens head_detector {name}_head score, error_measure "
                    "'mul': sum(A * P) / sum(A) over the detection pattern P, averaged over "
                    "repeated-random-token sequences",
                    threshold=threshold,
                    label=name,
                    parameters={
                        "coverage": round(coverage, 4),
                        "label_fraction": LABEL_FRACTION,
                        "per_item": f"{POSITIONAL}/{name}",
                    },
                )
            )
        return tables
