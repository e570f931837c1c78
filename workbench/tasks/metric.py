"""Metric tasks, the evaluation loop's inputs.

A metric task turns a model into batches of *equal-length* prompts (no padding: an intervention
at position -1 means the same token in every row, and a resampled prompt lines up token by token)
and scores logits per example. Anything with this shape is a metric task (:class:`Task`); the
built-ins, each registered by name in :mod:`workbench.tasks.registry`:

* :class:`IOI` (``ioi``; ``ioi-toy`` is ``toy=True``) — indirect object identification (Wang et
  al. 2022) from :mod:`workbench.tasks.ioi`: ``logit_diff`` = logit(IO) − logit(S) at the final
  token and ``accuracy`` = share with logit(IO) > logit(S); the ABC prompts are the ``corrupted``
  variant.
* :class:`ColoredObjects` (``colored-objects``) — the colour of a queried object
  (:mod:`workbench.tasks.colored_objects`), scored like IOI. It and IOI are
  :class:`TemplatedMetric` tasks, which circuit discovery also runs on.
* :class:`Needle` (``needle``) — needle-in-a-haystack retrieval at one length (Wu et al. 2024's
  prompt, from :mod:`workbench.tasks.needle`), scored by teacher forcing: ``answer_accuracy`` =
  share of the answer's tokens that are the model's greedy choice given the answer so far (a
  token-level stand-in for the reference's ROUGE-1 recall of a generated answer), ``exact`` = all
  of them, ``answer_logprob`` = mean log-probability of the answer tokens.
* :class:`Loss` (``loss``) — next-token cross-entropy on windows of the shipped corpus
  (``loss``, nats).
* :class:`NextToken` (``next-token``) — custom prompts with a target (and optionally a foil and
  a corrupted twin): ``logit_diff`` (with foils) or ``logprob``, and ``accuracy``.
* :class:`Toy` (``toy``) — the task a ``toy-*`` reference model was trained on
  (:mod:`workbench.tasks.toy`): ``accuracy`` and (where defined) ``logit_diff`` at the scored
  positions, as its model card measures them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.errors import TaskBuildError
from workbench.models import Model
from workbench.tasks.colored_objects import ColoredObjectsTask
from workbench.tasks.corpus import corpus
from workbench.tasks.ioi import IOITask, paper_task, toy_task
from workbench.tasks.needle import NEEDLES, needle_grid, toy_recall_grid
from workbench.tasks.registry import get_task, register
from workbench.tasks.templated import build_pair

__all__ = [
    "IOI",
    "ColoredObjects",
    "Loss",
    "Needle",
    "NextToken",
    "Task",
    "TaskBatch",
    "TemplatedMetric",
    "Toy",
]


@dataclass
class TaskBatch:
    """Equal-length prompts and what the task's score needs.

    ``tokens [batch, seq]``; ``variants`` maps a name (``"corrupted"``) to aligned token ids of
    the same shape, read by resample and patch interventions; ``keep``: the score reads the
    logits of the last ``keep`` positions (None = every position); ``data``: per-example targets;
    ``index``: each row's place in the task's example order (results are reported in that
    order; None = the order of the batches).
    """

    tokens: Tensor  # [batch, seq]
    variants: dict[str, Tensor] = field(default_factory=dict)
    keep: int | None = 1
    data: dict[str, Any] = field(default_factory=dict)
    index: list[int] | None = None


@runtime_checkable
class Task(Protocol):
    """What the evaluation loop (``interventions.evaluate``) needs. ``metrics[0]`` is the
    headline metric."""

    name: str
    metrics: tuple[str, ...]

    def batches(self, model: Model, batch_size: int) -> list[TaskBatch]:
        """The task's prompts for this model's tokenizer, in equal-length batches."""
        ...

    def score(self, logits: Tensor, batch: TaskBatch) -> dict[str, Tensor]:
        """Per-example metrics ``{name: [batch]}`` from ``logits [batch, keep, vocab]``."""
        ...


def _buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal length, in chunks of at most ``batch_size``."""
    if batch_size < 1:
        raise TaskBuildError(f"batch_size must be >= 1, got {batch_size}")
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        by_length[int(n)].append(i)
    return [
        idx[s : s + batch_size]
        for _, idx in sorted(by_length.items())
        for s in range(0, len(idx), batch_size)
    ]


def _pair_scores(last: Tensor, target: Tensor, foil: Tensor | None) -> dict[str, Tensor]:
    """``last [batch, vocab]`` logits at the answer position."""
    rows = torch.arange(last.shape[0], device=last.device)
    right = last[rows, target.to(last.device)]
    if foil is None:
        logprob = last.float().log_softmax(-1)[rows, target.to(last.device)]
        correct = last.argmax(-1) == target.to(last.device)
        return {"logprob": logprob, "accuracy": correct.float()}
    diff = right - last[rows, foil.to(last.device)]
    return {"logit_diff": diff.float(), "accuracy": (diff > 0).float()}


class TemplatedMetric(ABC):
    """Base of the metric tasks drawn from a templated task (:attr:`templated`, e.g.
    :class:`~workbench.tasks.ioi.IOITask`): ``n`` clean prompts drawn with ``seed`` (from the
    template indices ``templates``, default all) and their corrupted twins as the
    ``corrupted`` variant; metrics ``logit_diff`` = logit(answer) − logit(competitor) at the
    final token and ``accuracy`` = share with logit(answer) > logit(competitor)."""

    n: int
    seed: int
    templates: tuple[int, ...] | None

    @property
    @abstractmethod
    def templated(self) -> Any:
        """The templated task the prompts are drawn from (``build``, ``corrupt``)."""

    def batches(self, model: Model, batch_size: int) -> list[TaskBatch]:
        clean, corrupted = build_pair(
            self.templated, model.tokenizer, self.n, seed=self.seed, templates=self.templates
        )
        ends = clean.end.tolist()
        out = []
        for idx in _buckets(ends, batch_size):
            width = ends[idx[0]] + 1
            out.append(
                TaskBatch(
                    tokens=clean.tokens[idx, :width],
                    variants={"corrupted": corrupted.tokens[idx, :width]},
                    keep=1,
                    data={"target": clean.answer_ids[idx], "foil": clean.wrong_ids[idx]},
                    index=idx,
                )
            )
        return out

    def score(self, logits: Tensor, batch: TaskBatch) -> dict[str, Tensor]:
        return _pair_scores(logits[:, -1], batch.data["target"], batch.data["foil"])


@register("ioi", "metric", "templated")
@register("ioi-toy", "metric", "templated", fixed={"toy": True})
@dataclass
class IOI(TemplatedMetric):
    """IOI prompts (``n``, drawn with ``seed``) and their ABC twins; ``toy=True`` uses the
    vocabulary and templates of the ``toy-ioi`` reference model."""

    n: int = 64
    seed: int = 0
    toy: bool = False
    templates: tuple[int, ...] | None = None
    name: str = "ioi"
    metrics: tuple[str, ...] = ("logit_diff", "accuracy")

    @property
    def templated(self) -> IOITask:
        return toy_task() if self.toy else paper_task()


@register("colored-objects", "metric", "templated")
@dataclass
class ColoredObjects(TemplatedMetric):
    """Colored-objects prompts (``n``, drawn with ``seed``) and their twins with fresh colours."""

    n: int = 64
    seed: int = 0
    templates: tuple[int, ...] | None = None
    name: str = "colored-objects"
    metrics: tuple[str, ...] = ("logit_diff", "accuracy")

    @property
    def templated(self) -> ColoredObjectsTask:
        return ColoredObjectsTask()


@register("next-token", "metric")
@dataclass
class NextToken:
    """Custom prompts: ``targets[i]`` should follow ``prompts[i]`` (its first token counts).

    With ``foils`` the metric is logit(target) − logit(foil); ``corrupted`` prompts (same token
    length as their clean prompt) become the ``corrupted`` variant.
    """

    prompts: Sequence[str]
    targets: Sequence[str]
    foils: Sequence[str] | None = None
    corrupted: Sequence[str] | None = None
    name: str = "next-token"
    metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if n == 0:
            raise TaskBuildError("NextToken needs at least one prompt")
        for label, items in (("targets", self.targets), ("foils", self.foils),
                             ("corrupted", self.corrupted)):  # fmt: skip
            if items is not None and len(items) != n:
                raise TaskBuildError(f"NextToken: {len(items)} {label} for {n} prompts")
        if not self.metrics:
            self.metrics = ("logit_diff", "accuracy") if self.foils else ("logprob", "accuracy")

    def batches(self, model: Model, batch_size: int) -> list[TaskBatch]:
        def first_token(text: str) -> int:
            ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise TaskBuildError(f"NextToken: {text!r} tokenizes to nothing")
            return int(ids[0])

        prompts = [model.tokenize(p) for p in self.prompts]
        variants = [model.tokenize(p) for p in self.corrupted] if self.corrupted else None
        if variants is not None:
            for i, (p, c) in enumerate(zip(prompts, variants, strict=True)):
                if len(p) != len(c):
                    raise TaskBuildError(
                        f"NextToken: corrupted prompt {i} has {len(c)} tokens, its clean prompt "
                        f"{len(p)}; a corrupted twin must line up token by token"
                    )
        targets = torch.tensor([first_token(t) for t in self.targets])
        foils = torch.tensor([first_token(t) for t in self.foils]) if self.foils else None
        out = []
        for idx in _buckets([len(p) for p in prompts], batch_size):
            out.append(
                TaskBatch(
                    tokens=torch.stack([prompts[i] for i in idx]),
                    variants={"corrupted": torch.stack([variants[i] for i in idx])}
                    if variants
                    else {},
                    keep=1,
                    data={"target": targets[idx], "foil": None if foils is None else foils[idx]},
                    index=idx,
                )
            )
        return out

    def score(self, logits: Tensor, batch: TaskBatch) -> dict[str, Tensor]:
        return _pair_scores(logits[:, -1], batch.data["target"], batch.data["foil"])


@register("needle", "metric")
@dataclass
class Needle:
    """Needle retrieval at ``length`` tokens over ``depths`` × ``needles`` (indices into
    :data:`workbench.tasks.needle.NEEDLES`, default all), haystacks seeded from ``seed``.
    ``toy=True``: the ``toy-recall`` model's key-value trials (``toy_recall_grid``,
    ``per_cell`` per depth) instead of prose."""

    length: int = 1024
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    needles: tuple[int, ...] | None = None
    seed: int = 0
    toy: bool = False
    per_cell: int = 8
    name: str = "needle"
    metrics: tuple[str, ...] = ("answer_accuracy", "exact", "answer_logprob")

    def batches(self, model: Model, batch_size: int) -> list[TaskBatch]:
        if self.toy:
            trials = toy_recall_grid([self.length], list(self.depths), self.per_cell, self.seed)
        else:
            needles = None if self.needles is None else [NEEDLES[i] for i in self.needles]
            trials = needle_grid(
                model.tokenizer, [self.length], list(self.depths), needles, seed=self.seed
            )
        # teacher forcing: the prompt, then the answer but its last token
        rows = [np.concatenate([t.token_ids, t.answer_ids[:-1]]) for t in trials]
        out = []
        for idx in _buckets([len(r) for r in rows], batch_size):
            answer = torch.tensor(np.stack([trials[i].answer_ids for i in idx]))
            out.append(
                TaskBatch(
                    tokens=torch.tensor(np.stack([rows[i] for i in idx])),
                    keep=answer.shape[1],
                    data={"answer": answer},
                    index=idx,
                )
            )
        return out

    def score(self, logits: Tensor, batch: TaskBatch) -> dict[str, Tensor]:
        answer = batch.data["answer"].to(logits.device)  # [batch, n_answer]
        correct = (logits.argmax(-1) == answer).float()
        logprob = logits.float().log_softmax(-1).gather(-1, answer[..., None])[..., 0]
        return {
            "answer_accuracy": correct.mean(-1),
            "exact": correct.min(-1).values,
            "answer_logprob": logprob.mean(-1),
        }


@register("loss", "metric")
@dataclass
class Loss:
    """Next-token loss on ``n`` windows of ``length`` tokens of the shipped ``corpus``
    (``"prose"`` or ``"code"``), or of ``text`` when given; windows start at seeded places."""

    n: int = 16
    length: int = 128
    corpus: str = "prose"
    text: str | None = None
    seed: int = 0
    name: str = "loss"
    metrics: tuple[str, ...] = ("loss",)

    def batches(self, model: Model, batch_size: int) -> list[TaskBatch]:
        text = self.text if self.text is not None else corpus(self.corpus)
        ids = np.asarray(model.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = model.tokenize("a")[:1].tolist()
        bos = bos if bos == [model.tokenizer.bos_token_id] else []
        span = self.length - len(bos)
        if len(ids) < span + 1:
            raise TaskBuildError(f"the text has {len(ids)} tokens, fewer than a window")
        starts = np.random.default_rng(self.seed).integers(0, len(ids) - span, size=self.n)
        rows = [torch.tensor(bos + ids[s : s + span].tolist()) for s in starts]
        return [
            TaskBatch(tokens=torch.stack([rows[i] for i in idx]), keep=None, index=idx)
            for idx in _buckets([len(r) for r in rows], batch_size)
        ]

    def score(self, logits: Tensor, batch: TaskBatch) -> dict[str, Tensor]:
        target = batch.tokens[:, 1:].to(logits.device)
        losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, reduction="none")
        return {"loss": losses.mean(-1)}


@register("toy", "metric")
@dataclass
class Toy:
    """The training task of a ``toy-*`` reference model (``toy-bb``, ``toy-recall``,
    ``toy-ioi``): ``n`` fresh sequences drawn with ``seed``, scored at the task's positions.
    An example is a sequence (its metrics averaged over its scored positions); sequences
    without a scored position are left out."""

    model_name: str = "toy-ioi"
    n: int = 256
    seed: int = 12345
    name: str = "toy"
    metrics: tuple[str, ...] = ("accuracy", "logit_diff")

    def batches(self, model: Model, batch_size: int) -> list[TaskBatch]:
        sample = get_task(self.model_name, kind="toy").sample(self.n, self.seed)
        has_foil = bool((sample.wrong[sample.eval_mask] >= 0).all())
        self.metrics = ("accuracy", "logit_diff") if has_foil else ("accuracy",)
        idx_all = [i for i in range(self.n) if bool(sample.eval_mask[i].any())]  # scored ones
        return [
            TaskBatch(
                tokens=sample.input_ids[idx],
                keep=None,
                data={
                    "labels": sample.labels[idx],
                    "mask": sample.eval_mask[idx],
                    "wrong": sample.wrong[idx],
                },
            )
            for idx in [idx_all[s : s + batch_size] for s in range(0, len(idx_all), batch_size)]
        ]

    def score(self, logits: Tensor, batch: TaskBatch) -> dict[str, Tensor]:
        mask = batch.data["mask"].to(logits.device)  # [batch, seq]
        labels = batch.data["labels"].clamp(min=0).to(logits.device)
        right = logits.gather(-1, labels[..., None])[..., 0]
        per_position = (logits.argmax(-1) == labels).float()
        count = mask.sum(-1).clamp(min=1)
        out = {"accuracy": (per_position * mask).sum(-1) / count}
        if "logit_diff" in self.metrics:
            wrong = batch.data["wrong"].clamp(min=0).to(logits.device)
            diff = right - logits.gather(-1, wrong[..., None])[..., 0]
            out["logit_diff"] = (diff * mask).sum(-1) / count
        return out
