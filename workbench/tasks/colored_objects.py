"""A Colored-Objects-style task (after BIG-bench ``reasoning_about_colored_objects`` as used by
Merullo et al. 2023, "Circuit Component Reuse Across Tasks in Transformer Language Models",
arXiv:2310.08744), in the same form as IOI so the circuit pipeline runs on it unchanged::

    "On the table, I see a red pen, a blue cup and a green ball. What color is the cup? It is"
                                  ^^^^ IO   ^^^ S1                            ^^^ S2        END
    -> " blue" (answer), " red" (the competing colour of another object)

The roles mirror IOI's: the answer's source (the queried object's colour, ``IO``), a token that
appears twice (the queried object: ``S1`` in the list, ``S2`` in the question) and ``END``. The
corrupted twin keeps objects, template and question and draws three fresh colours (none equal
to the clean answer or competitor), so nothing in it points to the clean answer.

Colours and objects are filtered to single tokens of the tokenizer (checked, as for IOI).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.errors import TaskBuildError
from workbench.tasks.templated import (
    TaskDataset,
    collate,
    pad_id_of,
    render,
    single_token_words,
    template_indices,
    word_id,
)

TEMPLATES = (
    "On the table, I see a{C1}{O1}, a{C2}{O2} and a{C3}{O3}. What color is the{Q}? It is",
    "On the desk, there is a{C1}{O1}, a{C2}{O2} and a{C3}{O3}. The color of the{Q} is",
    "I have a{C1}{O1}, a{C2}{O2} and a{C3}{O3}. The{Q} is",
)
COLORS = (
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "brown",
    "pink",
    "grey",
    "gold",
)
OBJECTS = (
    "pen",
    "cup",
    "ball",
    "book",
    "phone",
    "key",
    "hat",
    "shoe",
    "plate",
    "box",
    "lamp",
    "chair",
    "bag",
    "clock",
    "spoon",
    "bottle",
)


@dataclass(frozen=True)
class ColoredObjectsTask:
    """Three coloured objects, then a question about one of them; metric logit(its colour) -
    logit(another listed colour) at END."""

    name: str = "colored-objects"
    templates: tuple[str, ...] = TEMPLATES
    colors: tuple[str, ...] = COLORS
    objects: tuple[str, ...] = OBJECTS
    description: str = "colour of the queried object (Merullo et al. 2023 style)"

    def usable_words(self, tokenizer: Any) -> dict[str, list[str]]:
        words = {
            "colors": single_token_words(tokenizer, self.colors),
            "objects": single_token_words(tokenizer, self.objects),
        }
        if len(words["colors"]) < 6 or len(words["objects"]) < 3:
            raise TaskBuildError(
                "colored objects needs at least 6 single-token colours and 3 single-token objects "
                f"in this tokenizer (has {len(words['colors'])} and {len(words['objects'])})"
            )
        return words

    def build(
        self, tokenizer: Any, n: int, seed: int = 0, templates: Sequence[int] | None = None
    ) -> TaskDataset:
        if n < 1:
            raise TaskBuildError("a colored-objects dataset needs at least one prompt")
        words = self.usable_words(tokenizer)
        rng = np.random.default_rng(seed)
        allowed = template_indices(templates, len(self.templates))
        draws = []
        for _ in range(n):
            colors = [str(c) for c in rng.choice(words["colors"], size=3, replace=False)]
            objects = [str(o) for o in rng.choice(words["objects"], size=3, replace=False)]
            asked = int(rng.integers(3))
            other = int(rng.choice([i for i in range(3) if i != asked]))
            draws.append(
                {
                    "template": int(rng.choice(allowed)),
                    "colors": colors,
                    "objects": objects,
                    "asked": asked,
                    "other": other,
                    "answer": colors[asked],
                    "wrong": colors[other],
                }
            )
        return self._render(tokenizer, draws, seed)

    def corrupt(self, clean: TaskDataset, tokenizer: Any, seed: int = 1) -> TaskDataset:
        """Same objects and question, three fresh colours; the answer ids stay the clean ones."""
        words = self.usable_words(tokenizer)
        rng = np.random.default_rng(seed)
        draws = []
        for m in clean.meta:
            pool = [c for c in words["colors"] if c not in (m["answer"], m["wrong"])]
            colors = [str(c) for c in rng.choice(pool, size=3, replace=False)]
            draws.append({**m, "colors": colors})
        corrupted = self._render(tokenizer, draws, seed)
        if corrupted.tokens.shape != clean.tokens.shape:
            raise TaskBuildError("the corrupted prompts do not line up with the clean prompts")
        return corrupted

    def _render(self, tokenizer: Any, draws: list[dict[str, Any]], seed: int) -> TaskDataset:
        rows, texts = [], []
        for d in draws:
            values = {f"C{i + 1}": " " + c for i, c in enumerate(d["colors"])}
            values |= {f"O{i + 1}": " " + o for i, o in enumerate(d["objects"])}
            values["Q"] = " " + d["objects"][d["asked"]]
            asked = d["asked"] + 1
            ids, pos = render(
                tokenizer,
                self.templates[d["template"]],
                values,
                track=(f"C{asked}", f"O{asked}", "Q"),
            )
            roles = {
                "IO": pos[f"C{asked}"],
                "S1": pos[f"O{asked}"],
                "S2": pos["Q"],
                "END": pos["END"],
            }
            roles["S1+1"] = roles["S1"] + 1
            rows.append((ids, roles))
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
        return collate(
            self.name,
            rows,
            texts,
            [word_id(tokenizer, d["answer"]) for d in draws],
            [word_id(tokenizer, d["wrong"]) for d in draws],
            [d["template"] for d in draws],
            draws,
            seed,
            pad_id_of(tokenizer),
        )
