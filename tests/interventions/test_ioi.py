"""The seven-class rules and the circuit pipeline (interventions.ioi), on a tiny random model."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import workbench
from interventions.circuit import Circuit
from interventions.ioi import (
    AMBIGUOUS,
    CLASSES,
    GPT2_SMALL_IOI,
    NEGATIVE,
    OTHER,
    Rules,
    admit_greedily,
    ambiguity,
    classify,
    find_circuit,
)
from workbench.cli import main
from workbench.errors import InterventionError, TaskBuildError
from workbench.tasks.toy import IndirectObject
from workbench.toys.vocab import build_tokenizer

NEUTRAL = {
    "end_io": 0.0, "end_s1": 0.0, "end_s2": 0.0, "s2_s1": 0.0, "s2_s1p1": 0.0, "s1p1_s1": 0.0,
    "direct_effect": 0.0, "backup_gain": np.nan, "pp_nm_q": np.nan, "pp_sinh_v": np.nan,
    "pp_ind_k": np.nan,
}  # fmt: skip


def row(**values):
    return {**NEUTRAL, **values}


def test_each_rule_picks_its_class_and_nothing_else():
    r = Rules()
    cases = {
        "name mover": row(end_io=0.5, direct_effect=-0.2),
        "negative name mover": row(end_io=0.5, direct_effect=0.2),
        "backup name mover": row(end_io=0.5, backup_gain=0.1),
        "s-inhibition": row(end_s2=0.4, pp_nm_q=-0.1),
        "induction": row(s2_s1p1=0.4, pp_sinh_v=-0.1),
        "duplicate token": row(s2_s1=0.4, pp_sinh_v=-0.1),
        "previous token": row(s1p1_s1=0.6, pp_ind_k=-0.1),
        "": row(end_io=0.5),  # attends to IO but has no effect: no class
        "other": row(end_s2=0.6, direct_effect=-0.3),  # large effect, no class's attention
        "negative": row(direct_effect=0.3),  # pushes against the answer: never "other"
    }
    table = pd.DataFrame([cases[k] for k in cases], index=list(cases))
    assert classify(table, r).tolist() == list(cases)
    # Attention without the causal effect, or the effect without the attention: no class.
    assert classify(pd.DataFrame([row(s2_s1p1=0.4, pp_sinh_v=0.0)]), r).tolist() == [""]
    assert classify(pd.DataFrame([row(s2_s1p1=0.0, pp_sinh_v=-0.5)]), r).tolist() == [""]
    # NaN evidence (not measured) never satisfies a rule.
    assert r.matches(pd.Series(row(end_io=0.5, direct_effect=np.nan))) == []


def test_first_class_wins_and_thresholds_are_in_one_place():
    r = Rules()
    both = pd.Series(row(end_io=0.5, direct_effect=-0.2, backup_gain=0.3))
    assert r.matches(both) == ["name mover", "backup name mover"]
    assert classify(pd.DataFrame([both]), r).tolist() == ["name mover"]
    strict = Rules(attend_io=0.6)
    assert strict.matches(both) == []
    assert set(r.describe()) == {*CLASSES, OTHER, NEGATIVE, AMBIGUOUS}
    assert "0.6" in strict.describe()["name mover"]


def test_negative_heads_follow_the_sign_of_the_larger_effect():
    r = Rules()
    # Issue 16: heads writing against the answer (DLA -0.93, -1.58) were classed 'other'.
    cases = [
        (row(direct_effect=0.17, act_patch=0.05), NEGATIVE),
        (row(direct_effect=0.05, act_patch=-0.3), OTHER),  # total effect helps, and is larger
        (row(direct_effect=-0.05, act_patch=0.2), NEGATIVE),
        (row(direct_effect=0.05, act_patch=np.nan, attr_patch=0.2), NEGATIVE),
        (row(direct_effect=0.09, act_patch=-0.09), ""),  # both below other_effect
    ]
    table = pd.DataFrame([c for c, _ in cases])
    assert classify(table, r).tolist() == [expected for _, expected in cases]


def test_a_class_must_agree_with_the_strongest_evidence():
    # Issue 16: the head with the largest direct effect was classed S-inhibition.
    strong_direct = pd.Series(row(end_s2=0.6, pp_nm_q=-0.04, direct_effect=-0.34))
    assert Rules().matches(strong_direct)[0] == "s-inhibition"
    text = ambiguity(strong_direct, "s-inhibition")
    assert text == "s-inhibition by pp_nm_q -0.040, but direct_effect -0.340"
    assert ambiguity(pd.Series(row(pp_nm_q=-0.2, direct_effect=-0.1)), "s-inhibition") == ""
    # backup name movers are direct writers with small direct effects by definition
    backup = pd.Series(row(backup_gain=0.1, direct_effect=-0.3, pp_nm_q=np.nan))
    assert ambiguity(backup, "backup name mover") == ""
    assert ambiguity(pd.Series(row(pp_nm_q=-0.5)), OTHER) == ""  # no class, nothing to agree


def test_greedy_admission_adds_only_heads_that_make_the_circuit_more_faithful():
    # F(K) = sum of each kept head's contribution; the model's F(M) = 10 with every head.
    part = {(0, 0): 4.0, (0, 1): 3.0, (1, 0): 2.0, (1, 1): 2.0, (1, 2): -1.0}

    def score(heads):
        return sum(part[h] for h in set(heads))

    admitted, steps, left = admit_greedily(score, [(0, 0)], [(0, 1), (1, 0), (1, 1), (1, 2)], 10.0)
    # 0.4 -> 0.7 (0.1 adds 3) -> 0.9 (1.0 adds 2); then 1.1 would give 1.1, no closer to 1 than
    # 0.9, and the negative 1.2 would give 0.8: both stay out
    assert admitted == [(0, 1), (1, 0)]
    assert [(s["head"], round(s["before"], 2), round(s["after"], 2)) for s in steps] == [
        ("0.1", 0.4, 0.7),
        ("1.0", 0.7, 0.9),
    ]
    assert {x["head"]: round(x["faithfulness_if_added"], 2) for x in left} == {
        "1.1": 1.1,
        "1.2": 0.8,
    }
    assert admit_greedily(score, [(0, 0)], [], 10.0) == ([], [], [])


def test_published_gpt2_classes_cover_the_seven_classes():
    assert set(GPT2_SMALL_IOI) == set(CLASSES)
    assert (9, 9) in GPT2_SMALL_IOI["name mover"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ioi-tiny")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(IndirectObject().words),
        bos_token="<bos>", pad_token="<pad>", unk_token="<unk>",
    )  # fmt: skip
    tok.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, pad_token_id=1, eos_token_id=None,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return path


# Seed 5 gives prompts on which the random tiny model prefers IO (mean logit difference > 0).
LOOSE = Rules(attend_io=0.0, attend_s2=0.0, attend_induction=0.0, attend_duplicate=0.0,
              attend_previous=0.0, direct_effect=0.0, backup_gain=0.0, path_effect=0.0)  # fmt: skip


def test_pipeline_runs_every_step_and_round_trips(tiny_dir):
    model = workbench.load(str(tiny_dir))
    circuit = find_circuit(model, task="ioi-toy", n=6, seed=5, templates=[0], rules=LOOSE)
    table = pd.DataFrame(circuit.evidence)
    assert len(table) == model.info.n_layers * model.info.n_heads
    for column in ["dla", "direct_effect", "act_patch", "attr_patch", "end_io", "s2_s1p1",
                   "pp_nm_q", "backup_gain", "class"]:  # fmt: skip
        assert column in table
    # Every head was exactly activation-patched (12 heads < exact_heads).
    assert table["act_patch"].notna().all()
    # With every threshold at zero, name movers appear and path patching into them ran.
    assert circuit.by_class().get("name mover")
    assert table["pp_nm_q"].notna().any()
    assert circuit.metrics["clean_logit_diff"] > 0
    assert 0 <= circuit.metrics["n_prompts"] == 6
    assert "completeness" in circuit.metrics and "minimality" in circuit.metrics
    m = circuit.metrics
    for key in ("faithfulness", "faithfulness_class_circuit", "faithfulness_complement"):
        assert np.isfinite(m[key]), key
    assert set(m["minimality"]) == {h.name for h in circuit.heads}
    # every head outside the seven classes is 'other' or 'negative', in only when admitted
    admitted = {s["head"] for s in m["greedy"]}
    for h in circuit.heads:
        if h.role in (OTHER, NEGATIVE):
            assert h.name in admitted
    assert table.loc[table["in_circuit"], "class"].ne("").all()
    assert all(s["after"] != s["before"] for s in m["greedy"])
    again = Circuit.from_json(circuit.to_json())
    assert again.to_dict() == json.loads(circuit.to_json())


def test_a_model_that_fails_the_task_is_refused(tiny_dir):
    model = workbench.load(str(tiny_dir))
    with pytest.raises(InterventionError, match="does not solve"):
        find_circuit(model, task="ioi-toy", n=6, seed=2, templates=[0], checks=False)
    with pytest.raises(TaskBuildError, match="unknown templated task 'needle'"):
        find_circuit(model, task="needle", n=6)  # a registered task, but not a templated one


def test_cli_prints_classes_and_writes_the_circuit(tiny_dir, tmp_path, capsys):
    out = tmp_path / "c.json"
    run = tmp_path / "run.h5"
    rules = [f"--rule={k}=0" for k in ("attend_io", "direct_effect", "path_effect")]
    code = main(["ioi", str(tiny_dir), "--task", "ioi-toy", "--n", "6", "--seed", "5",
                 "--templates", "0", "--no-checks", "--quiet", "--out", str(out),
                 "--run", str(run), *rules])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "name mover" in printed and "keeps" in printed
    circuit = Circuit.load(out)
    assert Circuit.from_run(run, "ioi-toy").to_dict() == circuit.to_dict()
    code = main(["ioi", str(tiny_dir), "--rule", "attend_iox=1", "--quiet"])
    assert code == 2
    assert "attend_iox" in capsys.readouterr().err
