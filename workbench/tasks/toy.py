"""Seeded generators for the three toy tasks whose attention mechanisms are known by construction.

Each task owns a closed word vocabulary (its tokenizer: `workbench/toys/vocab.py`) and a
`sample(n, seed)` that returns a `ToyBatch`: token ids plus, per position, the next-token label used
for training, whether the position is scored by the task metric, and the *source* key position that
the mechanism must read to answer. The source is what makes the ground truth checkable: a head that
solves the task has to move information from exactly that position to the scored one. Each task is
registered under its model's name as a `toy` task: `get_task("toy-bb")` in `workbench.tasks`.

- **Bigram-Backcopy** (`toy-bb`, Guo et al. 2024, "Active-Dormant Attention Heads"): tokens follow
  a fixed bigram table, except that after one of the k most frequent tokens (the triggers) the
  next token copies the token *before* the trigger. Predicting a copy needs attention from the
  trigger to its previous position; every other prediction needs no attention at all, which is
  where the dormant head parks its attention on <bos>.
- **Associative recall** (`toy-recall`): runs of filler words with key→value pairs embedded (each
  pair written more than once) at random places, then queries `<q> key`; the answer is the value
  stored after that key. A value is found only by matching the query key against "the token
  before me was key" at the stored value, so a previous-token head must write that fact and an
  induction/retrieval head must read it (Olsson et al. 2022, "In-context learning and induction
  heads").
- **Indirect object identification** (`toy-ioi`, templates after Wang et al. 2022): sentences like
  "When A and B went to the store , B gave a drink to" → A, in ABBA and BABA orders with random
  names, mixed with generic filler sentences. Names are drawn per sentence, so the answer can only
  come from the context: a head must attend from the final token to the indirect object.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from workbench.tasks.registry import register

BOS = "<bos>"
PAD = "<pad>"
UNK = "<unk>"
SPECIALS = (BOS, PAD, UNK)  # ids 0, 1, 2 in every toy vocabulary
IGNORE = -100  # label for positions without a loss term (the torch cross-entropy convention)
N_SPECIAL = len(SPECIALS)
BOS_ID = SPECIALS.index(BOS)


@dataclass
class ToyBatch:
    """A batch of task sequences; every tensor is [batch, seq]."""

    input_ids: torch.Tensor  # [batch, seq] token ids, position 0 is <bos>
    labels: torch.Tensor  # [batch, seq] next token to predict at each position, IGNORE = no loss
    eval_mask: torch.Tensor  # [batch, seq] bool: positions scored by the task metric
    source: torch.Tensor  # [batch, seq] key position the mechanism must read (-1 off eval_mask)
    wrong: torch.Tensor  # [batch, seq] the competing answer for a logit difference (-1 = none)


def _to_batch(rows: list[dict[str, list[int]]], loss_on_all: bool) -> ToyBatch:
    ids = torch.tensor([r["ids"] for r in rows], dtype=torch.long)
    eval_mask = torch.zeros_like(ids, dtype=torch.bool)
    source = torch.full_like(ids, -1)
    wrong = torch.full_like(ids, -1)
    targets = torch.full_like(ids, IGNORE)
    for b, r in enumerate(rows):
        for pos, src, bad in zip(r["eval"], r["source"], r["wrong"], strict=True):
            eval_mask[b, pos] = True
            source[b, pos] = src
            wrong[b, pos] = bad
            targets[b, pos] = ids[b, pos + 1]
        for pos in r.get("train", []):
            targets[b, pos] = ids[b, pos + 1]
    if loss_on_all:
        targets = torch.full_like(ids, IGNORE)
        targets[:, :-1] = ids[:, 1:]
    return ToyBatch(ids, targets, eval_mask, source, wrong)


class ToyTask(ABC):
    """A task: its vocabulary, sequence length and seeded sampler."""

    name: str
    seq_len: int
    words: list[str]
    loss_on_all: bool  # train on every next token, or only on the scored positions

    @abstractmethod
    def sample(self, n: int, seed: int) -> ToyBatch:
        """`n` fresh sequences from the generator seeded with `seed`."""

    def ids(self, *words: str) -> list[int]:
        """Token ids of vocabulary words."""
        return [N_SPECIAL + self.words.index(w) for w in words]


class RowTask(ToyTask):
    """A task whose sequences are built one at a time by `_row`."""

    def sample(self, n: int, seed: int) -> ToyBatch:
        rng = np.random.default_rng(seed)
        return _to_batch([self._row(rng) for _ in range(n)], self.loss_on_all)

    @abstractmethod
    def _row(self, rng: np.random.Generator) -> dict[str, list[int]]:
        """One sequence: ids, scored positions ("eval") with their "source" and "wrong" answer,
        and optionally extra loss positions ("train")."""


@register("toy-bb", "toy")
class BigramBackcopy(ToyTask):
    """Bigram-Backcopy: bigram transitions, except that the token after a trigger copies the token
    before the trigger. Loss on every token, as in the paper (the bigram part is what the dormant
    head has nothing to contribute to)."""

    name = "toy-bb"
    loss_on_all = True

    def __init__(
        self, n_tokens: int = 64, n_triggers: int = 3, seq_len: int = 64, table_seed: int = 0
    ) -> None:
        self.seq_len = seq_len
        self.words = [f"t{i}" for i in range(n_tokens)]
        rng = np.random.default_rng(table_seed)
        # Sparse Dirichlet rows give a peaked, learnable bigram table with an uneven stationary
        # distribution, so "the k most frequent tokens" is a clear choice.
        table = rng.dirichlet(np.full(n_tokens, 0.15), size=n_tokens)
        evals, evecs = np.linalg.eig(table.T)
        stationary = np.abs(np.real(evecs[:, np.argmax(np.real(evals))]))
        self.stationary = stationary / stationary.sum()
        self.table = table
        self.triggers = sorted(np.argsort(-self.stationary)[:n_triggers].tolist())
        self.non_triggers = [t for t in range(n_tokens) if t not in self.triggers]

    def sample(self, n: int, seed: int) -> ToyBatch:
        # Vectorised over the batch: one inverse-CDF draw per position instead of rng.choice.
        rng = np.random.default_rng(seed)
        cdf = np.cumsum(self.table, axis=1)
        cdf[:, -1] = 1.0
        is_trigger = np.zeros(len(self.words), dtype=bool)
        is_trigger[self.triggers] = True
        # Token 1 is a non-trigger so every trigger has a real token before it to copy.
        toks = np.empty((n, self.seq_len - 1), dtype=np.int64)
        toks[:, 0] = rng.choice(self.non_triggers, size=n)
        for i in range(1, self.seq_len - 1):
            prev = toks[:, i - 1]
            drawn = (rng.random(n)[:, None] > cdf[prev]).sum(axis=1)
            copy = toks[:, i - 2] if i >= 2 else drawn
            toks[:, i] = np.where(is_trigger[prev] & (i >= 2), copy, drawn)
        rows = []
        for row in toks:
            # Position p (with <bos> at 0) holds row[p - 1]; a trigger at p >= 2 is scored.
            evals = [p for p in range(2, self.seq_len - 1) if is_trigger[row[p - 1]]]
            rows.append(
                {
                    "ids": [BOS_ID, *(N_SPECIAL + row).tolist()],
                    "eval": evals,
                    "source": [p - 1 for p in evals],
                    "wrong": [-1] * len(evals),
                }
            )
        return _to_batch(rows, self.loss_on_all)

    def bigram_losses(self) -> dict[str, float]:
        """Reference losses (nats/token) for the training test: the unigram entropy, and the loss of
        a model that knows the bigram table but never copies (its ceiling without attention)."""
        p = self.stationary
        unigram = float(-(p * np.log(p)).sum())
        row_entropy = -(self.table * np.log(self.table + 1e-30)).sum(axis=1)
        return {"unigram": unigram, "bigram_only": float((p * row_entropy).sum())}


@register("toy-recall", "toy")
class AssociativeRecall(RowTask):
    """In-context associative recall: each sequence binds `n_pairs` keys to random values and
    writes every pair `key value` `repeats` times, shuffled with `n_runs` filler runs
    `a b σ(a) σ(b) σ²(a) ...` (σ a fixed permutation of the filler words); then `n_queries`
    queries `<q> key value` follow. The loss covers every value whose key was bound earlier in the
    sequence (repeats and queries) and the predictable filler tokens; the metric only the query
    answers.

    Recall needs two heads in series: a previous-token head that writes "the token before me was
    key" at each stored value, and a retrieval (induction) head that matches the query key against
    it (Olsson et al. 2022). Neither helps on its own, so from scratch a small model sits on a long
    plateau. The filler runs give the previous-token head its own direct signal (the next filler
    token is σ of the one before the current token), and repeats give many recall examples per
    sequence; queries draw distinct keys from more pairs than there are queries, so "a stored value
    not yet answered" is a weak shortcut.

    Whether a run leaves the plateau within the shipped 1500 steps depends on the seed: seed 1
    does (the shipped model), seed 0 does not (query accuracy 0.23, a guess among stored values)."""

    name = "toy-recall"
    loss_on_all = False

    def __init__(
        self,
        n_filler: int = 32,
        n_keys: int = 24,
        n_pairs: int = 6,
        repeats: int = 2,
        n_runs: int = 3,
        run_len: int = 6,
        n_queries: int = 4,
        table_seed: int = 0,
    ) -> None:
        self.fillers = [f"f{i}" for i in range(n_filler)]
        self.keys = [f"k{i}" for i in range(n_keys)]
        # Values are filler words, so the previous-token head that the filler runs train already
        # fires at stored values (its query token is a filler word there too).
        self.values = self.fillers
        self.words = [*self.fillers, *self.keys, "<q>"]
        self.n_pairs, self.repeats, self.n_queries = n_pairs, repeats, n_queries
        self.n_runs, self.run_len = n_runs, run_len
        # A fixed permutation of the filler words: inside a run, the token after x is σ(the token
        # before x), which only a previous-token head can see (no shortcut by elimination).
        self.successor = np.random.default_rng(table_seed).permutation(n_filler)
        self.seq_len = 1 + 2 * n_pairs * repeats + n_runs * run_len + 3 * n_queries

    def _row(self, rng: np.random.Generator) -> dict[str, list[int]]:
        keys = [str(k) for k in rng.choice(self.keys, size=self.n_pairs, replace=False)]
        values = [str(v) for v in rng.choice(self.values, size=self.n_pairs)]
        value_of = dict(zip(keys, values, strict=True))
        segments = [k for k in keys for _ in range(self.repeats)] + [None] * self.n_runs
        words, train, last_value_pos = ["<bos>"], [], {}
        for i in rng.permutation(len(segments)):
            key = segments[i]
            if key is None:  # filler run a b σ(a) σ(b) σ²(a) ...: next = σ(previous)
                run = [int(w) for w in rng.choice(len(self.fillers), size=2, replace=False)]
                while len(run) < self.run_len:
                    run.append(int(self.successor[run[-2]]))
                start = len(words)
                words += [self.fillers[w] for w in run]
                train += list(range(start + 1, start + self.run_len - 1))
                continue
            if key in last_value_pos:  # the binding is already in context: recall is possible
                train.append(len(words))
            words += [key, value_of[key]]
            last_value_pos[key] = len(words) - 1
        evals, sources = [], []
        for i in rng.choice(self.n_pairs, size=self.n_queries, replace=False):
            words += ["<q>", keys[i], value_of[keys[i]]]
            evals.append(len(words) - 2)
            sources.append(last_value_pos[keys[i]])
        return {
            "ids": [BOS_ID, *self.ids(*words[1:])],
            "train": train,
            "eval": evals,
            "source": sources,
            "wrong": [-1] * len(evals),
        }


NAMES = [
    "Mary",
    "John",
    "Alice",
    "Bob",
    "Sarah",
    "Tom",
    "Emma",
    "James",
    "Lucy",
    "David",
    "Anna",
    "Paul",
    "Kate",
    "Mark",
    "Rose",
    "Sam",
    "Laura",
    "Adam",
    "Nina",
    "Peter",
    "Julia",
    "Oscar",
    "Clara",
    "Henry",
]
PLACES = [
    "store",
    "park",
    "school",
    "garden",
    "office",
    "beach",
    "market",
    "station",
    "library",
    "hospital",
]
OBJECTS = ["drink", "ring", "book", "ball", "apple", "letter", "flower", "key", "gift", "coin"]
# Wang et al. style templates; A is the indirect object, B the subject (ABBA order as written).
IOI_TEMPLATES = (
    "When A and B went to the PLACE , B gave a OBJECT to",
    "Then , A and B went to the PLACE . B gave a OBJECT to",
    "After A and B went to the PLACE , B gave a OBJECT to",
    "While A and B were working at the PLACE , B gave a OBJECT to",
    "When A and B got a OBJECT at the PLACE , B decided to give it to",
    "Friends A and B found a OBJECT at the PLACE . B gave it to",
)
FILLER_SUBJECTS = ["the cat", "the dog", "a bird", "the old man", "a child", "the teacher", "NAME"]
FILLER_VERBS = ["sat", "ran", "slept", "walked", "waited", "looked around", "smiled"]
FILLER_TAILS = ["near the PLACE", "in the PLACE", "with a OBJECT", "all day", "at night", "again"]


@register("toy-ioi", "toy")
class IndirectObject(RowTask):
    """IOI sentences (answer = the indirect object) mixed with generic filler sentences; loss on
    every token, so the model is a small language model that must solve IOI in context."""

    name = "toy-ioi"
    loss_on_all = True

    def __init__(self, seq_len: int = 64, p_ioi: float = 0.6) -> None:
        self.seq_len, self.p_ioi = seq_len, p_ioi
        template_words = {w for t in IOI_TEMPLATES for w in t.split()} - {"A", "B"}
        filler_words = {
            w
            for part in (FILLER_SUBJECTS, FILLER_VERBS, FILLER_TAILS)
            for p in part
            for w in p.split()
        } - {"NAME"}
        plain = sorted((template_words | filler_words | {"."}) - {"PLACE", "OBJECT"})
        self.words = [*plain, *NAMES, *PLACES, *OBJECTS]

    def _sentence(self, rng: np.random.Generator) -> tuple[list[str], dict[str, int] | None]:
        place, obj = str(rng.choice(PLACES)), str(rng.choice(OBJECTS))
        if rng.random() < self.p_ioi:
            io, s = (str(n) for n in rng.choice(NAMES, size=2, replace=False))
            words = str(rng.choice(IOI_TEMPLATES)).split()
            first_a = words.index("A")
            if rng.random() < 0.5:  # BABA: swap the order of the names in the first clause
                words[first_a], words[first_a + 2] = "B", "A"
            io_pos = words.index("A")
            words = [io if w == "A" else s if w == "B" else w for w in words]
            return _fill(words, place, obj), {"io_pos": io_pos, "io": io, "s": s}
        subj = str(rng.choice(FILLER_SUBJECTS)).replace("NAME", str(rng.choice(NAMES)))
        text = f"{subj} {rng.choice(FILLER_VERBS)} {rng.choice(FILLER_TAILS)} ."
        return _fill(text.split(), place, obj), None

    def _row(self, rng: np.random.Generator) -> dict[str, list[int]]:
        words, evals, sources, wrongs = ["<bos>"], [], [], []
        while len(words) < self.seq_len:
            sent, ioi = self._sentence(rng)
            start = len(words)
            words += sent
            if ioi is not None and len(words) < self.seq_len:  # the answer fits in the window
                evals.append(len(words) - 1)
                sources.append(start + ioi["io_pos"])
                wrongs.append(self.ids(ioi["s"])[0])
                words.append(ioi["io"])
                words.append(".")
        return {
            "ids": [BOS_ID, *self.ids(*words[1 : self.seq_len])],
            "eval": evals,
            "source": sources,
            "wrong": wrongs,
        }


def _fill(words: list[str], place: str, obj: str) -> list[str]:
    return [place if w == "PLACE" else obj if w == "OBJECT" else w for w in words]
