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
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

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


def mean_over_counted(per_trial: np.ndarray) -> np.ndarray:
    """``[n_layers, n_heads]`` mean over trials that counted (rows not all NaN); NaN when none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice": no trial counted
        return np.nanmean(per_trial, axis=0)


def trials_for(ctx: ScanContext) -> tuple[str, list[NeedleTrial]]:
    """The needle trials of a scan, from its options (see :class:`RetrievalProbe`)."""
    task = ctx.option("retrieval_task", "auto")
    if task == "auto":
        task = "toy-recall" if ctx.model.info.name == "toy-recall" else "prose"
    if task not in TASKS:
        raise ProbeOptionError(f"retrieval_task must be auto or one of {TASKS}, got {task!r}")
    context = ctx.model.info.max_context
    if "retrieval_lengths" in ctx.options:
        lengths = _numbers(ctx, "retrieval_lengths", DEFAULT_LENGTHS[task], int)
    else:  # the defaults, cut to what the model takes
        lengths = sorted({min(n, context) for n in DEFAULT_LENGTHS[task]})
    depths = _numbers(ctx, "retrieval_depths", DEFAULT_DEPTHS, float)
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


def _numbers(ctx: ScanContext, name: str, default: tuple, kind: type) -> list:
    raw = ctx.option(name, tuple(str(v) for v in default))
    try:
        return [kind(v) for v in raw]
    except ValueError:
        raise ProbeOptionError(f"{name}: expected a comma list of numbers, got {raw}") from None


@dataclass(frozen=True)
class RetrievalProbe:
    """Options (``--option KEY=VALUE``): ``retrieval_variant`` decode (default, the paper's),
    forced, or both (two tables; ``retrieval`` is the decoding one); ``retrieval_task`` auto
    (toy-recall trials for the toy-recall model, else prose), prose or toy-recall;
    ``retrieval_lengths`` (prose default 1024,2048; toy 24,36,48), ``retrieval_depths``
    (default 0,0.25,0.5,0.75,1), ``retrieval_needles`` (prose: the first n of
    :data:`workbench.tasks.needle.NEEDLES`, default all), ``retrieval_trials`` (toy: trials per
    cell, default 4), ``retrieval_max_new`` (decode: default 50; toy 1), ``retrieval_seed``."""

    name: str = "retrieval"

    def measurements(self, ctx: ScanContext) -> list[Measurement]:
        variant = ctx.option("retrieval_variant", "decode")
        if variant not in (*VARIANTS, "both"):
            raise ProbeOptionError(f"retrieval_variant must be decode, forced or both: {variant!r}")
        variants = VARIANTS if variant == "both" else (variant,)
        task, trials = trials_for(ctx)
        # toy answers are one token and the model has no notion of stopping: score that token only
        max_new = ctx.option("retrieval_max_new", 1 if task == "toy-recall" else 50)
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
            lengths = sorted({int(x) for x in stats[key]["trial"][:, 2]})
            primary = not tables  # "retrieval" is the decoding table when both ran
            tables.append(
                ScoreTable(
                    name="retrieval" if primary else f"retrieval_{v}",
                    values=mean_over_counted(per_trial),
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
                        "lengths": lengths,
                    },
                )
            )
        return tables


def report(run_path: str) -> str:
    """Plain-text summary of a run's retrieval scores: per target length the counted trials and
    the retrieval heads, the top heads, and (when both variants ran) how far they agree."""
    lines = []
    with open_run(run_path) as run:
        info = run.model
        tables = {}
        for v in VARIANTS:
            key = f"needle_{v}"
            if key not in run.measurement_names:
                continue
            per_trial = run.stat(key, "retrieval")  # [n_trials, n_layers, n_heads]
            lengths = run.stat(key, "trial")[:, 2].astype(int)
            recall = run.stat(key, "recall")
            total = mean_over_counted(per_trial)
            tables[v] = total
            n_heads = total.size
            lines.append(f"{v}: {info.name}, {len(per_trial)} trials")
            for length in sorted(set(lengths)):
                at = lengths == length
                counted = np.isfinite(per_trial[at]).all(axis=(1, 2))
                heads = int((mean_over_counted(per_trial[at]) > THRESHOLD).sum())
                lines.append(
                    f"  length {length}: {int(counted.sum())}/{int(at.sum())} trials counted "
                    f"(mean recall {recall[at].mean():.2f}); {heads}/{n_heads} heads > "
                    f"{THRESHOLD} ({heads / n_heads:.1%})"
                )
            heads = int((total > THRESHOLD).sum())
            order = np.argsort(-np.nan_to_num(total, nan=-1).ravel(), kind="stable")[:10]
            top = ", ".join(
                f"{i // info.n_heads}.{i % info.n_heads} ({total.ravel()[i]:.2f})" for i in order
            )
            lines.append(
                f"  all lengths: {heads}/{n_heads} heads > {THRESHOLD} ({heads / n_heads:.1%})"
            )
            lines.append(f"  top heads (layer.head): {top}")
    if len(tables) == 2:
        a, b = (np.nan_to_num(tables[v].ravel()) for v in VARIANTS)
        sa, sb = a > THRESHOLD, b > THRESHOLD
        top_a, top_b = (set(np.argsort(-x, kind="stable")[:10]) for x in (a, b))
        lines.append(
            f"agreement decode vs forced: Pearson r {np.corrcoef(a, b)[0, 1]:.3f}; heads > "
            f"{THRESHOLD}: {int(sa.sum())} vs {int(sb.sum())}, shared {int((sa & sb).sum())} "
            f"(Jaccard {(sa & sb).sum() / max(1, (sa | sb).sum()):.2f}); top-10 shared "
            f"{len(top_a & top_b)}; max |difference| {np.abs(a - b).max():.2f}"
        )
    return "\n".join(lines)
