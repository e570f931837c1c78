"""Needle-in-a-haystack trials, built in a model's token space (Wu et al. 2024, "Retrieval Head
Mechanistically Explains Long-Context Factuality", repo nightdessert/Retrieval_Head).

A trial is a haystack of natural prose with one *needle* sentence inserted at a *depth* (a
fraction of the haystack, moved back to a sentence boundary), followed by the question and
``Answer:``::

    <haystack[:i]> <needle> <haystack[i:]>
    Based on the content of the book, Question: <question>
    Answer:

as in the reference's ``evaluate_and_log`` (which appends the question to the context without a
line break; here a newline separates them, since the haystack is cut mid-sentence at the target
length). Each needle carries its *answer*, the part of the sentence the model should copy (the
reference's ``real_needle``). The retrieval score is defined on the answer's token span, so the
prompt is assembled from separately tokenized pieces (haystack slices, needle prefix, answer,
needle suffix, question) and the spans are known exactly; the reference instead searches the
prompt for a window whose token set overlaps the answer's by > 90 %.

The haystack is the shipped prose corpus (``data/corpus/prose.txt``), tokenized once per
tokenizer and cycled when a length needs more; a trial's seed picks where in the corpus its
haystack starts. The insertion point follows the reference's ``insert_needle``: ``int(n * depth)``
haystack tokens, moved back until the token before it ends a sentence; depth 1 appends the needle
after the whole haystack.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from workbench.tasks.corpus import corpus
from workbench.tasks.toy import BOS_ID, AssociativeRecall

QUESTION_TEMPLATE = "\nBased on the content of the book, Question: {question}\nAnswer:"


@dataclass(frozen=True)
class NeedleFact:
    """The fact a needle states: the sentence ``prefix + answer + suffix`` and the question whose
    answer is ``answer`` (the metric task over needle trials is
    :class:`workbench.tasks.metric.Needle`).

    ``answer`` starts with a space so that it tokenizes the same inside the needle and after
    ``Answer:``.
    """

    prefix: str
    answer: str
    suffix: str
    question: str

    @property
    def sentence(self) -> str:
        return self.prefix + self.answer + self.suffix


# Two of the reference's three needles (haystack_for_detect/needles.jsonl; the WMO one, whose
# answer SmolLM2-135M never reproduces, is left out) and a short synthetic fact a 135M model does
# retrieve. Ordered by how reliably SmolLM2-135M retrieves them (it answers the Mr Green question
# with "The answer is:"), so "the first n needles" picks the useful ones.
NEEDLES: list[NeedleFact] = [
    NeedleFact(
        " The best thing to do in Beijing is to",
        " take a walk in Chaoyang Park and have a cup of Espresso in the evening",
        ".",
        "What is the best thing to do in Beijing?",
    ),
    NeedleFact(
        " The special magic number mentioned in this book is",
        " 7481",
        ".",
        "What is the special magic number mentioned in this book?",
    ),
    NeedleFact(
        " Mr Green is disliked by everyone",
        " because he is a mean person and also he can't ride a horse or drive a car",
        ".",
        "Why does everyone dislike Mr Green?",
    ),
]


@dataclass
class NeedleTrial:
    """One needle-in-a-haystack prompt in token space.

    ``token_ids[needle_span[0]:needle_span[1]]`` is the needle sentence and
    ``token_ids[answer_span[0]:answer_span[1]] == answer_ids`` the answer inside it (the span the
    retrieval score is defined on). The prompt ends with ``Answer:``; ``answer_ids`` are what a
    model that retrieves the needle generates next.
    """

    token_ids: np.ndarray  # [length] int64
    needle_span: tuple[int, int]  # [start, end) of the needle sentence
    answer_span: tuple[int, int]  # [start, end) of the answer inside the needle
    answer_ids: np.ndarray  # [n_answer] int64
    answer: str  # the answer text (reference for the ROUGE filter)
    question: str
    length: int  # target length in tokens (the prompt's actual length is len(token_ids))
    depth: float  # requested depth in [0, 1]
    needle_index: int  # index into the needle list
    seed: int
    # where the question after the haystack begins (``token_ids[question_start:]``); None: not
    # recorded. A serving client prefills the context before it and then reads the question.
    question_start: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def depth_actual(self) -> float:
        """Where the needle starts, as a fraction of the prompt."""
        return self.needle_span[0] / len(self.token_ids)


class _Haystack:
    """The prose corpus in one tokenizer's ids, with a sentence-end flag per token."""

    def __init__(self, tokenizer: Any) -> None:
        text = corpus("prose")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.ids = np.asarray(ids, dtype=np.int64)  # [n_corpus]
        pieces = tokenizer.convert_ids_to_tokens(list(dict.fromkeys(ids)))
        decoded = {
            i: tokenizer.convert_tokens_to_string([p])
            for i, p in zip(dict.fromkeys(ids), pieces, strict=True)
        }
        ends = {i for i, s in decoded.items() if s.rstrip().endswith((".", "!", "?"))}
        self.sentence_end = np.isin(self.ids, list(ends))  # [n_corpus] bool
        # paragraph starts: the first token after a blank line, where haystacks may begin
        breaks = {i for i, s in decoded.items() if "\n\n" in s}
        self.starts = np.flatnonzero(np.isin(self.ids, list(breaks))) + 1

    def take(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` ids from ``start`` on, cycling through the corpus; and their sentence-end flags."""
        index = (start + np.arange(n)) % len(self.ids)
        return self.ids[index], self.sentence_end[index]


@lru_cache(maxsize=4)
def _haystack(tokenizer: Any) -> _Haystack:
    return _Haystack(tokenizer)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_trial(
    tokenizer: Any,
    length: int,
    depth: float,
    needle: NeedleFact | int = 0,
    seed: int = 0,
) -> NeedleTrial:
    """One trial of ``length`` tokens (exactly, special tokens included) with ``needle`` (a
    :class:`NeedleFact` or an index into :data:`NEEDLES`) at ``depth`` in [0, 1] of the haystack."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    index = needle if isinstance(needle, int) else -1
    needle = NEEDLES[needle] if isinstance(needle, int) else needle
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    prefix, answer, suffix = (
        _encode(tokenizer, t) for t in (needle.prefix, needle.answer, needle.suffix)
    )
    tail = _encode(tokenizer, QUESTION_TEMPLATE.format(question=needle.question))
    n_hay = length - len(bos) - len(prefix) - len(answer) - len(suffix) - len(tail)
    if n_hay < 0:
        raise ValueError(f"length {length} is shorter than the needle and question")

    hay = _haystack(tokenizer)
    rng = np.random.default_rng(seed)
    start = int(rng.choice(hay.starts)) if len(hay.starts) else 0
    ids, ends = hay.take(start, n_hay)
    cut = n_hay if depth == 1.0 else int(n_hay * depth)
    while cut > 0 and not ends[cut - 1]:  # back to a sentence boundary, as the reference does
        cut -= 1

    parts = [bos, ids[:cut].tolist(), prefix, answer, suffix, ids[cut:].tolist(), tail]
    token_ids = np.asarray(list(itertools.chain.from_iterable(parts)), dtype=np.int64)
    s = len(bos) + cut
    a = s + len(prefix)
    return NeedleTrial(
        token_ids=token_ids,
        needle_span=(s, a + len(answer) + len(suffix)),
        answer_span=(a, a + len(answer)),
        answer_ids=np.asarray(answer, dtype=np.int64),
        answer=needle.answer.strip(),
        question=needle.question,
        length=length,
        depth=float(depth),
        needle_index=index,
        seed=seed,
        question_start=len(token_ids) - len(tail),
    )


def needle_grid(
    tokenizer: Any,
    lengths: list[int],
    depths: list[float],
    needles: list[NeedleFact] | int | None = None,
    seed: int = 0,
) -> list[NeedleTrial]:
    """Trials over lengths × depths × needles (``needles``: a list, the first n of
    :data:`NEEDLES`, or all of them). Trial k uses seed ``seed + k``, so the grid is
    deterministic and each trial's haystack starts at its own place in the corpus."""
    if needles is None:
        needles = NEEDLES
    elif isinstance(needles, int):
        needles = NEEDLES[:needles]
    chosen = [NEEDLES.index(n) if n in NEEDLES else n for n in needles]
    grid = itertools.product(lengths, depths, chosen)
    return [
        make_trial(tokenizer, int(length), float(depth), needle, seed + k)
        for k, (length, depth, needle) in enumerate(grid)
    ]


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token in front of a plain encoding."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def toy_recall_grid(
    lengths: list[int], depths: list[float], n_per_cell: int = 4, seed: int = 0
) -> list[NeedleTrial]:
    """Needle trials in the closed vocabulary of the ``toy-recall`` reference model
    (:class:`workbench.tasks.toy.AssociativeRecall`), for validating the probe on known heads.

    A trial is ``<bos>`` + a stream of filler words holding distractor ``key value`` pairs (each
    written twice, as in training) and the needle pair ``k v`` written once at ``depth``, then the
    query ``<q> k``; the answer is ``v``. The needle is the pair, the answer span its value. Pairs
    sit on the aligned 2-slots the model was trained on, and the needle's key and value appear
    nowhere else, so a head whose top key holds ``v`` can only be looking at the needle.
    ``length`` counts every prompt token and must fit the model (the task's ``seq_len``).
    """
    task = AssociativeRecall()
    trials = []
    grid = itertools.product(lengths, depths, range(n_per_cell))
    for k, (length, depth, _) in enumerate(grid):
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {depth}")
        n_stream = int(length) - 3  # <bos> ... <q> k
        n_slots = n_stream // 2
        if n_slots < 1 or length > task.seq_len:
            raise ValueError(
                f"toy-recall trials take lengths 5..{task.seq_len} (the model's), got {length}"
            )
        rng = np.random.default_rng(seed + k)
        keys = [str(w) for w in rng.choice(task.keys, size=task.n_pairs, replace=False)]
        values = [str(w) for w in rng.choice(task.values, size=task.n_pairs, replace=False)]
        needle_slot = round(depth * (n_slots - 1))
        free = [s for s in range(n_slots) if s != needle_slot]
        n_distract = min(task.n_pairs - 1, len(free) // task.repeats)
        slots = rng.choice(free, size=n_distract * task.repeats, replace=False)
        fillers = [w for w in task.fillers if w not in values]  # values may be filler words
        words = [str(w) for w in rng.choice(fillers, size=n_stream)]
        pairs = np.repeat(np.arange(1, n_distract + 1), task.repeats)
        for slot, pair in zip(slots, pairs, strict=True):
            words[2 * slot : 2 * slot + 2] = [keys[pair], values[pair]]
        words[2 * needle_slot : 2 * needle_slot + 2] = [keys[0], values[0]]
        token_ids = np.asarray([BOS_ID, *task.ids(*words, "<q>", keys[0])], dtype=np.int64)
        start = 1 + 2 * needle_slot
        trials.append(
            NeedleTrial(
                token_ids=token_ids,
                needle_span=(start, start + 2),
                answer_span=(start + 1, start + 2),
                answer_ids=np.asarray(task.ids(values[0]), dtype=np.int64),
                answer=values[0],
                question=f"<q> {keys[0]}",
                length=int(length),
                depth=float(depth),
                needle_index=-1,
                seed=seed + k,
                question_start=len(token_ids) - 2,  # <q> k
            )
        )
    return trials


def rouge1_recall(reference: str, response: str) -> float:
    """Share of the reference's words (with multiplicity) found in the response: ROUGE-1 recall
    over lowercase alphanumeric words."""
    ref, got = (re.findall(r"[a-z0-9]+", s.lower()) for s in (reference, response))
    if not ref:
        return 0.0
    counts: dict[str, int] = {}
    for w in got:
        counts[w] = counts.get(w, 0) + 1
    hits = 0
    for w in ref:
        if counts.get(w, 0) > 0:
            counts[w] -= 1
            hits += 1
    return hits / len(ref)
