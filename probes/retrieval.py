"""Retrieval heads: heads that copy the needle of a needle-in-a-haystack prompt into the answer.

Definition (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality",
repo nightdessert/Retrieval_Head, ``retrieval_head_detection.py``): the model answers a needle
trial (:mod:`workbench.tasks.needle`) by greedy decoding. At every decoding step t, with query
position p_t and generated token y_t, head h of layer l takes its top-1 key

    j* = argmax_j A_lh[p_t, j]

and gains ``1 / |answer span|`` when j* lies inside the needle's answer span (the reference's
``real_needle``) and ``token[j*] == y_t``: the head is looking at the very token the model copies.
A trial's score is the sum over its steps. A trial *counts* only when the model retrieved the
needle, i.e. when the ROUGE-1 recall of the answer in the response exceeds 0.5 (the reference's
``rouge1 recall > 50``); a head's retrieval score is the mean over counted trials, and a head
with a score above 0.1 is a *retrieval head*.

As in the reference, the first scored step is the last prompt token (its query produces the first
answer token) and decoding stops at a newline or after ``max_new_tokens`` (50 there). Two
deviations, both documented in docs/probes.md: a newline stops decoding only after the response has
some non-blank text (instruction-tuned small models start with a blank line, where the reference
would stop before answering), and ROUGE-1 recall is computed on lowercase alphanumeric words
without a stemmer (the reference uses the ``rouge_score`` package with its default tokenizer).

Two variants, one definition:

* ``decode`` (the paper's): prefill the prompt, then decode step by step with a KV cache; each
  step's argmax keys come from the streamed capture path
  (:class:`workbench.capture.StreamedRecorder` with ``q_positions`` = the decoding queries, so
  the kernels return the argmax key of just those rows; no L×L tensor).
* ``forced`` (teacher forcing): one prefill over prompt + answer; the queries are the positions
  whose next token is an answer token, y_t is that answer token, and the trial counts when the
  greedy prediction equals y_t for more than half of the answer tokens. Much faster (one forward,
  no decoding loop); it scores only the answer tokens, not what a model adds around them.
  docs/probes.md reports how far the two agree.

Per-trial scores are stored (``needle_<variant>/retrieval``, NaN for trials that did not count),
so ``workbench export --format head-scores`` writes the reference's per-trial lists.

Uncertainty. The table's interval is a bootstrap over the trials (:mod:`workbench.scores`), and a
head is labelled only when its lower bound exceeds 0.1; heads above 0.1 whose bound is not are
tentative. :func:`stability` says how the labelled set depends on the trials: the Jaccard index
between the sets labelled by two random halves of the trials, the set at each length, and the
set from growing subsets of the trials; the table's parameters carry it and :func:`report`
prints it.

Preset ``retrieval_preset=wu2024``: Wu et al.'s grid (``retrieval_head_detection.py``: context
lengths ``linspace(1000, 50000, 20)``, depths ``round(linspace(0, 100, 10))`` percent, each of
the needles) scaled to the model: ``retrieval_n_lengths`` (20) lengths evenly from
``min(1000, top / 4)`` to ``top``, the model's context less the ``retrieval_max_new`` decoding
steps (the reference keeps a 200-token buffer for the same reason), or ``retrieval_max_length``
when smaller; the reference's ten depths; every needle (toy-recall: ``retrieval_trials`` per
cell). ``retrieval_lengths`` and ``retrieval_depths`` still override.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from workbench.capture import StreamedRecorder
from workbench.errors import ProbeOptionError
from workbench.models import Model
from workbench.probe import Measurement, ScanContext
from workbench.scores import ScoreTable
from workbench.store import open_run
from workbench.tasks.needle import (
    NEEDLES,
    NeedleTrial,
    needle_grid,
    rouge1_recall,
    toy_recall_grid,
)

THRESHOLD = 0.1  # Wu et al.: retrieval head when the mean score exceeds 0.1
MIN_RECALL = 0.5  # the reference's ROUGE-1 recall filter (> 50 %)
VARIANTS = ("decode", "forced")
TASKS = ("prose", "toy-recall")
DEFAULT_LENGTHS = {"prose": (1024, 2048), "toy-recall": (24, 36, 48)}
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
PRESETS = ("none", "wu2024")
# Wu et al.'s depths: np.round(np.linspace(0, 100, 10)) percent
WU_DEPTHS = tuple(float(d) / 100 for d in np.round(np.linspace(0, 100, 10)))
WU_N_LENGTHS = 20  # np.linspace(1000, 50000, num=20)
WU_MIN_LENGTH = 1000


@dataclass
class TrialScore:
    """One trial's result: per-head score, the response and whether the trial counts."""

    scores: np.ndarray  # [n_layers, n_heads] sum over scored steps of 1/|answer span| per hit
    response_ids: list[int]  # generated tokens (decode) or greedy predictions (forced)
    recall: float  # decode: ROUGE-1 recall of the answer; forced: share of answer tokens predicted
    retrieved: bool  # recall > MIN_RECALL: the trial counts towards the mean


def _hits(
    argmax: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, span: tuple[int, int]
) -> np.ndarray:
    """``[n_layers, n_heads]`` score from argmax keys ``[n_steps, n_layers, n_heads]``, the token
    ids of all positions ``keys [seq]`` and the token each step generated ``targets [n_steps]``."""
    start, end = span
    inside = (argmax >= start) & (argmax < end)  # [n_steps, n_layers, n_heads]
    held = keys[argmax.clamp(min=0)] == targets[:, None, None]
    return ((inside & held).sum(0).float() / (end - start)).numpy()


@torch.no_grad()
def score_decode(model: Model, trial: NeedleTrial, max_new_tokens: int = 50) -> TrialScore:
    """The paper's variant: greedy decoding with a KV cache, scored at every step."""
    hf, tokenizer = model.hf, model.tokenizer
    prompt = torch.as_tensor(trial.token_ids)
    n = len(prompt)
    steps = max(1, min(max_new_tokens, model.info.max_context - n + 1))
    eos = tokenizer.eos_token_id
    generated: list[int] = []
    with StreamedRecorder(hf, q_positions=torch.arange(n - 1, n - 1 + steps)) as rec:
        out = hf(prompt[None].to(model.device), use_cache=True, logits_to_keep=1)
        for step in range(steps):
            token = int(out.logits[0, -1].argmax())
            generated.append(token)
            text = tokenizer.decode(generated)
            if token == eos or ("\n" in text.lstrip()) or step == steps - 1:
                break
            out = hf(
                torch.tensor([[token]], device=model.device),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
    # forwards[t][layer].argmax: [1, n_heads, 1], the query at position n - 1 + t
    argmax = torch.stack(
        [torch.stack([s.argmax[0, :, -1] for s in layers]) for layers in rec.forwards]
    )  # [n_steps, n_layers, n_heads]
    targets = torch.tensor(generated)
    keys = torch.cat([prompt, targets])
    scores = _hits(argmax, keys, targets, trial.answer_span)
    recall = rouge1_recall(trial.answer, tokenizer.decode(generated, skip_special_tokens=True))
    return TrialScore(scores, generated, recall, recall > MIN_RECALL)


@torch.no_grad()
def score_forced(model: Model, trial: NeedleTrial) -> TrialScore:
    """Teacher-forced variant: one forward over prompt + answer; queries = the positions whose
    next token is an answer token."""
    prompt = torch.as_tensor(trial.token_ids)
    answer = torch.as_tensor(trial.answer_ids)
    ids = torch.cat([prompt, answer])
    n, n_answer = len(prompt), len(answer)
    queries = torch.arange(n - 1, n - 1 + n_answer)
    with StreamedRecorder(model.hf, q_positions=queries) as rec:
        out = model.hf(ids[None].to(model.device), logits_to_keep=n_answer + 1)
    predicted = out.logits[0, :n_answer].argmax(-1).cpu()  # [n_answer]
    argmax = torch.stack([s.argmax[0] for s in rec.stats]).permute(2, 0, 1)
    scores = _hits(argmax, ids, answer, trial.answer_span)  # argmax: [n_answer, layers, heads]
    accuracy = float((predicted == answer).float().mean())
    return TrialScore(scores, predicted.tolist(), accuracy, accuracy > MIN_RECALL)


def preset_lengths(top: int, n_lengths: int = WU_N_LENGTHS) -> tuple[int, ...]:
    """Wu et al.'s lengths scaled to a model: ``n_lengths`` evenly spaced from
    ``min(1000, top // 4)`` to ``top`` (rounded, repeats dropped); one length is ``top``.

    >>> preset_lengths(8142, 4)
    (1000, 3381, 5761, 8142)
    """
    if n_lengths == 1:
        return (top,)
    low = min(WU_MIN_LENGTH, top // 4)
    return tuple(sorted({int(n) for n in np.round(np.linspace(low, top, n_lengths))}))


def trials_for(ctx: ScanContext) -> tuple[str, list[NeedleTrial]]:
    """The needle trials of a scan, from its options (see :class:`RetrievalProbe`)."""
    task = ctx.option("retrieval_task", "auto")
    if task == "auto":
        task = "toy-recall" if ctx.model.info.name == "toy-recall" else "prose"
    if task not in TASKS:
        raise ProbeOptionError(f"retrieval_task must be auto or one of {TASKS}, got {task!r}")
    preset = ctx.option("retrieval_preset", "none")
    if preset not in PRESETS:
        raise ProbeOptionError(f"retrieval_preset must be one of {PRESETS}, got {preset!r}")
    context = ctx.model.info.max_context
    if preset == "wu2024":
        top = min(context - max_new_tokens(ctx, task), ctx.option("retrieval_max_length", context))
        n_lengths = ctx.option("retrieval_n_lengths", WU_N_LENGTHS)
        if n_lengths < 1 or top < 5:
            raise ProbeOptionError(
                f"the wu2024 preset needs retrieval_n_lengths >= 1 and a top length >= 5 "
                f"(got {n_lengths} lengths up to {top})"
            )
        default_lengths, default_depths = preset_lengths(top, n_lengths), WU_DEPTHS
    else:  # the defaults, cut to what the model takes
        default_lengths = tuple(sorted({min(n, context) for n in DEFAULT_LENGTHS[task]}))
        default_depths = DEFAULT_DEPTHS
    lengths = ctx.option("retrieval_lengths", default_lengths)
    depths = ctx.option("retrieval_depths", default_depths)
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ProbeOptionError(f"retrieval_depths must lie in [0, 1], got {depths}")
    too_long = [n for n in lengths if n > context]
    if too_long:
        raise ProbeOptionError(
            f"retrieval_lengths {too_long} exceed the model's context of {context} tokens"
        )
    seed = ctx.option("retrieval_seed", 0)
    try:
        if task == "toy-recall":
            return task, toy_recall_grid(
                lengths, depths, ctx.option("retrieval_trials", 4), seed=seed
            )
        n_needles = ctx.option("retrieval_needles", len(NEEDLES))
        if not 1 <= n_needles <= len(NEEDLES):
            raise ProbeOptionError(f"retrieval_needles must be 1..{len(NEEDLES)}")
        return task, needle_grid(ctx.model.tokenizer, lengths, depths, n_needles, seed=seed)
    except ValueError as e:
        raise ProbeOptionError(str(e)) from None


def max_new_tokens(ctx: ScanContext, task: str) -> int:
    """Decoding steps per trial: ``retrieval_max_new`` (the reference's 50; toy answers are one
    token and the toy model has no notion of stopping, so 1 there)."""
    return ctx.option("retrieval_max_new", 1 if task == "toy-recall" else 50)


def labelled_heads(per_trial: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """``[n_layers, n_heads]`` bool: the heads the label rule (:mod:`workbench.scores`) labels
    from these trials ``[n_trials, n_layers, n_heads]`` alone."""
    return ScoreTable.from_items("retrieval", per_trial, "", threshold, "retrieval").selected


def jaccard(a: np.ndarray, b: np.ndarray) -> float | None:
    """|a ∩ b| / |a ∪ b| of two boolean masks; ``None`` when both are empty."""
    union = int((a | b).sum())
    return None if union == 0 else round(int((a & b).sum()) / union, 4)


def stability(
    per_trial: np.ndarray, lengths: np.ndarray, threshold: float = THRESHOLD, seed: int = 0
) -> dict[str, Any]:
    """How the labelled set depends on the trials ``per_trial [n_trials, n_layers, n_heads]``
    (target lengths ``lengths [n_trials]``), each set by the label rule of the whole table:

    * ``halves``: the trials split at random (seeded) into two halves; the heads each half
      labels and the Jaccard index between the two sets (``None`` when both are empty);
    * ``by_length``: per target length, the trials, the counted ones, and the heads labelled,
      tentative and their Jaccard index with the set of all lengths;
    * ``by_trials``: the first n of the shuffled trials for n = n_trials / 8, / 4, / 2 and all
      (at least 2): the heads labelled and their Jaccard index with the whole set.
    """
    n = len(per_trial)
    everything = labelled_heads(per_trial, threshold)
    order = np.random.default_rng(seed).permutation(n)
    halves = [labelled_heads(per_trial[part], threshold) for part in np.array_split(order, 2)]
    by_length = []
    for length in sorted({int(x) for x in lengths}):
        at = per_trial[lengths == length]
        table = ScoreTable.from_items("retrieval", at, "", threshold, "retrieval")
        by_length.append(
            {
                "length": length,
                "trials": len(at),
                "counted": int(np.isfinite(at).all(axis=(1, 2)).sum()),
                "labelled": int(table.selected.sum()),
                "tentative": int(table.tentative.sum()),
                "jaccard_with_all": jaccard(table.selected, everything),
            }
        )
    by_trials = []
    for size in sorted({max(2, n // d) for d in (8, 4, 2)} | {n}):
        if size > n:
            continue
        chosen = labelled_heads(per_trial[order[:size]], threshold)
        by_trials.append(
            {
                "trials": size,
                "labelled": int(chosen.sum()),
                "jaccard_with_all": jaccard(chosen, everything),
            }
        )
    return {
        "halves": {
            "trials": [len(part) for part in np.array_split(order, 2)],
            "labelled": [int(h.sum()) for h in halves],
            "jaccard": jaccard(*halves),
        },
        "by_length": by_length,
        "by_trials": by_trials,
    }


@dataclass(frozen=True)
class RetrievalProbe:
    """Options (``--option KEY=VALUE``): ``retrieval_variant`` decode (default, the paper's),
    forced, or both (two tables; ``retrieval`` is the decoding one); ``retrieval_task`` auto
    (toy-recall trials for the toy-recall model, else prose), prose or toy-recall;
    ``retrieval_preset`` none (default) or wu2024 (Wu et al.'s grid, module docstring) with
    ``retrieval_max_length`` and ``retrieval_n_lengths``; ``retrieval_lengths`` (prose default
    1024,2048; toy 24,36,48), ``retrieval_depths`` (default 0,0.25,0.5,0.75,1),
    ``retrieval_needles`` (prose: the first n of :data:`workbench.tasks.needle.NEEDLES`, default
    all), ``retrieval_trials`` (toy: trials per cell, default 4), ``retrieval_max_new`` (decode:
    default 50; toy 1), ``retrieval_seed``. List options take one value, a comma list or a JSON
    list."""

    name: str = "retrieval"

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        variant = ctx.option("retrieval_variant", "decode")
        if variant not in (*VARIANTS, "both"):
            raise ProbeOptionError(f"retrieval_variant must be decode, forced or both: {variant!r}")
        variants = VARIANTS if variant == "both" else (variant,)
        task, trials = trials_for(ctx)
        max_new = max_new_tokens(ctx, task)
        token_ids = [t.token_ids for t in trials]
        texts = [ctx.model.tokenizer.decode(ids) for ids in token_ids]
        spans = [np.array([*t.answer_span, t.length, t.depth], np.float32) for t in trials]

        def measure(score_one, i: int) -> dict[str, np.ndarray]:
            result = score_one(trials[i])
            scores = result.scores if result.retrieved else np.full_like(result.scores, np.nan)
            return {
                "retrieval": scores.astype(np.float32),
                "recall": np.float32(result.recall),
                "trial": spans[i],
            }

        scorers = {
            "decode": lambda t: score_decode(ctx.model, t, max_new),
            "forced": lambda t: score_forced(ctx.model, t),
        }
        return [
            Measurement(
                key=f"needle_{v}",
                texts=texts,
                token_ids=token_ids,
                definitions={
                    "retrieval": f"per-trial retrieval score ({v}; {task} needles): sum over "
                    "scored steps of 1/|answer span| when the head's top-1 key is in the answer "
                    "span and holds the generated token; NaN when the trial did not count",
                    "recall": "decode: ROUGE-1 recall of the answer in the response; forced: "
                    "share of answer tokens predicted greedily",
                    "trial": "[answer start, answer end, target length, depth]",
                },
                measure=lambda i, s=scorers[v]: measure(s, i),
            )
            for v in variants
        ]

    def score(self, stats: dict[str, dict[str, np.ndarray]]) -> list[ScoreTable]:
        tables = []
        for v in VARIANTS:
            key = f"needle_{v}"
            if key not in stats:
                continue
            per_trial = stats[key]["retrieval"]  # [n_trials, n_layers, n_heads]
            counted = int(np.isfinite(per_trial).all(axis=(1, 2)).sum())
            lengths = stats[key]["trial"][:, 2].astype(int)  # [n_trials]
            primary = not tables  # "retrieval" is the decoding table when both ran
            tables.append(
                ScoreTable.from_items(
                    name="retrieval" if primary else f"retrieval_{v}",
                    per_item=per_trial,
                    definition="retrieval score (Wu et al. 2024, nightdessert/Retrieval_Head): "
                    f"mean over retrieved needle trials ({v}) of the per-step 1/|answer| credit "
                    "for a top-1 key inside the answer span holding the generated token",
                    threshold=THRESHOLD,
                    label="retrieval" if primary else None,
                    parameters={
                        "variant": v,
                        "per_item": f"{key}/retrieval",
                        "trials": len(per_trial),
                        "counted_trials": counted,
                        "lengths": sorted({int(x) for x in lengths}),
                        "stability": stability(per_trial, lengths),
                    },
                )
            )
        return tables


PAPER_SHARE = "Wu et al.: < 5% of heads (33/1024 = 3.2% Llama-2-7B-80K, 61/1600 = 3.8% Qwen1.5-14B)"


def report(run_path: str) -> str:
    """Plain-text summary of a run's retrieval scores: the labelled and tentative heads next to
    the paper's share, per target length, by number of trials and between halves of the trials
    (:func:`stability`), the top heads with their intervals, and (when both variants ran) how
    far the variants agree. The tables are scored again from the stored per-trial values."""
    lines = []
    with open_run(run_path) as run:
        info = run.model
        stats = {
            key: {name: run.stat(key, name) for name in ("retrieval", "trial", "recall")}
            for key in (f"needle_{v}" for v in VARIANTS)
            if key in run.measurement_names
        }
    tables = {t.parameters["variant"]: t for t in RetrievalProbe().score(stats)}
    for v, table in tables.items():
        s = stats[f"needle_{v}"]
        p = table.parameters
        n_heads = table.values.size
        labelled, tentative = int(table.selected.sum()), int(table.tentative.sum())
        recall = {int(n): float(s["recall"][s["trial"][:, 2] == n].mean()) for n in p["lengths"]}
        lines.append(
            f"{v}: {info.name}, {p['trials']} trials ({p['counted_trials']} counted); label: "
            f"{table.rule}"
        )
        lines.append(
            f"  labelled {labelled}/{n_heads} ({labelled / n_heads:.1%}), tentative {tentative} "
            f"(score > {THRESHOLD}, interval reaching down to it); {PAPER_SHARE}"
        )
        for row in p["stability"]["by_length"]:
            lines.append(
                f"  length {row['length']}: {row['counted']}/{row['trials']} trials counted "
                f"(mean recall {recall[row['length']]:.2f}); {row['labelled']} labelled, "
                f"{row['tentative']} tentative; Jaccard with all lengths "
                f"{_number(row['jaccard_with_all'])}"
            )
        growth = ", ".join(
            f"{row['trials']}: {row['labelled']} (Jaccard {_number(row['jaccard_with_all'])})"
            for row in p["stability"]["by_trials"]
        )
        lines.append(f"  labelled by number of trials (Jaccard with all trials): {growth}")
        halves = p["stability"]["halves"]
        lines.append(
            f"  halves of the trials ({halves['trials'][0]} / {halves['trials'][1]}): "
            f"{halves['labelled'][0]} vs {halves['labelled'][1]} labelled, Jaccard "
            f"{_number(halves['jaccard'])}"
        )
        values = np.nan_to_num(table.values, nan=-1).ravel()
        order = np.argsort(-values, kind="stable")[:10]
        low, high = (b.ravel() for b in (table.interval.low, table.interval.high))
        top = ", ".join(
            f"{i // info.n_heads}.{i % info.n_heads} {values[i]:.2f} [{low[i]:.2f}, {high[i]:.2f}]"
            for i in order
        )
        lines.append(f"  top heads (layer.head score [95% interval]): {top}")
    if len(tables) == 2:
        a, b = (np.nan_to_num(tables[v].values.ravel()) for v in VARIANTS)
        sa, sb = (tables[v].selected.ravel() for v in VARIANTS)
        top_a, top_b = (set(np.argsort(-x, kind="stable")[:10]) for x in (a, b))
        lines.append(
            f"agreement decode vs forced: Pearson r {np.corrcoef(a, b)[0, 1]:.3f}; labelled: "
            f"{int(sa.sum())} vs {int(sb.sum())}, shared {int((sa & sb).sum())} (Jaccard "
            f"{_number(jaccard(sa, sb))}); top-10 shared {len(top_a & top_b)}; max |difference| "
            f"{np.abs(a - b).max():.2f}"
        )
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "n/a (both sets empty)" if value is None else f"{value:.2f}"
