"""Indirect object identification (IOI) prompts after Wang et al. 2022, "Interpretability in the
Wild: a Circuit for Indirect Object Identification in GPT-2 small" (arXiv:2211.00593; dataset code
redwoodresearch/Easy-Transformer ``ioi_dataset.py``, reused by ACDC ``acdc/ioi/ioi_dataset.py``).

A prompt names two people, then repeats one of them (the subject S) as the giver; a model that
solves the task continues with the other name, the indirect object IO::

    ABBA: "Then, Mary and John went to the store. John gave a drink to"   -> " Mary"
    BABA: "Then, John and Mary went to the store. John gave a drink to"   -> " Mary"

The roles a circuit analysis reads are the token positions ``IO``, ``S1`` (first mention of S),
``S1+1`` (the token after it), ``S2`` (the repeat) and ``END`` (the final token, " to"), and the
answer ids ``answer_ids`` = IO, ``wrong_ids`` = S. The metric is logit(IO) - logit(S) at END.

The *ABC* distribution (the paper's reference for mean ablation and the source of path patching)
keeps each prompt's template, place and object but draws three fresh, distinct names for IO, S1
and S2, so the sentence has the same shape and no repeated name: nothing in it says which name is
the indirect object.

Names, places and objects are filtered to single tokens of the given tokenizer (checked with a
leading space, then again in every rendered prompt), so the same generator serves GPT-2, Llama
tokenizers and the word-level toy tokenizers. ``toy_task()`` uses the vocabulary and templates the
``toy-ioi`` reference model was trained on (:mod:`workbench.tasks.toy`). The registry's ``ioi`` and
``ioi-toy`` tasks (:class:`workbench.tasks.metric.IOI`) draw from these two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workbench.errors import TaskBuildError
from workbench.tasks import toy
from workbench.tasks.templated import (
    TaskDataset,
    collate,
    pad_id_of,
    render,
    single_token_words,
    template_indices,
    word_id,
)

# The paper's 15 templates (Easy-Transformer BABA_TEMPLATES, written here in ABBA order; the BABA
# order swaps the first {IO} and {S1}); the final " {IO}" is the answer, so it is cut.
PAPER_TEMPLATES = (
    "Then, {IO} and {S1} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {IO} and {S1} had a lot of fun at the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {IO} and {S1} were working at the {PLACE}. {S2} decided to give a {OBJECT} to",
    "Then, {IO} and {S1} were thinking about going to the {PLACE}. {S2} wanted to give a {OBJECT} "
    "to",
    "Then, {IO} and {S1} had a long argument, and afterwards {S2} said to",
    "After {IO} and {S1} went to the {PLACE}, {S2} gave a {OBJECT} to",
    "When {IO} and {S1} got a {OBJECT} at the {PLACE}, {S2} decided to give it to",
    "When {IO} and {S1} got a {OBJECT} at the {PLACE}, {S2} decided to give the {OBJECT} to",
    "While {IO} and {S1} were working at the {PLACE}, {S2} gave a {OBJECT} to",
    "While {IO} and {S1} were commuting to the {PLACE}, {S2} gave a {OBJECT} to",
    "After the lunch, {IO} and {S1} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Afterwards, {IO} and {S1} went to the {PLACE}. {S2} gave a {OBJECT} to",
    "Then, {IO} and {S1} had a long argument. Afterwards {S2} said to",
    "The {PLACE} {IO} and {S1} went to had a {OBJECT}. {S2} gave it to",
    "Friends {IO} and {S1} found a {OBJECT} at the {PLACE}. {S2} gave it to",
)
PAPER_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
PAPER_OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
# Common English first names (the paper's list is of the same kind); filtered per tokenizer.
NAMES = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda",
    "Daniel", "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason",
    "Justin", "Sarah", "William", "Jonathan", "Stephanie", "Brian", "Elizabeth", "Melissa",
    "Nicole", "Kevin", "Eric", "Heather", "Amy", "Adam", "Rachel", "Megan", "Jeremy", "Kyle",
    "Laura", "Anna", "Mary", "Alice", "Bob", "Tom", "Emma", "Lucy", "Paul", "Kate", "Mark",
    "Rose", "Sam", "Peter", "Julia", "Oscar", "Clara", "Henry", "George", "Thomas", "Charles",
    "Richard", "Steven", "Susan", "Lisa", "Karen", "Nancy", "Betty", "Helen", "Sandra", "Linda",
    "Frank", "Scott", "Victoria", "Grace", "Jack", "Lily", "Max", "Ben", "Jane", "Mike", "Dan",
)  # fmt: skip
ORDERS = ("ABBA", "BABA")


def _baba(template: str) -> str:
    """Swap the first ``{IO}`` and ``{S1}`` of an ABBA template."""
    return template.replace("{IO}", "\0", 1).replace("{S1}", "{IO}", 1).replace("\0", "{S1}", 1)


@dataclass(frozen=True)
class IOITask:
    """The IOI task: templates (ABBA form), names, places and objects.

    ``build`` draws clean prompts, ``corrupt`` their ABC twins. Words that are not one token in
    the tokenizer are dropped before drawing (``usable_words`` says which were kept).
    """

    name: str = "ioi"
    templates: tuple[str, ...] = PAPER_TEMPLATES
    names: tuple[str, ...] = NAMES
    places: tuple[str, ...] = PAPER_PLACES
    objects: tuple[str, ...] = PAPER_OBJECTS
    orders: tuple[str, ...] = ORDERS
    description: str = field(
        default="indirect object identification (Wang et al. 2022): logit(IO) - logit(S) at END"
    )

    def usable_words(self, tokenizer: Any) -> dict[str, list[str]]:
        """Names, places and objects that are one token in ``tokenizer``."""
        words = {
            "names": single_token_words(tokenizer, self.names),
            "places": single_token_words(tokenizer, self.places),
            "objects": single_token_words(tokenizer, self.objects),
        }
        if len(words["names"]) < 5:
            raise TaskBuildError(
                f"only {len(words['names'])} of {len(self.names)} IOI names are single tokens in "
                "this tokenizer; the ABC corruption needs at least 5"
            )
        for kind in ("places", "objects"):
            if not words[kind]:
                raise TaskBuildError(f"none of the IOI {kind} is a single token in this tokenizer")
        return words

    def build(
        self, tokenizer: Any, n: int, seed: int = 0, templates: Sequence[int] | None = None
    ) -> TaskDataset:
        """``n`` clean prompts drawn with ``seed``; orders alternate ABBA, BABA, ...

        ``templates`` restricts the draw to those template indices (fewer templates give larger
        groups for the per-template mean ablation at small ``n``).
        """
        if n < 1:
            raise TaskBuildError("an IOI dataset needs at least one prompt")
        words = self.usable_words(tokenizer)
        rng = np.random.default_rng(seed)
        allowed = template_indices(templates, len(self.templates))
        draws = []
        for i in range(n):
            t = int(rng.choice(allowed))
            io, s = (str(x) for x in rng.choice(words["names"], size=2, replace=False))
            draws.append(
                {
                    "template": t,
                    "order": self.orders[i % len(self.orders)],
                    "IO": io,
                    "S": s,
                    "PLACE": str(rng.choice(words["places"])),
                    "OBJECT": str(rng.choice(words["objects"])),
                }
            )
        return self._render(tokenizer, draws, seed)

    def corrupt(self, clean: TaskDataset, tokenizer: Any, seed: int = 1) -> TaskDataset:
        """The ABC twin of ``clean``: same templates, places, objects and orders, with three fresh
        distinct names (none of them the clean IO or S) for IO, S1 and S2. The answer ids stay the
        clean ones, so the metric on the twin measures what is left of the clean answer."""
        words = self.usable_words(tokenizer)
        rng = np.random.default_rng(seed)
        draws = []
        for m in clean.meta:
            pool = [w for w in words["names"] if w not in (m["IO"], m["S"])]
            a, b, c = (str(x) for x in rng.choice(pool, size=3, replace=False))
            draws.append({**m, "IO": a, "S": b, "S2": c, "answer": m["IO"], "wrong": m["S"]})
        corrupted = self._render(tokenizer, draws, seed)
        if corrupted.tokens.shape != clean.tokens.shape or any(
            not bool((corrupted.positions[r] == clean.positions[r]).all()) for r in clean.positions
        ):
            raise TaskBuildError("the ABC prompts do not line up with the clean prompts")
        return corrupted

    def _render(self, tokenizer: Any, draws: list[dict[str, Any]], seed: int) -> TaskDataset:
        rows, texts, answers, wrongs = [], [], [], []
        for d in draws:
            template = self.templates[d["template"]]
            if d["order"] == "BABA":
                template = _baba(template)
            values = {
                "IO": " " + d["IO"],
                "S1": " " + d["S"],
                "S2": " " + d.get("S2", d["S"]),
                "PLACE": " " + d["PLACE"],
                "OBJECT": " " + d["OBJECT"],
            }
            spaced = _space_slots(template)
            ids, pos = render(tokenizer, spaced, values, track=("IO", "S1", "S2"))
            pos["S1+1"] = pos["S1"] + 1
            rows.append((ids, pos))
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
            answers.append(word_id(tokenizer, d.get("answer", d["IO"])))
            wrongs.append(word_id(tokenizer, d.get("wrong", d["S"])))
        return collate(
            self.name,
            rows,
            texts,
            answers,
            wrongs,
            [d["template"] for d in draws],
            draws,
            seed,
            pad_id_of(tokenizer),
        )


def _space_slots(template: str) -> str:
    """Remove the space before each slot (the slot's value carries its own leading space, so the
    token boundary matches the tokenizer's word tokens)."""
    return template.replace(" {", "{")


def paper_task() -> IOITask:
    """IOI with the paper's templates, places and objects."""
    return IOITask()


def toy_task() -> IOITask:
    """IOI in the closed vocabulary and templates the ``toy-ioi`` reference model was trained on
    (:mod:`workbench.tasks.toy`: words separated by spaces, punctuation as its own word)."""
    templates = []
    for t in toy.IOI_TEMPLATES:
        words = t.split()
        first_a, first_b = words.index("A"), words.index("B")
        second_b = len(words) - 1 - words[::-1].index("B")
        slot = {first_a: "{IO}", first_b: "{S1}", second_b: "{S2}"}
        words = [slot.get(i, w) for i, w in enumerate(words)]
        words = ["{PLACE}" if w == "PLACE" else "{OBJECT}" if w == "OBJECT" else w for w in words]
        templates.append(" ".join(words))
    return IOITask(
        name="ioi-toy",
        templates=tuple(templates),
        names=tuple(toy.NAMES),
        places=tuple(toy.PLACES),
        objects=tuple(toy.OBJECTS),
    )
