"""Reference models with known attention mechanisms, trained by the project's own code.

Three small Llama (RoPE) models, each trained on a task whose solution needs a specific head:

- ``toy-bb``: Bigram-Backcopy (Guo et al. 2024): an active-dormant copy head and the
  extreme-token phenomena at <bos>;
- ``toy-recall``: in-context associative recall: previous-token and induction/retrieval heads;
- ``toy-ioi``: indirect object identification (Wang et al. 2022 templates): heads that move the
  indirect object's name to the final token.

``train_toy(name)`` (or ``workbench train-toy NAME``) reproduces a shipped checkpoint under
``data/models/<name>`` from its seed; ``python -m workbench.toys.cards NAME`` measures it and
writes ``CARD.md`` and ``heads.json`` (the ground-truth heads, each confirmed causally).
"""

from workbench.toys.train import SPECS, TOY_NAMES, ToySpec, train_toy

__all__ = ["SPECS", "TOY_NAMES", "ToySpec", "train_toy"]
