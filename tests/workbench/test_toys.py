"""Toy reference models: task generators, training code, and the shipped checkpoints' ground truth.

The shipped-model tests re-measure each model on fresh samples (another seed than the card's) and
hold it to the thresholds in its heads.json, which `python -m workbench.toys.cards` derived from
the card's measurement with a margin.
"""

from __future__ import annotations

import json
from dataclasses import replace

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

import workbench
from workbench.cli import main
from workbench.errors import TaskBuildError, UnknownModelError, WorkbenchError
from workbench.tasks import get_task
from workbench.tasks.toy import BigramBackcopy
from workbench.toys import SPECS, TOY_NAMES, train_toy
from workbench.toys import cards as toy_cards
from workbench.toys import evidence as ev
from workbench.toys.train import EVAL_SEED, MODELS_DIR, train_model

# ---------------------------------------------------------------------------------------------
# Task generators: the label at every scored position is the token at its source position.


@pytest.mark.parametrize("name", TOY_NAMES)
def test_scored_answer_is_the_source_token(name: str) -> None:
    task = get_task(name)
    batch = task.sample(16, seed=7)
    b, q = batch.eval_mask.nonzero().unbind(1)
    assert len(b) > 0
    answers = batch.input_ids[b, q + 1]
    assert torch.equal(answers, batch.input_ids[b, batch.source[b, q]])
    assert torch.equal(batch.labels[b, q], answers)
    assert (batch.input_ids[:, 0] == 0).all()  # <bos> first
    assert batch.input_ids.shape == (16, task.seq_len)


def test_samples_are_seeded() -> None:
    task = get_task("toy-ioi")
    assert torch.equal(task.sample(4, 1).input_ids, task.sample(4, 1).input_ids)
    assert not torch.equal(task.sample(4, 1).input_ids, task.sample(4, 2).input_ids)


def test_bb_triggers_are_the_most_frequent_tokens() -> None:
    task = get_task("toy-bb")
    assert isinstance(task, BigramBackcopy)
    ranked = sorted(range(len(task.words)), key=lambda t: -task.stationary[t])
    assert sorted(ranked[: len(task.triggers)]) == task.triggers
    batch = task.sample(8, 0)
    b, q = batch.eval_mask.nonzero().unbind(1)
    assert all(int(t) - 3 in task.triggers for t in batch.input_ids[b, q])


def test_ioi_competitor_is_the_subject() -> None:
    batch = get_task("toy-ioi").sample(8, 0)
    b, q = batch.eval_mask.nonzero().unbind(1)
    wrong = batch.wrong[b, q]
    for i in range(len(b)):  # the subject appears twice before the final token, the IO once
        window = batch.input_ids[b[i], batch.source[b[i], q[i]] - 2 : q[i] + 1]
        assert int((window == wrong[i]).sum()) == 2
        assert int((window == batch.input_ids[b[i], q[i] + 1]).sum()) == 1


def test_unknown_toy_name_is_a_clear_error() -> None:
    with pytest.raises(TaskBuildError, match="unknown toy task 'toy-nope'"):
        get_task("toy-nope", kind="toy")
    with pytest.raises(UnknownModelError, match="trainable"):
        train_toy("toy-nope")


# ---------------------------------------------------------------------------------------------
# Training code


def test_train_toy_writes_a_loadable_checkpoint_deterministically(tmp_path) -> None:
    a = train_toy("toy-bb", tmp_path / "a", seed=3, steps=3, device="cpu")
    b = train_toy("toy-bb", tmp_path / "b", seed=3, steps=3, device="cpu")
    c = train_toy("toy-bb", tmp_path / "c", seed=4, steps=3, device="cpu")
    wa, wb, wc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "training.json"):
        assert (a / f).is_file()
    model = workbench.load(str(a), device="cpu")
    spec = SPECS["toy-bb"]
    assert (model.info.n_layers, model.info.n_heads, model.info.d_model) == (
        spec.n_layers,
        spec.n_heads,
        spec.d_model,
    )
    assert model.info.causal
    ids = model.tokenize("t5 t9 t1")
    assert ids.tolist() == [0, 8, 12, 4]  # <bos> then one id per word


@pytest.mark.slow
def test_training_learns_the_copy_rule() -> None:
    """A tiny BB model trained for a few hundred steps predicts the copies far above chance."""
    task = get_task("toy-bb")
    tiny = replace(SPECS["toy-bb"], n_layers=1, d_model=32, d_mlp=64, batch_size=16, lr=1e-2)
    model, record = train_model("toy-bb", seed=0, steps=300, device="cpu", log_every=0, spec=tiny)
    metrics = ev.task_metrics(model, task.sample(64, 10**12))
    assert record["final_train_loss"] < task.bigram_losses()["unigram"]
    assert metrics["accuracy"] > 0.5  # chance is 1/64


def test_cli_train_toy(tmp_path, capsys) -> None:
    assert main(["train-toy", "toy-ioi", "--out", str(tmp_path / "m"), "--steps", "2"]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert capsys.readouterr().out.strip() == f"toy model: {tmp_path / 'm'}"
    assert main(["train-toy", "toy-nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("workbench: error: unknown toy model 'toy-nope'")
    assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as stop:  # argparse refuses it before any work
        main(["train-toy", "toy-bb", "--steps", "0"])
    assert stop.value.code == 2
    assert "argument --steps: expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_bad_seed_and_foreign_out_dir_are_refused(tmp_path) -> None:
    with pytest.raises(WorkbenchError, match="seed"):
        train_model("toy-bb", seed=-1, steps=1, device="cpu")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(WorkbenchError, match="refusing to replace"):
        train_toy("toy-bb", tmp_path, steps=1, device="cpu")
    assert (tmp_path / "notes.txt").is_file()


# ---------------------------------------------------------------------------------------------
# Shipped checkpoints: loadable, accurate, and their ground-truth heads behave as the card says


@pytest.fixture(scope="module", params=TOY_NAMES)
def shipped(request):
    name = request.param
    heads = toy_cards.load_heads(name)
    model = workbench.load(name, device="cpu")
    t = heads["thresholds"]
    result = toy_cards.measure(name, model.hf, seed=t["sample_seed"], n=t["n_sequences"])
    return name, model, heads, result


def test_shipped_model_loads_with_its_info(shipped) -> None:
    name, model, heads, _ = shipped
    info = model.info
    assert (info.name, info.source, info.causal) == (name, "toy", True)
    for key in ("n_layers", "n_heads", "n_kv_heads", "d_head", "d_model"):
        assert getattr(info, key) == heads["model"][key]
    assert info.architecture == "LlamaForCausalLM"
    assert info.max_context == get_task(name).seq_len
    assert name in [m["name"] for m in workbench.list_models()]
    size = (MODELS_DIR / name / "model.safetensors").stat().st_size
    assert size < 8 * 2**20


def test_shipped_accuracy_on_fresh_samples(shipped) -> None:
    _, _, heads, result = shipped
    t = heads["thresholds"]
    assert result["metrics"]["accuracy"] >= t["accuracy_min"]
    if "logit_diff_min" in t:
        assert result["metrics"]["logit_diff"] >= t["logit_diff_min"]


def test_shipped_heads_attend_as_stated_and_matter_causally(shipped) -> None:
    _, _, heads, result = shipped
    tables = result["tables"]  # each [layer][head]
    for h in heads["thresholds"]["heads"]:
        layer, head = h["layer"], h["head"]
        assert tables[h["attention_key"]][layer][head] >= h["attention_min"], h
        drop = result["single_ablation"][f"{layer}.{head}"]["accuracy_drop"]
        assert drop >= h["accuracy_drop_min"], h
        # ...and more than zeroing any single non-ground-truth head
        controls = [result["single_ablation"][f"{cl}.{ch}"] for cl, ch in heads["control_heads"]]
        assert all(drop > c["accuracy_drop"] for c in controls), (h, controls)
    for role in result["roles"]:
        if role.get("random_control"):
            together = role["ablated_together"]["accuracy_drop"]
            assert together > role["random_control"]["accuracy_drop"] + 0.1, role


def test_shipped_ground_truth_is_stable(shipped) -> None:
    """Re-measuring on other samples finds the same heads in the same roles."""
    _, _, heads, result = shipped
    found = {(h["layer"], h["head"], h["role"]) for h in result["heads"]}
    stated = {(h["layer"], h["head"], h["role"]) for h in heads["heads"]}
    assert stated <= found


@pytest.mark.parametrize("name", TOY_NAMES)
def test_heads_json_validates_and_the_card_lists_its_heads(name: str) -> None:
    heads = toy_cards.load_heads(name)
    assert heads["name"] == name
    assert {h["role"] for h in heads["heads"]} <= {r.name for r in toy_cards.ROLES[name]}
    card = (MODELS_DIR / name / "CARD.md").read_text()
    for h in heads["heads"]:
        assert f"| {h['layer']}.{h['head']} | {h['role']} |" in card
    assert heads["training"]["command"] in card
    broken = json.loads(json.dumps(heads))
    del broken["heads"][0]["layer"]
    with pytest.raises(jsonschema.ValidationError):
        toy_cards.validate_heads(broken)


def test_bb_extreme_tokens_reproduce_the_card() -> None:
    """The card's extreme-token numbers come back when re-measured on the card's samples, and the
    value state at <bos> is the smallest (the value-state drain of Guo et al.)."""
    heads = toy_cards.load_heads("toy-bb")
    model = workbench.load("toy-bb", device="cpu")
    batch = get_task("toy-bb").sample(heads["evaluation"]["n_sequences"], EVAL_SEED)
    measured = ev.bb_extreme_tokens(model.hf, batch)
    for key, per_layer in heads["extreme_tokens"].items():
        assert measured[key] == pytest.approx(per_layer, rel=1e-3, abs=1e-4), key
    assert all(
        bos < other
        for bos, other in zip(measured["value_norm_bos"], measured["value_norm_other"], strict=True)
    )
