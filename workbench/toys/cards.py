"""Model cards (CARD.md) and machine-readable ground truth (heads.json) for the toy models.

`python -m workbench.toys.cards NAME` loads data/models/NAME through `workbench.load`, measures it
on fresh task samples and writes both files. Nothing in a card is typed by hand: accuracy,
attention numbers, ablation drops, the extreme-token numbers and the test thresholds all come
from this measurement.

A head enters the ground truth for a role only when both kinds of evidence agree:
- attention: its mean attention from the role's query positions to the role's key positions is at
  least the role's `min_attention` (a definition, fixed below, not a measured result);
- causation: zeroing the head alone costs at least `MIN_ACC_DROP` accuracy, or (where the task has
  a competitor answer) at least `MIN_REL_LOGIT_DROP` of the logit difference.
Each ground-truth head is then compared with zeroing each non-ground-truth head alone, and each
role's heads together with random matched sets of non-ground-truth heads (the control of
Wang et al. 2022 and of the workbench's intervention loop).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import torch
from transformers import PreTrainedModel

from workbench.atomic import atomic_write_text
from workbench.models import load
from workbench.tasks import get_task
from workbench.tasks.toy import BigramBackcopy, ToyBatch
from workbench.tasks.toy import __doc__ as TASKS_DOC
from workbench.toys import evidence as ev
from workbench.toys.train import EVAL_SEED, MODELS_DIR

SCHEMA_VERSION = 1
N_EVAL = 256  # fresh sequences per measurement
MIN_ACC_DROP = 0.05
MIN_REL_LOGIT_DROP = 0.2
# Test thresholds = measurement minus these margins; tests re-measure on other fresh samples.
ACC_MARGIN = 0.05
ATTN_MARGIN = 0.15
DROP_FRACTION = 0.5
LOGIT_DIFF_FRACTION = 0.7


@dataclass(frozen=True)
class Role:
    """A job a head can be shown to do: the attention table that defines it and its bar."""

    name: str
    attention_key: str  # which attention table decides the role
    min_attention: float
    description: str  # what the attention number measures, for the card


ROLES: dict[str, list[Role]] = {
    "toy-bb": [
        Role(
            "copy head",
            "trigger_to_prev",
            0.3,
            "mean attention from a trigger to the token before it",
        ),
    ],
    "toy-recall": [
        Role(
            "retrieval (induction) head",
            "query_to_value",
            0.3,
            "mean total attention from a query key to the stored values of that key",
        ),
        Role(
            "previous-token head",
            "value_to_key",
            0.3,
            "mean attention from a stored value to its key (the previous token)",
        ),
    ],
    "toy-ioi": [
        Role(
            "name mover",
            "final_to_io",
            0.25,
            "mean attention from the final token to the indirect object",
        ),
        Role(
            "S-inhibition-like head",
            "final_to_subject",
            0.5,
            "mean total attention from the final token to both mentions of the subject",
        ),
    ],
}

_NUMBER = {"type": "number"}
_DROPS = {
    "type": "object",
    "required": ["accuracy_drop"],
    "properties": {"accuracy_drop": _NUMBER, "logit_diff_drop": _NUMBER},
}
HEADS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "toy model ground-truth heads (heads.json)",
    "type": "object",
    "required": [
        "schema_version",
        "name",
        "model",
        "training",
        "evaluation",
        "roles",
        "heads",
        "control_single_head",
        "thresholds",
    ],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "name": {"type": "string"},
        "model": {
            "type": "object",
            "required": ["architecture", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_model"],
        },
        "training": {"type": "object", "required": ["command", "seed", "steps", "device"]},
        "evaluation": {
            "type": "object",
            "required": ["sample_seed", "n_sequences", "n_scored", "accuracy", "loss"],
        },
        "roles": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["role", "attention_key", "min_attention", "definition", "heads"],
            },
        },
        "heads": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["layer", "head", "role", "attention", "accuracy_drop"],
                "properties": {
                    "layer": {"type": "integer", "minimum": 0},
                    "head": {"type": "integer", "minimum": 0},
                    "role": {"type": "string"},
                    "attention": {"type": "object", "additionalProperties": _NUMBER},
                    "accuracy_drop": _NUMBER,
                },
            },
        },
        "control_single_head": _DROPS,
        "thresholds": {
            "type": "object",
            "required": ["sample_seed", "n_sequences", "accuracy_min", "heads"],
            "properties": {
                "heads": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": [
                            "layer",
                            "head",
                            "role",
                            "attention_key",
                            "attention_min",
                            "accuracy_drop_min",
                        ],
                    },
                }
            },
        },
        "extreme_tokens": {"type": "object"},
    },
}


def validate_heads(heads: dict[str, Any]) -> None:
    """Raise `jsonschema.ValidationError` unless `heads` is a well-formed heads.json object."""
    jsonschema.validate(heads, HEADS_SCHEMA)


def load_heads(name: str, model_dir: Path | None = None) -> dict[str, Any]:
    """The validated heads.json of a shipped toy model."""
    path = (Path(model_dir) if model_dir is not None else MODELS_DIR / name) / "heads.json"
    heads = json.loads(path.read_text())
    validate_heads(heads)
    return heads


def attention_tables(name: str, model: PreTrainedModel, batch: ToyBatch) -> dict[str, torch.Tensor]:
    """Every attention statistic used by the task's roles and card, each [layer, head]."""
    task = get_task(name, kind="toy")
    patterns = ev.attention_patterns(model, batch)  # [layer, batch, head, q, k]
    if isinstance(task, BigramBackcopy):
        return ev.bb_dormant_attention(patterns, batch, task)
    if name == "toy-recall":
        return {
            "query_to_value": ev.recall_induction_attention(patterns, batch),
            "value_to_key": ev.recall_previous_token(patterns, batch),
        }
    return {
        "final_to_io": ev.source_attention(patterns, batch),
        "final_to_subject": ev.ioi_subject_attention(patterns, batch),
    }


def _drops(base: dict[str, float], ablated: dict[str, float]) -> dict[str, float]:
    out = {"accuracy_drop": base["accuracy"] - ablated["accuracy"]}
    if "logit_diff" in base:
        out["logit_diff_drop"] = base["logit_diff"] - ablated["logit_diff"]
    return out


def _causal(base: dict[str, float], drop: dict[str, float]) -> bool:
    if drop["accuracy_drop"] >= MIN_ACC_DROP:
        return True
    return "logit_diff_drop" in drop and drop["logit_diff_drop"] >= MIN_REL_LOGIT_DROP * abs(
        base["logit_diff"]
    )


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


def measure(
    name: str, model: PreTrainedModel, *, seed: int = EVAL_SEED, n: int = N_EVAL
) -> dict[str, Any]:
    """All card numbers for `model` (the HF module of toy model `name`) on `n` fresh samples."""
    batch = get_task(name, kind="toy").sample(n, seed)
    base = ev.task_metrics(model, batch)
    tables = attention_tables(name, model, batch)
    single = {h: _drops(base, m) for h, m in ev.per_head_ablation(model, batch).items()}
    heads = []
    for role in ROLES[name]:
        for layer, head in ev.all_heads(model):
            drop = single[(layer, head)]
            if tables[role.attention_key][layer, head] >= role.min_attention and _causal(
                base, drop
            ):
                attention = {k: float(v[layer, head]) for k, v in tables.items()}
                heads.append(
                    {"layer": layer, "head": head, "role": role.name, "attention": attention} | drop
                )
    truth = sorted({(h["layer"], h["head"]) for h in heads})
    others = [h for h in ev.all_heads(model) if h not in truth]
    roles = []
    for role in ROLES[name]:
        members = [(h["layer"], h["head"]) for h in heads if h["role"] == role.name]
        entry: dict[str, Any] = {
            "role": role.name,
            "attention_key": role.attention_key,
            "min_attention": role.min_attention,
            "definition": role.description,
            "heads": [list(h) for h in members],
        }
        if members:
            entry["ablated_together"] = _drops(base, ev.task_metrics(model, batch, members))
            if len(others) >= len(members):
                control = ev.random_head_control(model, batch, members, pool=others)
                entry["random_control"] = _drops(base, control) | {"n_draws": control["n_draws"]}
        roles.append(entry)
    result = {
        "name": name,
        "sample_seed": seed,
        "n_sequences": n,
        "metrics": base,
        "tables": {k: v.tolist() for k, v in tables.items()},
        "single_ablation": {f"{layer}.{head}": d for (layer, head), d in single.items()},
        "heads": heads,
        "roles": roles,
        "control_heads": [list(h) for h in others],
        "control_single_head": _mean([single[h] for h in others]),
    }
    if isinstance(get_task(name, kind="toy"), BigramBackcopy):
        result["extreme_tokens"] = ev.bb_extreme_tokens(model, batch)
    return result


def thresholds(result: dict[str, Any]) -> dict[str, Any]:
    """Test thresholds: the measurement minus a margin (see the module constants)."""
    m = result["metrics"]
    out: dict[str, Any] = {
        "sample_seed": result["sample_seed"] + 1,  # tests measure on other fresh samples
        "n_sequences": result["n_sequences"] // 2,
        "accuracy_min": round(m["accuracy"] - ACC_MARGIN, 3),
    }
    if "logit_diff" in m:
        out["logit_diff_min"] = round(LOGIT_DIFF_FRACTION * m["logit_diff"], 3)
    keys = {r.name: r.attention_key for r in ROLES[result["name"]]}
    out["heads"] = [
        {
            "layer": h["layer"],
            "head": h["head"],
            "role": h["role"],
            "attention_key": keys[h["role"]],
            "attention_min": round(h["attention"][keys[h["role"]]] - ATTN_MARGIN, 3),
            "accuracy_drop_min": round(DROP_FRACTION * h["accuracy_drop"], 3),
        }
        for h in result["heads"]
    ]
    return out


def training_command(training: dict[str, Any]) -> str:
    return (
        f"OMP_NUM_THREADS={training['torch_threads']} workbench train-toy {training['name']} "
        f"--seed {training['seed']} --steps {training['steps']} --device {training['device']}"
    )


def heads_document(
    result: dict[str, Any], training: dict[str, Any], config: dict[str, Any]
) -> dict[str, Any]:
    """The heads.json object: ground-truth heads with their evidence and the test thresholds."""
    n_heads = config["num_attention_heads"]
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": result["name"],
        "model": {
            "architecture": config["architectures"][0],
            "n_layers": config["num_hidden_layers"],
            "n_heads": n_heads,
            "n_kv_heads": config.get("num_key_value_heads") or n_heads,
            "d_head": config.get("head_dim") or config["hidden_size"] // n_heads,
            "d_model": config["hidden_size"],
            "vocab_size": config["vocab_size"],
            "max_context": config["max_position_embeddings"],
        },
        "training": {
            "command": training_command(training),
            **{k: training[k] for k in ("seed", "steps", "device", "wall_time_s")},
            "final_train_loss": training["final_train_loss"],
        },
        "evaluation": {
            "sample_seed": result["sample_seed"],
            "n_sequences": result["n_sequences"],
            **result["metrics"],
        },
        "roles": result["roles"],
        "heads": result["heads"],
        "control_heads": result["control_heads"],
        "control_single_head": result["control_single_head"],
        "thresholds": thresholds(result),
    }
    if "extreme_tokens" in result:
        doc["extreme_tokens"] = result["extreme_tokens"]
    return doc


def _f(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def render_card(doc: dict[str, Any], result: dict[str, Any], config: dict[str, Any]) -> str:
    """CARD.md text from the heads.json object, the full measurement and the model config."""
    name = doc["name"]
    m = doc["evaluation"]
    training = doc["training"]
    spec_line = ", ".join(f"{k} {v}" for k, v in training.items() if k not in ("command",))
    task_para = next(p for p in TASKS_DOC.split("\n- ") if f"`{name}`" in p)
    has_ld = "logit_diff" in m
    lines = [
        f"# {name}",
        "",
        "Reference model with a known mechanism, trained by this repository's own code "
        "(`workbench/toys`). Every number below was produced by "
        f"`python -m workbench.toys.cards {name}` (CPU); do not edit by hand.",
        "",
        "## Task",
        "",
        " ".join(task_para.split()),
        "",
        "## Architecture",
        "",
        f"LlamaForCausalLM (RoPE, SwiGLU MLP, RMSNorm): {config['num_hidden_layers']} layers, "
        f"{config['num_attention_heads']} heads per layer, d_model {config['hidden_size']}, "
        f"d_mlp {config['intermediate_size']}, vocabulary {config['vocab_size']} "
        f"(word-level `tokenizers` tokenizer), context {config['max_position_embeddings']}. "
        "Load it with `workbench.load(" + f'"{name}")`.',
        "",
        "## Training",
        "",
        f'`{training["command"]}` (Python: `workbench.toys.train_toy("{name}", '
        f'seed={training["seed"]}, steps={training["steps"]}, device="{training["device"]}")`); '
        f"{spec_line}. Optimiser and schedule: `workbench/toys/train.py` (`SPECS`). Results on "
        "another thread count or device differ in the last bits, not in the mechanism.",
        "",
        "## Task accuracy",
        "",
        f"On {m['n_sequences']} fresh sequences (sample seed {m['sample_seed']}): accuracy "
        f"{_f(m['accuracy'])} on {m['n_scored']} scored positions, loss {_f(m['loss'])}"
        + (f", logit difference IO − S {_f(m['logit_diff'], 2)}" if has_ld else "")
        + ".",
        "",
        "## Ground-truth heads",
        "",
        "Attention: the role's definition below. Causal test: the head's output is zeroed (its "
        "slice of the input to `o_proj`, `workbench.toys.evidence.zero_heads`); control: the mean "
        f"drop over zeroing each of the {len(doc['control_heads'])} non-ground-truth heads alone.",
        "",
    ]
    ctrl = doc["control_single_head"]
    header = "| layer.head | role | attention | accuracy drop | control drop |"
    sep = "|---|---|---|---|---|"
    if has_ld:
        header += " logit-diff drop | control logit-diff drop |"
        sep += "---|---|"
    lines += [header, sep]
    keys = {r["role"]: r["attention_key"] for r in doc["roles"]}
    for h in doc["heads"]:
        row = (
            f"| {h['layer']}.{h['head']} | {h['role']} | {_f(h['attention'][keys[h['role']]])} | "
            f"{_f(h['accuracy_drop'])} | {_f(ctrl.get('accuracy_drop'))} |"
        )
        if has_ld:
            row += f" {_f(h['logit_diff_drop'], 2)} | {_f(ctrl.get('logit_diff_drop'), 2)} |"
        lines.append(row)
    for h in doc["heads"]:
        a = h["attention"]
        if "non_trigger_to_bos" in a:  # Bigram-Backcopy: the active/dormant split of Guo et al.
            lines += [
                "",
                f"Head {h['layer']}.{h['head']} active vs dormant: from triggers it puts "
                f"{_f(a['trigger_to_prev'])} of its attention on the previous token and "
                f"{_f(a['trigger_to_bos'])} on <bos>; from non-trigger tokens "
                f"{_f(a['non_trigger_to_prev'])} on the previous token and "
                f"{_f(a['non_trigger_to_bos'])} on <bos>.",
            ]
    lines += ["", "Roles, and each role's heads zeroed together vs random matched sets:", ""]
    for r in doc["roles"]:
        line = f"- **{r['role']}** ({r['definition']} ≥ {r['min_attention']}): heads {r['heads']}"
        if "ablated_together" in r:
            line += f"; accuracy drop {_f(r['ablated_together']['accuracy_drop'])}"
            rnd = r.get("random_control")
            line += (
                f" vs {_f(rnd['accuracy_drop'])} for random matched sets ({rnd['n_draws']} draws)"
                if rnd
                else " (too few other heads for a random control)"
            )
        lines.append(line)
    lines += ["", "Per-head attention tables ([layer][head]) and single-head ablation drops:", ""]
    for key, table in result["tables"].items():
        lines.append(f"- {key}: {[[round(x, 3) for x in row] for row in table]}")
    lines.append(
        "- accuracy drop per head: "
        + ", ".join(f"{k}: {_f(v['accuracy_drop'])}" for k, v in result["single_ablation"].items())
    )
    if "extreme_tokens" in doc:
        x = doc["extreme_tokens"]
        lines += [
            "",
            "## Extreme-token phenomena (per layer, Guo et al. 2024)",
            "",
            "| layer | attention received by <bos> | ‖v·W_O‖ at <bos> | ‖v·W_O‖ others |"
            " residual norm at <bos> | residual norm others |",
            "|---|---|---|---|---|---|",
        ]
        for layer in range(len(x["bos_attention_received"])):
            lines.append(
                f"| {layer} | {_f(x['bos_attention_received'][layer])} | "
                f"{_f(x['value_norm_bos'][layer])} | {_f(x['value_norm_other'][layer])} | "
                f"{_f(x['residual_norm_bos'][layer])} | {_f(x['residual_norm_other'][layer])} |"
            )
    lines += ["", "Machine-readable ground truth and test thresholds: `heads.json`.", ""]
    return "\n".join(lines)


def write_card(name: str, model_dir: Path | None = None) -> Path:
    """Measure the model in `model_dir` (default data/models/NAME), write CARD.md and heads.json."""
    model_dir = Path(model_dir) if model_dir is not None else MODELS_DIR / name
    get_task(name, kind="toy")  # unknown names fail here, before loading anything
    model = load(str(model_dir), device="cpu")
    result = measure(name, model.hf)
    training = json.loads((model_dir / "training.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    doc = heads_document(result, training, config)
    validate_heads(doc)
    atomic_write_text(model_dir / "heads.json", json.dumps(doc, indent=2) + "\n")
    card = model_dir / "CARD.md"
    atomic_write_text(card, render_card(doc, result, config))
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="(Re)write a toy model's CARD.md and heads.json.")
    parser.add_argument("name", help="toy model name, e.g. toy-bb")
    parser.add_argument("--dir", type=Path, default=None, help="model directory")
    args = parser.parse_args(argv)
    print(write_card(args.name, args.dir))


if __name__ == "__main__":
    main()
