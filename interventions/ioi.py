"""IOI-style circuit discovery: per-head evidence, the seven head classes, and the pipeline
that turns them into a :class:`~interventions.circuit.Circuit`.

Follows Wang et al. 2022, "Interpretability in the Wild: a Circuit for Indirect Object
Identification in GPT-2 small" (arXiv:2211.00593). Their circuit is read backwards from the
logits:

1. **Name movers** attend from END to IO and copy it: corrupting their output lowers the logit
   difference through the direct path (path patching sender -> logits). **Negative name movers**
   attend to IO too but write against it (their direct effect has the other sign).
2. **Backup name movers** attend to IO but matter little until the name movers are knocked out;
   then their direct logit attribution grows (the paper's Fig. 7).
3. **S-inhibition heads** attend from END to S2 and matter through the name movers' *queries*
   (path patching sender -> name-mover q at END).
4. **Induction** and **duplicate-token heads** matter through the S-inhibition heads' *values* at
   S2; induction heads attend S2 -> S1+1, duplicate-token heads S2 -> S1.
5. **Previous-token heads** matter through the induction heads' *keys* at S1+1 and attend
   S1+1 -> S1.

All seven rules and their thresholds live in :class:`Rules` (one place, documented, JSON-able;
a head meeting several rules takes the first class of :data:`CLASSES`). Evidence per head
(columns of :attr:`Evidence.table`):

``dla`` direct logit attribution at END (logits); ``direct_effect`` path patching head -> logits
through the direct path, relative to the clean logit difference; ``act_patch`` activation
patching of the head's output clean <- ABC (relative; exact where computed, otherwise NaN and
``attr_patch``, the attribution-patching estimate, stands in); ``end_io``, ``end_s1``,
``end_s2``, ``s2_s1``, ``s2_s1p1``, ``s1p1_s1`` mean attention between those role positions;
``pp_nm_q``, ``pp_sinh_v``, ``pp_ind_k`` path-patching effects (relative) into the name movers'
queries, the S-inhibition heads' values and the induction heads' keys; ``backup_gain`` the DLA
gained when the name movers are mean-ablated (relative).

Cost control on large models: exact activation patching runs for the ``exact_heads`` heads with
the largest attribution-patching estimates (all heads when the model has at most that many), and
path patching uses as senders the ``max_senders`` heads with the largest |activation-patching|
effect plus every head whose attention matches a sender class, in layers below the receivers.

Circuit rules beyond the seven classes (issue 16; :func:`build_circuit`):

* a head that meets no class rule but has a large effect is :data:`OTHER` when its strongest
  effect helps the answer (lowers the logit difference when corrupted) and :data:`NEGATIVE` when
  it pushes against it; neither enters the circuit by default. They are offered greedily: the
  candidate that brings the circuit's faithfulness F(C)/F(M) closest to 1 enters, as long as it
  brings it closer; the order and each step's faithfulness are reported (``metrics["greedy"]``),
  and so is every candidate left out;
* a class must agree with the head's strongest evidence: the effect through the path its class
  is defined by (direct path for the name movers, ``backup_gain`` for backups, ``pp_nm_q`` for
  S-inhibition, ``pp_sinh_v`` for induction and duplicate-token heads, ``pp_ind_k`` for
  previous-token heads) must be at least as large as its effect through any other path, else the
  head is :data:`AMBIGUOUS`, its ``ambiguity`` naming both numbers (it stays in the circuit: a
  class rule chose it);
* faithfulness is reported for the class circuit (the heads the class rules chose), the full
  circuit and its complement, and minimality per head
  (:func:`interventions.circuit.faithfulness`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from interventions import path_patching as pp
from interventions.circuit import (
    Circuit,
    CircuitEdge,
    CircuitHead,
    ablation_scorer,
    faithfulness,
)
from interventions.engine import Intervener
from interventions.specs import ResampleAblation
from workbench.errors import InterventionError
from workbench.models import Model
from workbench.tasks import get_task
from workbench.tasks.templated import TaskDataset, build_pair

Head = tuple[int, int]
CLASSES = (
    "name mover",
    "negative name mover",
    "backup name mover",
    "s-inhibition",
    "induction",
    "duplicate token",
    "previous token",
)
# Heads that matter but fit none of the seven rules: OTHER when their strongest effect helps the
# answer (e.g. a head that attends to S2 from END and suppresses S directly in the logits),
# NEGATIVE when it pushes against it. They enter the circuit only when they make it more faithful
# (build_circuit); the paper's circuit has no such heads.
OTHER = "other"
NEGATIVE = "negative"
# A head whose class rule holds but whose strongest evidence runs through another path.
AMBIGUOUS = "ambiguous"
# The evidence each class is defined by (its path), and the paths every head is compared on.
CLASS_EVIDENCE = {
    "name mover": "direct_effect",
    "negative name mover": "direct_effect",
    "backup name mover": "backup_gain",
    "s-inhibition": "pp_nm_q",
    "induction": "pp_sinh_v",
    "duplicate token": "pp_sinh_v",
    "previous token": "pp_ind_k",
}
PATHS = ("direct_effect", "pp_nm_q", "pp_sinh_v", "pp_ind_k")
# GPT-2 small's classes as published (Wang et al. 2022; ACDC acdc/ioi/utils.py).
GPT2_SMALL_IOI = {
    "name mover": [(9, 9), (9, 6), (10, 0)],
    "backup name mover": [(10, 10), (10, 6), (10, 2), (10, 1), (11, 2), (9, 7), (9, 0), (11, 9)],
    "negative name mover": [(10, 7), (11, 10)],
    "s-inhibition": [(7, 3), (7, 9), (8, 6), (8, 10)],
    "induction": [(5, 5), (5, 8), (5, 9), (6, 9)],
    "duplicate token": [(0, 1), (0, 10), (3, 0)],
    "previous token": [(2, 2), (4, 11)],
}


@dataclass(frozen=True)
class Rules:
    """The classification rules of the seven classes, with their thresholds.

    Attention thresholds are mean attention probabilities between role positions. Effects are
    relative to the clean logit difference (-0.05 = the metric drops by 5 % of its clean value).

    - name mover: ``end_io >= attend_io`` and ``direct_effect <= -direct_effect``
    - negative name mover: ``end_io >= attend_io`` and ``direct_effect >= +direct_effect``
    - backup name mover: ``end_io >= attend_io`` and ``backup_gain >= backup_gain``
    - s-inhibition: ``pp_nm_q <= -path_effect`` and ``end_s2 >= attend_s2``
    - induction: ``pp_sinh_v <= -path_effect`` and ``s2_s1p1 >= attend_induction``
    - duplicate token: ``pp_sinh_v <= -path_effect`` and ``s2_s1 >= attend_duplicate``
    - previous token: ``pp_ind_k <= -path_effect`` and ``s1p1_s1 >= attend_previous``
    - other / negative (none of the above): ``|act_patch| >= other_effect`` or
      ``|direct_effect| >= other_effect`` (``attr_patch`` stands in where ``act_patch`` was not
      computed); the sign of the larger of the two says which: negative (helps the answer) is
      ``other``, positive (pushes against it) is ``negative``
    """

    attend_io: float = 0.2
    attend_s2: float = 0.1
    attend_induction: float = 0.1
    attend_duplicate: float = 0.1
    attend_previous: float = 0.2
    direct_effect: float = 0.05
    backup_gain: float = 0.05
    path_effect: float = 0.02
    other_effect: float = 0.1

    def describe(self) -> dict[str, str]:
        """Each class's rule with the thresholds filled in."""
        return {
            "name mover": f"end_io >= {self.attend_io} and direct_effect <= -{self.direct_effect}",
            "negative name mover": f"end_io >= {self.attend_io} and direct_effect >= "
            f"{self.direct_effect}",
            "backup name mover": f"end_io >= {self.attend_io} and backup_gain >= "
            f"{self.backup_gain}",
            "s-inhibition": f"pp_nm_q <= -{self.path_effect} and end_s2 >= {self.attend_s2}",
            "induction": f"pp_sinh_v <= -{self.path_effect} and s2_s1p1 >= {self.attend_induction}",
            "duplicate token": f"pp_sinh_v <= -{self.path_effect} and s2_s1 >= "
            f"{self.attend_duplicate}",
            "previous token": f"pp_ind_k <= -{self.path_effect} and s1p1_s1 >= "
            f"{self.attend_previous}",
            OTHER: f"no class above and the larger of act_patch, direct_effect <= "
            f"-{self.other_effect} (helps the answer); enters the circuit only if it makes it "
            "more faithful",
            NEGATIVE: f"no class above and the larger of act_patch, direct_effect >= "
            f"{self.other_effect} (pushes against the answer); enters the circuit only if it "
            "makes it more faithful",
            AMBIGUOUS: "a class rule holds but the head's effect through another path is larger "
            "than through its class's path (" + ", ".join(PATHS) + ", backup_gain)",
        }

    def matches(self, row: pd.Series) -> list[str]:
        """The classes whose rule ``row`` (one head's evidence) meets, in :data:`CLASSES` order."""

        def ge(col: str, value: float) -> bool:
            return bool(np.nan_to_num(row.get(col, np.nan), nan=-np.inf) >= value)

        def le(col: str, value: float) -> bool:
            return bool(np.nan_to_num(row.get(col, np.nan), nan=np.inf) <= value)

        rules = {
            "name mover": ge("end_io", self.attend_io) and le("direct_effect", -self.direct_effect),
            "negative name mover": ge("end_io", self.attend_io)
            and ge("direct_effect", self.direct_effect),
            "backup name mover": ge("end_io", self.attend_io)
            and ge("backup_gain", self.backup_gain),
            "s-inhibition": le("pp_nm_q", -self.path_effect) and ge("end_s2", self.attend_s2),
            "induction": le("pp_sinh_v", -self.path_effect)
            and ge("s2_s1p1", self.attend_induction),
            "duplicate token": le("pp_sinh_v", -self.path_effect)
            and ge("s2_s1", self.attend_duplicate),
            "previous token": le("pp_ind_k", -self.path_effect)
            and ge("s1p1_s1", self.attend_previous),
        }
        return [c for c in CLASSES if rules[c]]


def classify(table: pd.DataFrame, rules: Rules) -> pd.Series:
    """One class per head: the first class of :data:`CLASSES` whose rule holds, else
    :data:`OTHER` or :data:`NEGATIVE` for a head with a large effect (by the sign of its larger
    effect), else ``""``."""

    def one(row: pd.Series) -> str:
        matched = rules.matches(row)
        if matched:
            return matched[0]
        total = row.get("act_patch", np.nan)
        if np.isnan(total):
            total = row.get("attr_patch", np.nan)
        effects = np.nan_to_num([total, row.get("direct_effect", np.nan)], nan=0.0)
        strongest = effects[np.argmax(np.abs(effects))]
        if abs(strongest) < rules.other_effect:
            return ""
        return OTHER if strongest < 0 else NEGATIVE

    return table.apply(one, axis=1)


def ambiguity(row: pd.Series, role: str) -> str:
    """``""`` when the head's class agrees with its strongest evidence (see the module
    docstring), else the conflicting numbers, e.g. ``"s-inhibition by pp_nm_q -0.041, but
    direct_effect -0.183"``."""
    own = CLASS_EVIDENCE.get(role)
    if own is None:
        return ""
    value = float(np.nan_to_num(row.get(own, np.nan), nan=0.0))
    others = [
        p for p in PATHS if p != own and not (role == "backup name mover" and p == "direct_effect")
    ]
    stronger = [
        (p, float(row[p]))
        for p in others
        if np.isfinite(row.get(p, np.nan)) and abs(row[p]) > abs(value)
    ]
    if not stronger:
        return ""
    conflicts = ", ".join(f"{p} {v:+.3f}" for p, v in stronger)
    return f"{role} by {own} {value:+.3f}, but {conflicts}"


@dataclass
class Evidence:
    """Per-head evidence (``table``: one row per head, index ``(layer, head)``) and the run's
    metrics and notes."""

    table: pd.DataFrame
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    path_results: list[pp.PathPatchResult] = field(default_factory=list)


def _attention(pattern: torch.Tensor, data: TaskDataset, q_role: str, k_role: str) -> np.ndarray:
    """``pattern [layer, batch, head, q, k]`` -> ``[layer, head]``: mean attention from the
    ``q_role`` position to the ``k_role`` position."""
    rows = torch.arange(len(data))
    q, k = data.positions[q_role], data.positions[k_role]
    per_prompt = pattern.permute(1, 3, 4, 0, 2)[rows, q, k]  # [batch, layer, head]
    return per_prompt.mean(0).numpy()


def _frame(n_layers: int, n_heads: int, columns: dict[str, np.ndarray]) -> pd.DataFrame:
    index = pd.MultiIndex.from_product([range(n_layers), range(n_heads)], names=["layer", "head"])
    return pd.DataFrame(
        {k: np.asarray(v, dtype=float).reshape(-1) for k, v in columns.items()}, index=index
    )


def _grouped(data: TaskDataset) -> list[torch.Tensor]:
    """Prompt indices per template group (equal length and positions within a group)."""
    return [(data.groups == g).nonzero()[:, 0] for g in data.groups.unique()]


def activation_patching(
    model: Model, clean: TaskDataset, abc: TaskDataset, heads: list[Head], max_rows: int = 64
) -> np.ndarray:
    """Exact activation patching of each head's output (all positions) from the ABC prompts into
    the clean ones, through the intervention engine (one ``ResampleAblation`` group per head).
    Returns the relative change of the mean logit difference per head ``[len(heads)]``."""
    engine = Intervener(model, max_rows=max_rows)
    groups = [[]] + [[ResampleAblation(heads=(h,))] for h in heads]
    totals = torch.zeros(len(groups))
    for idx in _grouped(clean):
        sub, sub_abc = clean.subset(idx), abc.subset(idx)
        out = engine.run(
            sub.tokens, groups, sources={"corrupted": sub_abc.tokens}, keep=1, path="pattern"
        )
        last = out.logits[:, :, -1].float().cpu()  # [groups, batch, vocab]
        rows = torch.arange(len(sub))
        diff = last[:, rows, sub.answer_ids] - last[:, rows, sub.wrong_ids]  # [groups, batch]
        totals += diff.sum(1)
    means = totals / len(clean)
    return ((means[1:] - means[0]) / means[0].abs()).numpy()


def collect_evidence(
    model: Model,
    clean: TaskDataset,
    abc: TaskDataset,
    rules: Rules,
    exact_heads: int = 64,
    max_senders: int = 30,
    max_rows: int = 64,
    log: Callable[[str], None] = lambda _: None,
) -> Evidence:
    """Every piece of per-head evidence, in the order the classes depend on each other."""
    info = model.info
    n_layers, n_heads = info.n_layers, info.n_heads
    notes: list[str] = []
    log("recording the clean and ABC runs")
    rec = pp.record(model, clean, patterns=True)
    rec_abc = pp.record(model, abc, patterns=False)
    rows = torch.arange(len(clean))
    end_logits = rec.end_logits
    clean_ld_each = end_logits[rows, clean.answer_ids] - end_logits[rows, clean.wrong_ids]
    clean_ld = float(clean_ld_each.mean())
    abc_end = rec_abc.end_logits
    abc_ld = float((abc_end[rows, clean.answer_ids] - abc_end[rows, clean.wrong_ids]).mean())
    if clean_ld <= 0:
        raise InterventionError(
            f"the model does not solve {clean.task} on these prompts (mean logit difference "
            f"{clean_ld:.2f} <= 0); there is no circuit to find"
        )
    metrics = {
        "clean_logit_diff": clean_ld,
        "abc_logit_diff": abc_ld,
        "clean_accuracy": float((clean_ld_each > 0).float().mean()),
        "n_prompts": float(len(clean)),
    }
    dla = pp.direct_logit_attribution(model, clean, rec.z, rec.final_scale)  # [layer, head, b]
    dla_abc = pp.direct_logit_attribution(model, clean, rec_abc.z, rec.final_scale)
    columns: dict[str, np.ndarray] = {
        "dla": dla.mean(-1).numpy(),
        "direct_effect": ((dla_abc - dla).mean(-1) / clean_ld).numpy(),
    }
    for name, (q_role, k_role) in {
        "end_io": ("END", "IO"),
        "end_s1": ("END", "S1"),
        "end_s2": ("END", "S2"),
        "s2_s1": ("S2", "S1"),
        "s2_s1p1": ("S2", "S1+1"),
        "s1p1_s1": ("S1+1", "S1"),
    }.items():
        columns[name] = _attention(rec.pattern, clean, q_role, k_role)
    log("attribution patching (all heads)")
    attr = pp.attribution_patching(model, clean, rec_abc.z, rec.z) / clean_ld
    columns["attr_patch"] = attr.numpy()
    order = np.argsort(-np.abs(columns["attr_patch"].reshape(-1)))
    exact = [divmod(int(i), n_heads) for i in order[:exact_heads]]
    if len(exact) < n_layers * n_heads:
        notes.append(
            f"exact activation patching on the {len(exact)} heads with the largest "
            "attribution-patching estimates; attr_patch stands in for the others"
        )
    log(f"activation patching ({len(exact)} heads)")
    act = np.full((n_layers, n_heads), np.nan)
    for (layer, head), value in zip(
        exact, activation_patching(model, clean, abc, exact, max_rows), strict=True
    ):
        act[layer, head] = value
    columns["act_patch"] = act
    table = _frame(n_layers, n_heads, columns)
    total = table["act_patch"].fillna(table["attr_patch"])

    # Name movers (and negative ones) from the direct path.
    classes = classify(table, rules)
    movers = [h for h, c in classes.items() if c == "name mover"]

    # Backup name movers: DLA after the name movers are mean-ablated (position-wise ABC mean).
    means = pp.position_means(rec_abc.z, clean.groups)
    table["backup_gain"] = np.nan
    if movers:
        log(f"knocking out {len(movers)} name movers for the backup check")
        knocked = torch.zeros(n_layers, n_heads, dtype=torch.bool)
        for layer, head in movers:
            knocked[layer, head] = True
        rec_ko = _record_replaced(model, clean, means, knocked)
        dla_ko = pp.direct_logit_attribution(model, clean, rec_ko, rec.final_scale)
        gain = ((dla_ko - dla).mean(-1) / clean_ld).numpy()
        gain[knocked.numpy()] = np.nan
        table["backup_gain"] = gain.reshape(-1)
    else:
        notes.append("no name mover met its rule; later classes are found without receivers")

    def senders_below(layer_limit: int, attention_cols: list[tuple[str, float]]) -> list[Head]:
        """Heads below the receivers: those whose attention fits the sender class first, then
        the rest, each by |activation-patching effect|; at most ``max_senders``."""
        below = total[[h[0] < layer_limit for h in total.index]].abs()
        fits = np.zeros(len(below), dtype=bool)
        for col, threshold in attention_cols:
            fits |= (table.loc[below.index, col] >= threshold).to_numpy()
        ranked = [
            *below[fits].sort_values(ascending=False).index,
            *below[~fits].sort_values(ascending=False).index,
        ]
        return sorted(ranked[:max_senders])

    path_results = []

    def patch_into(
        receivers: list[Head],
        via: str,
        position: str,
        column: str,
        attention_cols: list[tuple[str, float]],
    ) -> None:
        table[column] = np.nan
        if not receivers:
            return
        senders = senders_below(max(layer for layer, _ in receivers), attention_cols)
        if not senders:
            return
        log(f"path patching {len(senders)} senders -> {len(receivers)} receivers' {via}")
        result = pp.path_patch(
            model,
            clean,
            rec.z,
            rec_abc.z,
            senders,
            receivers,
            via,
            position,
            max_rows,
            clean_metric=clean_ld,
        )
        path_results.append(result)
        if result.notes and result.notes not in notes:
            notes.append(result.notes)
        for sender, effect in zip(senders, result.effect.tolist(), strict=True):
            table.loc[sender, column] = effect

    patch_into(movers, "q", "END", "pp_nm_q", [("end_s2", rules.attend_s2)])
    classes = classify(table, rules)
    s_inhibition = [h for h, c in classes.items() if c == "s-inhibition"]
    patch_into(
        s_inhibition,
        "v",
        "S2",
        "pp_sinh_v",
        [("s2_s1p1", rules.attend_induction), ("s2_s1", rules.attend_duplicate)],
    )
    classes = classify(table, rules)
    induction = [h for h, c in classes.items() if c == "induction"]
    patch_into(induction, "k", "S1+1", "pp_ind_k", [("s1p1_s1", rules.attend_previous)])
    table["rule_class"] = classify(table, rules)
    table["ambiguity"] = [ambiguity(r, r["rule_class"]) for _, r in table.iterrows()]
    table["class"] = table["rule_class"].where(table["ambiguity"] == "", AMBIGUOUS)
    return Evidence(table, metrics, notes, path_results)


@torch.no_grad()
def _record_replaced(
    model: Model, data: TaskDataset, replacement: torch.Tensor, replaced: torch.Tensor
) -> torch.Tensor:
    """``z [layer, batch, pos, head, d_head]`` of a run with ``replaced [layer, head]`` heads
    writing ``replacement`` instead of their output."""
    kept: dict[int, torch.Tensor] = {}

    def hook(z: torch.Tensor, hook) -> torch.Tensor:  # [batch, pos, head, d_head]
        layer = int(hook.name.split(".")[1])
        heads = replaced[layer].nonzero()[:, 0]
        if len(heads):
            z = z.clone()
            z[:, :, heads] = replacement[layer][:, :, heads].to(z.device, z.dtype)
        kept[layer] = z.detach().cpu().float()
        return z

    hooks = [(pp.z_name(layer), hook) for layer in range(model.info.n_layers)]
    model.bridge().run_with_hooks(data.tokens.to(model.device), fwd_hooks=hooks)
    return torch.stack([kept[layer] for layer in range(model.info.n_layers)])


def build_circuit(
    model: Model,
    clean: TaskDataset,
    abc: TaskDataset,
    evidence: Evidence,
    rules: Rules,
    checks: bool = True,
) -> Circuit:
    """The circuit of the classified heads: the class circuit (the seven classes and the
    ambiguous heads), then :data:`OTHER` and :data:`NEGATIVE` heads admitted greedily while they
    make it more faithful (:func:`admit_greedily`); nodes, edges from path patching and the
    direct path, faithfulness of the class circuit, the circuit and its complement (and, with
    ``checks``, completeness and minimality)."""
    table = evidence.table
    score = ablation_scorer(model, clean, abc)
    classes = table["class"]
    class_heads = [h for h, c in classes.items() if c and c not in (OTHER, NEGATIVE)]
    candidates = [h for h, c in classes.items() if c in (OTHER, NEGATIVE)]
    every = list(table.index)
    admitted, greedy, left_out = admit_greedily(score, class_heads, candidates, score(every))
    for step in [*greedy, *left_out]:
        step["class"] = str(classes[step["layer"], step["head_index"]])
    table["in_circuit"] = [h in {*class_heads, *admitted} for h in table.index]
    evidence_cols = [c for c in table.columns if c not in ("class", "in_circuit")]
    heads = [
        CircuitHead(
            int(layer), int(head), str(row["class"]), {c: _plain(row[c]) for c in evidence_cols}
        )
        for (layer, head), row in table.iterrows()
        if row["in_circuit"]
    ]
    by_rule: dict[str, list[Head]] = {}
    for h in heads:
        by_rule.setdefault(str(h.evidence["rule_class"]), []).append((h.layer, h.head))
    edges = []
    direct = ("name mover", "negative name mover", "backup name mover", OTHER, NEGATIVE)
    for h in heads:
        strongest = max(PATHS, key=lambda p: abs(h.evidence.get(p) or 0.0))  # None: not measured
        if h.evidence["rule_class"] in direct or (h.role == AMBIGUOUS and strongest == PATHS[0]):
            edges.append(CircuitEdge(h.name, "logits", "direct", h.evidence["direct_effect"]))
    targets = {
        "pp_nm_q": ("name mover", "q", ("s-inhibition",)),
        "pp_sinh_v": ("s-inhibition", "v", ("induction", "duplicate token")),
        "pp_ind_k": ("induction", "k", ("previous token",)),
    }
    for col, (receiver_class, via, sender_classes) in targets.items():
        for h in heads:
            if h.evidence["rule_class"] in sender_classes:
                for layer, head in by_rule.get(receiver_class, []):
                    edges.append(
                        CircuitEdge(h.name, f"{layer}.{head}", via, h.evidence.get(col, np.nan))
                    )
    notes = list(evidence.notes)
    notes += [
        f"{layer}.{head} is ambiguous: {text}"
        for (layer, head), text in table["ambiguity"].items()
        if text and table.loc[(layer, head), "in_circuit"]
    ]
    circuit = Circuit(
        model=model.info.to_dict(),
        task=clean.summary(),
        heads=heads,
        edges=edges,
        metrics={**evidence.metrics, "greedy": greedy, "left_out": left_out},
        rules={"thresholds": asdict(rules), "rules": rules.describe()},
        notes=notes,
        evidence=[
            {"layer": int(layer), "head": int(head), **{c: _plain(row[c]) for c in table.columns}}
            for (layer, head), row in table.iterrows()
        ],
    )
    kept = faithfulness(
        model, clean, abc, circuit, checks=checks, class_heads=class_heads, scorer=score
    )
    circuit.metrics.update(kept)
    return circuit


def admit_greedily(
    score: Callable[[list[Head]], float],
    base: list[Head],
    candidates: list[Head],
    f_model: float,
) -> tuple[list[Head], list[dict[str, Any]], list[dict[str, Any]]]:
    """Grow ``base`` by ``candidates`` one at a time: each step adds the candidate that brings
    the faithfulness ``score(heads) / f_model`` closest to 1, as long as it brings it closer.
    Returns the admitted heads, the steps in order (``head`` as ``"l.h"``, ``layer``,
    ``head_index``, ``before``, ``after``: faithfulness) and the candidates left out with the
    faithfulness each would have given at the last step (``faithfulness_if_added``).
    ``score(heads)``: the metric with every head but ``heads`` ablated."""
    current = list(base)
    now = score(current) / f_model
    remaining = sorted(candidates)
    steps: list[dict[str, Any]] = []
    tried: dict[Head, float] = {}
    while remaining:
        tried = {c: score([*current, c]) / f_model for c in remaining}
        best = min(remaining, key=lambda c: (abs(1 - tried[c]), c))
        if abs(1 - tried[best]) >= abs(1 - now):
            break
        steps.append({**_named(best), "before": now, "after": tried[best]})
        current.append(best)
        remaining.remove(best)
        now = tried[best]
    left = [{**_named(c), "faithfulness_if_added": tried.get(c, now)} for c in remaining]
    return current[len(base) :], steps, left


def _named(head: Head) -> dict[str, Any]:
    return {"head": f"{head[0]}.{head[1]}", "layer": int(head[0]), "head_index": int(head[1])}


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def find_circuit(
    model: Model,
    task: Any = None,
    n: int = 32,
    seed: int = 0,
    templates: list[int] | None = None,
    rules: Rules | None = None,
    exact_heads: int = 64,
    max_senders: int = 30,
    checks: bool = True,
    max_rows: int = 64,
    log: Callable[[str], None] = lambda _: None,
) -> Circuit:
    """Find the IOI-style circuit of ``model``: build the task's prompts and ABC twins, collect
    the evidence, classify, and measure the circuit's faithfulness.

    ``task``: a templated task (``workbench.tasks.ioi.IOITask``, ``ColoredObjectsTask``, ...:
    anything with ``build`` and ``corrupt``) or the name of a ``templated`` task of the registry
    (``ioi``, ``ioi-toy``, ``colored-objects``: ``workbench.tasks.task_names("templated")``); by
    default IOI in the vocabulary the model was trained on (``ioi-toy`` for a ``toy-ioi`` model,
    ``ioi`` otherwise).
    """
    if not model.info.causal:
        raise InterventionError("circuit discovery needs a causal language model")
    rules = rules or Rules()
    if task is None:
        task = "ioi-toy" if str(model.info.name).startswith("toy-ioi") else "ioi"
    spec = get_task(task, kind="templated").templated if isinstance(task, str) else task
    clean, abc = build_pair(spec, model.tokenizer, n, seed=seed, templates=templates)
    evidence = collect_evidence(model, clean, abc, rules, exact_heads, max_senders, max_rows, log)
    log("faithfulness")
    return build_circuit(model, clean, abc, evidence, rules, checks=checks)
