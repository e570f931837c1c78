"""Training code for the toy reference models: a small LlamaForCausalLM (RoPE) per task.

`train_toy(name)` reproduces a shipped checkpoint from its seed: the task generator, the model
initialisation and the batch order are all derived from that seed. Batches are drawn fresh at
every step, so the model never sees the samples the card and the tests evaluate on (those use
seeds from `EVAL_SEED` upward). Loss placement is a per-task choice documented in
`workbench/tasks/toy.py`: every next token for Bigram-Backcopy and IOI (language modelling),
answers only for recall.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from workbench.atomic import atomic_dir
from workbench.errors import UnknownModelError, WorkbenchError
from workbench.tasks import get_task
from workbench.tasks.toy import IGNORE, ToyTask
from workbench.toys.vocab import BOS, PAD, SPECIALS, build_tokenizer, save_tokenizer

MODELS_DIR = Path(__file__).resolve().parents[2] / "data" / "models"
BATCH_SEEDS_PER_SEED = (
    100_000  # training batch `step` of seed `s` is drawn with seed s * this + step
)
MAX_SEED = 1_000_000
EVAL_SEED = BATCH_SEEDS_PER_SEED * MAX_SEED  # evaluation samples use seeds >= this


@dataclass(frozen=True)
class ToySpec:
    """Architecture and optimiser settings of one toy model."""

    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup: int = 100


SPECS: dict[str, ToySpec] = {
    # Guo et al. train 1-3 layers with 1 head per layer (dim 256, AdamW lr 3e-4, wd 1e-4, batch 512,
    # 10k steps); d_model 64 and a higher rate keep CPU training to minutes. Three layers give the
    # causal test non-ground-truth heads to compare the copy head with.
    "toy-bb": ToySpec(3, 1, 64, 256, steps=1500, batch_size=32, lr=3e-3, weight_decay=1e-4),
    "toy-recall": ToySpec(3, 2, 64, 256, steps=1500, batch_size=32, lr=3e-3, weight_decay=1e-4),
    "toy-ioi": ToySpec(2, 4, 64, 256, steps=1500, batch_size=32, lr=1e-3, weight_decay=1e-4),
}
TOY_NAMES: tuple[str, ...] = tuple(SPECS)


def build_model(task: ToyTask, spec: ToySpec) -> LlamaForCausalLM:
    """A freshly initialised Llama model sized for `task` (call after seeding torch)."""
    config = LlamaConfig(
        vocab_size=len(SPECIALS) + len(task.words),
        hidden_size=spec.d_model,
        intermediate_size=spec.d_mlp,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_heads,
        max_position_embeddings=task.seq_len,
        rope_theta=10_000.0,
        bos_token_id=SPECIALS.index(BOS),
        pad_token_id=SPECIALS.index(PAD),
        eos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_factor(step: int, spec: ToySpec) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak rate."""
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def train_model(
    name: str,
    *,
    seed: int = 0,
    steps: int | None = None,
    device: str | None = None,
    log_every: int = 100,
    spec: ToySpec | None = None,
) -> tuple[LlamaForCausalLM, dict[str, object]]:
    """Train the toy model `name` in memory; returns the model (on CPU) and a training record.

    `spec` replaces the shipped architecture and optimiser settings (tests train tiny models)."""
    if not 0 <= seed < MAX_SEED:
        raise WorkbenchError(f"seed must be in [0, {MAX_SEED}), not {seed}")
    task, spec = get_task(name, kind="toy"), spec or SPECS[name]
    steps = spec.steps if steps is None else steps
    spec = ToySpec(**{**asdict(spec), "steps": steps, "warmup": min(spec.warmup, steps // 4 + 1)})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError(f"device {device!r} was asked for but CUDA is not available here")
    _seed_everything(seed)
    model = build_model(task, spec).to(device)
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, spec))
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(steps):
        # Batch seeds never reach EVAL_SEED, so training and evaluation samples are disjoint draws.
        batch = task.sample(spec.batch_size, seed * BATCH_SEEDS_PER_SEED + step)
        logits = model(input_ids=batch.input_ids.to(device)).logits
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch.labels.to(device).flatten(), ignore_index=IGNORE
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            recent = float(np.mean(losses[-log_every:]))
            print(f"{name} step {step + 1}/{steps} loss {recent:.4f}", file=sys.stderr, flush=True)
    record: dict[str, object] = {
        "name": name,
        "seed": seed,
        "steps": steps,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "wall_time_s": round(time.perf_counter() - start, 1),
        "final_train_loss": round(float(np.mean(losses[-min(50, steps) :])), 4),
        "spec": asdict(spec),
    }
    model.eval()
    return model.cpu(), record


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "training.json").is_file():
        raise WorkbenchError(f"refusing to replace {out_dir}: it is not a toy model checkpoint")


def save_toy(model: LlamaForCausalLM, name: str, record: dict[str, object], out_dir: Path) -> None:
    """Write the HF-format checkpoint atomically: build it in a sibling temp dir, then rename."""
    task = get_task(name, kind="toy")
    _check_replaceable(out_dir)
    # A new checkpoint invalidates the old card and heads.json, so the old directory goes
    # entirely (rebuild them with `python -m workbench.toys.cards NAME`).
    with atomic_dir(out_dir, replace=True) as tmp:
        model.config._attn_implementation = "eager"  # what loading picks unless told otherwise
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            hf_logging.enable_progress_bar()
        save_tokenizer(build_tokenizer(task.words), tmp, model_max_length=task.seq_len)
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def train_toy(
    name: str,
    out_dir: str | Path | None = None,
    seed: int = 0,
    steps: int | None = None,
    device: str | None = None,
) -> Path:
    """Train toy model `name` from `seed` and save it (HF format) to `out_dir`.

    `out_dir` defaults to data/models/<name> in the repository. `steps` defaults to the shipped
    model's step count; `device` to CUDA when present, else CPU. Returns the checkpoint directory.
    """
    if name not in SPECS:
        raise UnknownModelError(f"unknown toy model {name!r} (trainable: {', '.join(TOY_NAMES)})")
    out_dir = Path(out_dir) if out_dir is not None else MODELS_DIR / name
    _check_replaceable(out_dir)  # before minutes of training, not after
    model, record = train_model(name, seed=seed, steps=steps, device=device)
    save_toy(model, name, record, out_dir)
    return out_dir
