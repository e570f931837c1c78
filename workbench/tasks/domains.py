"""Token-level inputs for probes that compare input domains or need synthetic sequences.

* :func:`domain_token_ids` cuts a shipped corpus (``"prose"`` or ``"code"``, see
  :mod:`workbench.tasks.corpus`) into consecutive prompts of exactly ``n_tokens`` tokens, or
  generates the ``"synthetic"`` domain: seeded random tokens in a short period repeated to the
  length (a repetitive input on which many heads have nothing to do).
* :func:`domain_inputs` also accepts a prompt file (``.jsonl``/``.txt``, see
  :mod:`workbench.tasks.prompts`) as a domain, named by its stem, e.g. a toy task's sequences.
* :func:`repeated_random_tokens` makes TransformerLens-style induction inputs: ``n`` random
  tokens repeated twice.

Every prompt carries the model's own special tokens where its tokenizer puts them (``<bos>`` in
front for Llama, ``[CLS] ... [SEP]`` for BERT), so the first-token sink is where it is in use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workbench.errors import PromptSetError
from workbench.tasks.corpus import corpus
from workbench.tasks.prompts import load_prompts

DOMAINS = ("prose", "code", "synthetic")


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a text (e.g. ``([bos], [])``)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def content_vocabulary(tokenizer) -> np.ndarray:
    """Token ids that are not special tokens, ``[n]`` int64."""
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int64)


def domain_token_ids(
    tokenizer, domain: str, *, n_prompts: int, n_tokens: int, seed: int = 0
) -> list[np.ndarray]:
    """``n_prompts`` prompts of ``n_tokens`` tokens each (special tokens included), ``[seq]``.

    ``prose``/``code`` are consecutive, non-overlapping cuts of the shipped corpus from its start
    (deterministic); ``synthetic`` repeats a random block of 2-8 content tokens (seeded).
    """
    prefix, suffix = special_tokens(tokenizer)
    body = n_tokens - len(prefix) - len(suffix)
    if body < 2:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for content tokens")
    if domain == "synthetic":
        rng = np.random.default_rng(seed)
        vocab = content_vocabulary(tokenizer)
        bodies = []
        for _ in range(n_prompts):
            block = rng.choice(vocab, size=int(rng.integers(2, 9)), replace=False)
            bodies.append(np.resize(block, body))
    elif domain in ("prose", "code"):
        ids = np.asarray(tokenizer(corpus(domain), add_special_tokens=False)["input_ids"])
        if len(ids) < n_prompts * body:
            raise ValueError(
                f"the {domain} corpus has {len(ids)} tokens, fewer than {n_prompts} x {body}"
            )
        bodies = [ids[i * body : (i + 1) * body] for i in range(n_prompts)]
    else:
        raise ValueError(f"unknown domain {domain!r} (known: {', '.join(DOMAINS)})")
    return [np.concatenate([prefix, b, suffix]).astype(np.int64) for b in bodies]


def domain_inputs(
    tokenizer, spec: str, *, n_prompts: int, n_tokens: int, seed: int = 0
) -> tuple[str, list[np.ndarray]]:
    """``(name, prompts)`` for a built-in domain (:data:`DOMAINS`, via :func:`domain_token_ids`)
    or a prompt file, whose first ``n_prompts`` texts are tokenized with special tokens and cut
    to at most ``n_tokens`` tokens.

    Raises:
        PromptSetError: ``spec`` is neither a domain nor a readable prompt file.
    """
    if spec in DOMAINS:
        ids = domain_token_ids(tokenizer, spec, n_prompts=n_prompts, n_tokens=n_tokens, seed=seed)
        return spec, ids
    if not Path(spec).is_file():
        raise PromptSetError(f"domain {spec!r} is neither one of {', '.join(DOMAINS)} nor a file")
    prompts = load_prompts(spec)
    ids = [
        np.asarray(tokenizer(text)["input_ids"][:n_tokens], dtype=np.int64)
        for text in prompts.texts[:n_prompts]
    ]
    return prompts.name, ids


def repeated_random_tokens(
    tokenizer, *, n_prompts: int, n_tokens: int, seed: int = 0
) -> list[np.ndarray]:
    """Induction inputs as TransformerLens makes them: ``n_tokens`` random content tokens
    repeated twice, behind the tokenizer's prefix special tokens, ``[prefix + 2 * n_tokens]``."""
    prefix, _ = special_tokens(tokenizer)
    rng = np.random.default_rng(seed)
    vocab = content_vocabulary(tokenizer)
    out = []
    for _ in range(n_prompts):
        block = rng.choice(vocab, size=n_tokens, replace=len(vocab) < n_tokens)
        out.append(np.concatenate([prefix, block, block]).astype(np.int64))
    return out
