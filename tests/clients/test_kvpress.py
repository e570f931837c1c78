"""A real serving client: NVIDIA kvpress runs a head map exported by the workbench.

kvpress 0.5.5 pins transformers < 5.3, so it gets its own environment, built once under the
workbench's cache directory (``<cache>/kvpress-venv``, reused while its pins match) from PyPI and
the CPU torch wheel. ``kvpress_client.py`` runs kvpress's own pipeline there, in a subprocess, on
the built-in SmolLM2 (the Hugging Face directory the workbench dequantized it into), with a
``DuoAttentionPress`` subclass that loads our exported ``duo`` directory.

The map is the real pipeline's: a short retrieval scan (the probe's teacher-forced variant, four
512-token needle trials), exported as ``duo`` with the top 20% of KV heads full and DuoAttention's
policy for the others (4 sink and 256 recent tokens). The needle prompts are not the scan's trials
(1024 tokens, other haystacks); their needles lie before the recent window.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from workbench.export import export, select_full
from workbench.headmap import HeadMap, Policy
from workbench.models import cache_dir
from workbench.scanner import scan
from workbench.scores import ScoreTable
from workbench.store import open_run
from workbench.tasks import PromptSet
from workbench.tasks.needle import QUESTION_TEMPLATE, needle_grid, rouge1_recall

pytestmark = pytest.mark.slow

TORCH = "torch==2.13.0"  # the CPU wheel pip finds on disk; kvpress asks for torch>=2.3.1,<3
KVPRESS = ("kvpress==0.5.5", "transformers==5.2.0")  # kvpress 0.5.5: transformers>=4.56,<5.3
CLIENT = Path(__file__).with_name("kvpress_client.py")
SINK, RECENT = Policy().sink_size, Policy().recent_size  # 4 and 256, DuoAttention's
FULL_FRACTION = 0.2
RANDOM_SEEDS = (1, 2)
# the first two needles (Beijing, magic number) at depths 0.1 and 0.4 of 1024 tokens, seeds
# 11-14 (the scan's trials use seeds 0-3)
LENGTH, DEPTHS, NEEDLES, SEED = 1024, (0.1, 0.4), 2, 11
MAX_NEW_TOKENS = 24
QUIET = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def kvpress_python() -> Path:
    """The kvpress environment's interpreter; built on first use (about a minute and 1.5 GB)."""
    venv = cache_dir() / "kvpress-venv"
    python, stamp = venv / "bin" / "python", venv / "installed.txt"
    pins = "\n".join((TORCH, *KVPRESS)) + "\n"
    if stamp.is_file() and stamp.read_text() == pins:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH], check=True)  # first, so that kvpress's range takes no other
    subprocess.run([*pip, *KVPRESS], check=True)
    stamp.write_text(pins)
    return python


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    """Scan, export the maps, run kvpress on them; everything the tests below look at."""
    python = kvpress_python()
    tmp = tmp_path_factory.mktemp("kvpress")
    scan(
        smollm2,
        PromptSet("none", ["x"]),
        probes="retrieval",
        out=tmp / "run.h5",
        options={
            "retrieval_variant": "forced",
            "retrieval_lengths": [512],
            "retrieval_depths": [0.25, 0.5],
            "retrieval_needles": 2,
        },
        progress=False,
    )
    with open_run(tmp / "run.h5") as run:
        headmap = HeadMap.from_run(run, Policy(sink_size=SINK, recent_size=RECENT))
    shape = headmap.tables["retrieval"].values.shape
    for seed in RANDOM_SEEDS:  # random KV scores, so the top share is a random map of that size
        values = np.random.default_rng(seed).random(shape).astype(np.float32)
        headmap.tables[f"random-{seed}"] = ScoreTable(f"random-{seed}", values, "random")
    selections, maps = {}, {"none": None}
    for name in ("retrieval", *(f"random-{seed}" for seed in RANDOM_SEEDS)):
        selections[name] = select_full(headmap, score=name, full_fraction=FULL_FRACTION)
        export(headmap, "duo", tmp / name, score=name, full_fraction=FULL_FRACTION)
        maps[name] = str(tmp / name)
    export(headmap, "duo", tmp / "full", full_fraction=1.0)
    maps["full"] = str(tmp / "full")

    tokenizer = smollm2.tokenizer
    trials = needle_grid(tokenizer, [LENGTH], list(DEPTHS), NEEDLES, seed=SEED)
    prompts, n_context_tokens = [], []
    for trial in trials:  # the haystack with its needle is the context; the question follows
        tail = QUESTION_TEMPLATE.format(question=trial.question)
        n_context_tokens.append(
            len(trial.token_ids) - len(tokenizer(tail, add_special_tokens=False)["input_ids"])
        )
        context = tokenizer.decode(trial.token_ids[: n_context_tokens[-1]])
        question = f"Based on the content of the book, Question: {trial.question}"
        prompts.append({"context": context, "question": question})
    request = {
        "model_dir": str(smollm2.hf.name_or_path),
        "max_new_tokens": MAX_NEW_TOKENS,
        "prompts": prompts,
        "maps": maps,
    }
    (tmp / "request.json").write_text(json.dumps(request))
    subprocess.run(
        [str(python), str(CLIENT), str(tmp / "request.json"), str(tmp / "result.json")],
        check=True,
        env={**os.environ, **QUIET},
        timeout=1200,
    )
    result = json.loads((tmp / "result.json").read_text())
    return {
        "selections": selections,
        "result": result,
        "trials": trials,
        "n_context_tokens": n_context_tokens,
    }


def test_the_press_streams_exactly_the_maps_streaming_heads(served):
    for name, selection in served["selections"].items():
        mask = np.asarray(served["result"][name]["streaming_mask"])  # [n_layers, n_kv_heads]
        assert mask.shape == selection.kv_full.shape
        assert (mask == ~selection.kv_full).all(), name
        assert selection.kv_full.sum() == round(FULL_FRACTION * selection.kv_full.size)


def test_masked_keys_are_the_streaming_heads_outside_sink_and_recent(served):
    """kvpress hides, after the prefill, exactly the keys of streaming KV heads at context
    positions [sink, context_length - recent); each needle lies there."""
    for name, selection in served["selections"].items():
        streaming = np.argwhere(~selection.kv_full)  # [n_streaming, 2]: layer, KV head
        for prompt in served["result"][name]["prompts"]:
            n = prompt["context_length"]
            expected = [[int(layer), int(kv), SINK, n - RECENT] for layer, kv in streaming]
            assert prompt["masked"] == expected, name
    prompts = served["result"]["retrieval"]["prompts"]
    for trial, prompt, ours in zip(
        served["trials"], prompts, served["n_context_tokens"], strict=True
    ):
        shift = prompt["context_length"] - ours  # kvpress's chat template comes first
        assert shift >= 0 and trial.needle_span[1] + shift < prompt["context_length"] - RECENT


def test_an_all_full_map_reproduces_the_unpressed_answers(served):
    full, none = (served["result"][k]["prompts"] for k in ("full", "none"))
    assert all(p["masked"] == [] and p["context_length"] > SINK + RECENT for p in full)
    assert [p["answer"] for p in full] == [p["answer"] for p in none]


def recalls(served, name: str) -> list[float]:
    """Per prompt: the ROUGE-1 recall of the needle's answer in the map's answer."""
    prompts = served["result"][name]["prompts"]
    return [
        rouge1_recall(trial.answer, prompt["answer"])
        for trial, prompt in zip(served["trials"], prompts, strict=True)
    ]


def answered(served, name: str) -> list[bool]:
    """Per prompt: recall above 0.5, the retrieval probe's rule."""
    return [r > 0.5 for r in recalls(served, name)]


def test_the_retrieval_map_answers_where_random_maps_of_its_size_do_not(served):
    for name in served["result"]:  # shown with pytest -s (docs/export.md quotes it)
        print(f"{name:>10}: answered {sum(answered(served, name))}/{len(served['trials'])}, "
              f"recall {[round(r, 2) for r in recalls(served, name)]}")  # fmt: skip
    assert all(answered(served, "none"))
    assert sum(answered(served, "retrieval")) >= 3
    for seed in RANDOM_SEEDS:
        assert not any(answered(served, f"random-{seed}"))
