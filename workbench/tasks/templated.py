"""Templated token-level tasks: prompts built from templates with slots, positions known exactly.

Circuit discovery (Wang et al. 2022, "Interpretability in the Wild", arXiv:2211.00593) needs
more than prompts: for every prompt the token positions of the words that play a role (the
indirect object, both mentions of the subject, the final token), the token ids of the right and
the competing answer, and a *corrupted* twin of the same length and structure whose information
about the answer is gone. This module holds what every such task shares:

- :func:`render` fills a template such as ``"When {IO} and {S1} went to the {PLACE}, {S2} gave a
  {OBJECT} to"`` and returns the token ids plus the token position of every tracked slot. It
  reads the positions from the tokenizer's character offsets and checks that each tracked value is
  exactly one token, the same token as the value tokenized alone with a leading space (so the
  answer id read at the final position is the id the model would emit);
- :func:`single_token_words` keeps the words of a list that are one token in a tokenizer
  (checked, not assumed);
- :class:`TaskDataset` batches rendered prompts: ``tokens [batch, seq]`` right-padded (the models
  are causal and every read happens at or before the final prompt token, so the padding after it
  can never be seen), ``positions`` per role ``[batch]``, ``answer_ids``/``wrong_ids`` ``[batch]``,
  and ``groups`` (the template index), which the mean ablation uses to average over prompts of
  the same template, as the paper does, so positions line up.

Task modules (``workbench.tasks.ioi``, ``workbench.tasks.colored_objects``) declare which of their
positions play the four roles the circuit rules talk about (``IO`` the answer's source, ``S1`` the
first mention of the repeated token, ``S2`` its repeat, ``END`` the position that predicts), so one
pipeline finds circuits in all of them. :func:`build_pair` draws a task's clean prompts and their
corrupted twins, for circuit discovery and for the metric tasks of :mod:`workbench.tasks.metric`
(registered as ``ioi``, ``ioi-toy``, ``colored-objects``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.errors import TaskBuildError

SLOT = re.compile(r"\{(\w+)\}")
ROLES = ("IO", "S1", "S2", "END")  # the positions every circuit task must provide


def _one_token(tokenizer: Any, word: str) -> int | None:
    """The id of ``" " + word`` when it is one token that decodes back to the word (so not the
    unknown token of a word-level vocabulary), else None."""
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        return None
    if tokenizer.decode(ids).strip() != word:
        return None
    return ids[0]


def template_indices(templates: Sequence[int] | None, n_templates: int) -> list[int]:
    """The template indices a task may draw from: all ``n_templates`` for None, else
    ``templates``, each an integer in ``[0, n_templates)`` and at least one (a
    :class:`TaskBuildError` otherwise)."""
    if templates is None:
        return list(range(n_templates))
    allowed = list(templates)
    bad = [
        t
        for t in allowed
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < n_templates
    ]
    if bad or not allowed:
        raise TaskBuildError(
            f"templates must be indices 0..{n_templates - 1} (at least one), got {allowed}"
        )
    return allowed


def single_token_words(tokenizer: Any, words: Sequence[str]) -> list[str]:
    """The words of ``words`` that the tokenizer encodes as one known token after a space."""
    return [w for w in words if _one_token(tokenizer, w) is not None]


def word_id(tokenizer: Any, word: str) -> int:
    """Token id of ``" " + word`` (the form it takes inside a sentence); the word must be one
    token."""
    tok_id = _one_token(tokenizer, word)
    if tok_id is None:
        raise TaskBuildError(f"{word!r} is not a single known token in this tokenizer")
    return tok_id


def render(
    tokenizer: Any, template: str, values: Mapping[str, str], track: Sequence[str]
) -> tuple[list[int], dict[str, int]]:
    """Fill ``template``'s ``{SLOT}``s with ``values`` and tokenize.

    Returns the token ids (with the tokenizer's special tokens, e.g. a BOS) and, for each slot
    in ``track``, the position of its single token; ``"END"`` is always added (the last token).
    Raises :class:`TaskBuildError` when a tracked value is not exactly one token in context.
    """
    text, spans, cursor = [], {}, 0
    for i, piece in enumerate(SLOT.split(template)):
        if i % 2 == 1:  # a slot name
            if piece not in values:
                raise TaskBuildError(f"template {template!r} has slot {{{piece}}} with no value")
            piece_text = values[piece]
            if piece in track:  # the word's own characters, without its leading space
                lead = len(piece_text) - len(piece_text.lstrip())
                spans[piece] = (cursor + lead, cursor + len(piece_text))
        else:
            piece_text = piece
        text.append(piece_text)
        cursor += len(piece_text)
    full = "".join(text)
    enc = tokenizer(full, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    positions = {}
    for slot, (start, end) in spans.items():
        hits = [i for i, (a, b) in enumerate(offsets) if a <= start < b or (a == b == start)]
        hits = [i for i in hits if offsets[i][1] > offsets[i][0]]
        if len(hits) != 1 or offsets[hits[0]][1] != end:
            raise TaskBuildError(
                f"{values[slot]!r} (slot {slot}) is not a single token in {full!r} "
                "for this tokenizer"
            )
        pos = hits[0]
        if ids[pos] != word_id(tokenizer, values[slot].strip()):
            raise TaskBuildError(
                f"{values[slot]!r} tokenizes differently inside {full!r} than after a space"
            )
        positions[slot] = pos
    positions["END"] = len(ids) - 1
    return ids, positions


@dataclass
class TaskDataset:
    """A batch of rendered prompts of one task with everything a circuit analysis reads.

    Attributes:
        task: the task's name (``"ioi"``, ``"colored-objects"``, ...).
        texts: the prompts as text.
        tokens: ``[batch, seq]`` token ids, right-padded with ``pad_id`` after each prompt's END.
        positions: role -> ``[batch]`` token positions (at least ``IO``, ``S1``, ``S2``, ``END``).
        answer_ids: ``[batch]`` id of the right answer (for IOI the indirect object).
        wrong_ids: ``[batch]`` id of the competing answer (for IOI the subject).
        groups: ``[batch]`` template index; prompts of one group share length and positions.
        meta: per prompt the values that filled the template (names, order, ...).
        seed: the seed it was drawn with.
    """

    task: str
    texts: list[str]
    tokens: torch.Tensor  # [batch, seq]
    positions: dict[str, torch.Tensor]  # role -> [batch]
    answer_ids: torch.Tensor  # [batch]
    wrong_ids: torch.Tensor  # [batch]
    groups: torch.Tensor  # [batch]
    meta: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 0
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def end(self) -> torch.Tensor:
        """``[batch]`` position of the final prompt token, where the answer is predicted."""
        return self.positions["END"]

    @property
    def max_end(self) -> int:
        """Longest prompt length minus one; forward passes may stop after it."""
        return int(self.end.max())

    def answer_logits(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [batch, seq, vocab]`` -> (right, competing) answer logits at END, ``[batch]``
        each."""
        rows = torch.arange(len(self), device=logits.device)
        at_end = logits[rows, self.end.to(logits.device)]  # [batch, vocab]
        right = at_end.gather(1, self.answer_ids.to(logits.device)[:, None])[:, 0]
        wrong = at_end.gather(1, self.wrong_ids.to(logits.device)[:, None])[:, 0]
        return right, wrong

    def logit_diff(self, logits: torch.Tensor) -> torch.Tensor:
        """``[batch]`` logit(answer) - logit(competitor) at END (the paper's metric)."""
        right, wrong = self.answer_logits(logits)
        return right - wrong

    def accuracy(self, logits: torch.Tensor) -> float:
        """Share of prompts whose answer logit beats the competitor's at END."""
        return float((self.logit_diff(logits) > 0).float().mean())

    def top1(self, logits: torch.Tensor) -> float:
        """Share of prompts whose answer is the model's top prediction at END."""
        rows = torch.arange(len(self), device=logits.device)
        pred = logits[rows, self.end.to(logits.device)].argmax(-1)
        return float((pred.cpu() == self.answer_ids).float().mean())

    def subset(self, index: Sequence[int] | torch.Tensor) -> TaskDataset:
        """The prompts at ``index`` (tokens trimmed to the longest kept prompt)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        positions = {k: v[idx] for k, v in self.positions.items()}
        width = int(positions["END"].max()) + 1
        return TaskDataset(
            task=self.task,
            texts=[self.texts[i] for i in idx.tolist()],
            tokens=self.tokens[idx, :width],
            positions=positions,
            answer_ids=self.answer_ids[idx],
            wrong_ids=self.wrong_ids[idx],
            groups=self.groups[idx],
            meta=[self.meta[i] for i in idx.tolist()],
            seed=self.seed,
            pad_id=self.pad_id,
        )

    def summary(self) -> dict[str, Any]:
        """Task, size, seed and the first prompt, for run files and logs."""
        return {
            "task": self.task,
            "n_prompts": len(self),
            "seed": self.seed,
            "example": self.texts[0] if self.texts else "",
        }


def collate(
    task: str,
    rows: Sequence[tuple[list[int], dict[str, int]]],
    texts: Sequence[str],
    answer_ids: Sequence[int],
    wrong_ids: Sequence[int],
    groups: Sequence[int],
    meta: Sequence[dict[str, Any]],
    seed: int,
    pad_id: int,
) -> TaskDataset:
    """Right-pad rendered rows into a :class:`TaskDataset`."""
    width = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, (ids, _) in enumerate(rows):
        tokens[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    roles = rows[0][1].keys()
    positions = {r: torch.tensor([pos[r] for _, pos in rows], dtype=torch.long) for r in roles}
    missing = set(ROLES) - set(positions)
    if missing:
        raise TaskBuildError(f"task {task!r} provides no position for roles {sorted(missing)}")
    return TaskDataset(
        task=task,
        texts=list(texts),
        tokens=tokens,
        positions=positions,
        answer_ids=torch.tensor(answer_ids, dtype=torch.long),
        wrong_ids=torch.tensor(wrong_ids, dtype=torch.long),
        groups=torch.tensor(groups, dtype=torch.long),
        meta=list(meta),
        seed=seed,
        pad_id=pad_id,
    )


def build_pair(
    task: Any, tokenizer: Any, n: int, seed: int = 0, templates: Sequence[int] | None = None
) -> tuple[TaskDataset, TaskDataset]:
    """``n`` clean prompts of a templated task (anything with ``build`` and ``corrupt``, e.g.
    :class:`~workbench.tasks.ioi.IOITask`) drawn with ``seed``, and their corrupted twins drawn
    with ``seed + 1``: ``(clean, corrupted)``. ``templates`` restricts the draw to those
    template indices.

    >>> clean, abc = build_pair(paper_task(), model.tokenizer, n=8)  # doctest: +SKIP
    >>> clean.positions["S2"], clean.answer_ids                      # doctest: +SKIP
    """
    clean = task.build(tokenizer, n, seed=seed, templates=templates)
    return clean, task.corrupt(clean, tokenizer, seed=seed + 1)


def pad_id_of(tokenizer: Any) -> int:
    """A token id to pad with (never read: padding comes after END in a causal model)."""
    for tok_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tok_id is not None:
            return int(tok_id)
    return 0
