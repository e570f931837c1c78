"""Runs NVIDIA kvpress's own pipeline with a head map exported by the workbench.

This script runs in the separate kvpress environment (kvpress 0.5.5 pins transformers < 5.3, so
it cannot share the workbench's); it imports nothing of the workbench. ``test_kvpress.py`` builds
that environment and calls::

    <kvpress venv>/bin/python kvpress_client.py REQUEST.json RESULT.json

REQUEST: ``{"model_dir": HF directory, "max_new_tokens": n, "prompts": [{"context", "question"}],
"maps": {name: exported duo directory or null}}``, optionally ``"device"`` (default ``"cpu"``;
``benchmarks/smollm2_long.py`` runs it on ``"cuda"``); null runs the pipeline without a press.
RESULT: per map, the press's ``streaming_mask`` ``[n_layers, n_kv_heads]``, and per prompt the
answer, the context length the press compressed, and the KV entries it masked, as
``[layer, kv_head, first, end]`` runs of positions.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from kvpress import DuoAttentionPress
from transformers import pipeline


@dataclass
class ExportedDuoAttentionPress(DuoAttentionPress):
    """kvpress's DuoAttentionPress reading a pattern directory instead of downloading one of
    DuoAttention's six (``load_attention_pattern`` is the hook kvpress's own tests override).
    The loading repeats the body of kvpress's ``load_attention_pattern``: ``np.loadtxt`` with a
    tab delimiter, clip to [0, 1], ``sink_size`` and ``recent_size`` from ``config.json``.
    ``compress`` is kvpress's, with the compressed context's length recorded."""

    pattern_dir: str = ""
    context_lengths: list[int] = field(default_factory=list)

    def load_attention_pattern(self, model):
        config = json.loads(Path(self.pattern_dir, "config.json").read_text())
        path = Path(self.pattern_dir, "full_attention_heads.tsv")
        head_scores = np.loadtxt(path, dtype=float, delimiter="\t")
        head_scores = np.clip(head_scores, 0, 1)
        return config["sink_size"], config["recent_size"], head_scores

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        if module.layer_idx == 0:
            self.context_lengths.append(keys.shape[2])
        return super().compress(module, hidden_states, keys, values, attentions, kwargs)


def masked_runs(model) -> list[list[int]]:
    """The (layer, KV head, position) entries kvpress replaces by fake keys after the prefill
    (``module.masked_key_indices``, batch 0), as runs ``[layer, kv_head, first, end)``."""
    runs = []
    for layer, block in enumerate(model.model.layers):
        indices = getattr(block.self_attn, "masked_key_indices", None)
        if indices is None:
            continue
        _, heads, positions = (t.tolist() for t in indices)
        for head in sorted(set(heads)):
            at = sorted(p for h, p in zip(heads, positions, strict=True) if h == head)
            breaks = [i for i in range(1, len(at)) if at[i] != at[i - 1] + 1]
            for first, end in zip([0, *breaks], [*breaks, len(at)], strict=True):
                runs.append([layer, head, at[first], at[end - 1] + 1])
    return runs


def main(request_path: str, result_path: str) -> None:
    request = json.loads(Path(request_path).read_text())
    torch.manual_seed(0)
    pipe = pipeline(
        "kv-press-text-generation",
        model=request["model_dir"],
        device=request.get("device", "cpu"),
        dtype=torch.float32,
        model_kwargs={"attn_implementation": "sdpa"},
    )
    result = {}
    for name, pattern_dir in request["maps"].items():
        press = None
        if pattern_dir is not None:
            sparsity = json.loads(Path(pattern_dir, "config.json").read_text())["sparsity"]
            press = ExportedDuoAttentionPress(
                head_compression_ratio=sparsity, pattern_dir=pattern_dir
            )
        rows = []
        for prompt in request["prompts"]:
            answer = pipe(
                prompt["context"],
                question=prompt["question"],
                press=press,
                max_new_tokens=request["max_new_tokens"],
            )["answer"]
            rows.append(
                {
                    "answer": answer,
                    "context_length": press.context_lengths[-1] if press else None,
                    "masked": masked_runs(pipe.model) if press else [],
                }
            )
        mask = press.streaming_mask.cpu().tolist() if press else None
        result[name] = {"streaming_mask": mask, "prompts": rows}
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
