import numpy as np
import pandas as pd
import pytest
import torch

from probes.dormant import (
    DORMANT_THRESHOLD,
    DormantProbe,
    column_entropy,
    domain_figure,
    domain_statistics,
    domain_table,
    row_entropy,
)
from workbench.errors import PromptSetError
from workbench.scanner import scan
from workbench.tasks import PromptSet
from workbench.tasks.domains import domain_inputs, domain_token_ids


def guo_row(attn):  # their row_headwise_average_normalized_entropy, written out
    probs = attn / attn.sum(-1, keepdim=True)
    ent = torch.where(probs > 0, -probs * probs.log(), 0.0).sum(-1)
    norm = torch.log(torch.arange(1, attn.shape[-1] + 1).float())
    return torch.where(norm > 0, ent / norm, 0.0).mean(-1)


def guo_column(attn):  # their column_headwise_maximum_normalized_entropy, written out
    probs = torch.where(attn > 0, attn / attn.sum(-2, keepdim=True), 0.0)
    ent = torch.where(probs > 0, -probs * probs.log(), 0.0).sum(-2)
    norm = torch.log(attn.shape[-2] - torch.arange(0, attn.shape[-2]).float())
    return torch.where(norm > 0, ent / norm, 0.0).max(-1).values


def test_entropies_match_guo_et_al():
    torch.manual_seed(0)
    scores = torch.randn(3, 7, 7).masked_fill(torch.ones(7, 7).triu(1).bool(), -torch.inf)
    attn = scores.softmax(-1)  # [head, q_pos, k_pos]
    attn[1] = 0
    attn[1, :, 0] = 1  # a perfect sink head
    torch.testing.assert_close(row_entropy(attn, causal=True), guo_row(attn))
    torch.testing.assert_close(column_entropy(attn, causal=True), guo_column(attn))
    assert row_entropy(attn, causal=True)[1] == 0


def test_domain_statistics_agree_across_paths(tiny_model):
    ids = torch.as_tensor(domain_token_ids(tiny_model.tokenizer, "synthetic", n_prompts=1,
                                           n_tokens=30)[0])  # fmt: skip
    pattern = domain_statistics(tiny_model, ids, path="pattern")
    streamed = domain_statistics(tiny_model, ids, path="streamed")
    assert set(pattern) == {"sink_mass", "row_entropy", "column_entropy"}
    for name in streamed:
        np.testing.assert_allclose(streamed[name], pattern[name], atol=1e-5, err_msg=name)


def test_active_dormant_flip_margin():
    mass = {"prose": np.array([[0.9, 0.2, 0.6, 0.55]]), "code": np.array([[0.1, 0.3, 0.7, 0.45]])}
    two = {d: np.stack([m - 0.01, m + 0.01]) for d, m in mass.items()}  # two prompts a domain
    stats = {f"dormant_{d}": {"sink_mass": m, "row_entropy": m} for d, m in two.items()}
    tables = {t.name: t for t in DormantProbe().score(stats)}
    flip = tables["active_dormant"]
    np.testing.assert_allclose(flip.values, [[0.4, -0.2, -0.1, 0.05]], atol=1e-6)
    assert flip.selected.tolist() == [[True, False, False, False]]  # 0.55 / 0.45 is no flip
    # the margin's interval comes from resampling each domain's prompts: within +-0.01
    assert 0.385 <= flip.interval.low[0, 0] < 0.4 < flip.interval.high[0, 0] <= 0.415
    assert flip.interval.n_trials.tolist() == [[2, 2, 2, 2]]
    one = {f"dormant_{d}": {"sink_mass": m[None]} for d, m in mass.items()}  # one prompt each
    alone = {t.name: t for t in DormantProbe().score(one)}["active_dormant"]
    assert not alone.selected.any() and alone.tentative.tolist() == [[True, False, False, False]]
    assert tables["sink_mass_prose"].label == "dormant_prose"
    assert tables["sink_mass_prose"].threshold == DORMANT_THRESHOLD
    frame = domain_table(tables)
    assert frame.loc[0, "dormant_on"] == "prose" and frame.loc[0, "active_on"] == "code"
    assert frame.loc[2, "dormant_on"] == "prose,code" and frame.loc[2, "active_on"] == ""
    assert len(domain_figure(tables).data) == 2


def test_dormant_probe_with_a_prompt_file_domain(tiny_model, prompt_file):
    result = scan(
        tiny_model, PromptSet("p", ("a",)), probes="dormant", progress=False,
        options={"dormant_domains": f"synthetic,{prompt_file}", "dormant_tokens": 20,
                 "dormant_prompts": 2},
    )  # fmt: skip
    stem = prompt_file.stem
    assert {"sink_mass_synthetic", f"sink_mass_{stem}", f"column_entropy_{stem}",
            "active_dormant"} <= set(result.tables)  # fmt: skip
    assert isinstance(domain_table(result.tables), pd.DataFrame)


def test_domain_inputs(tiny_model, prompt_file):
    name, ids = domain_inputs(tiny_model.tokenizer, str(prompt_file), n_prompts=2, n_tokens=5)
    assert name == prompt_file.stem and [len(i) for i in ids] == [5, 5] and ids[0][0] == 1
    with pytest.raises(PromptSetError, match="neither one of"):
        domain_inputs(tiny_model.tokenizer, "poetry", n_prompts=1, n_tokens=5)
