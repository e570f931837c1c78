"""End-to-end cost of the streamed capture path on a Llama-2-7B-shaped model.

``python -m benchmarks.e2e_streamed [--length 32768]`` (CUDA GPU) builds LlamaForCausalLM with
the Llama-2-7B shape (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000) and
random bf16 weights directly on the GPU, then times one forward pass of ``length`` tokens
(``logits_to_keep=1``):

- ``plain``: attention through SDPA (``attn_implementation="sdpa"``);
- ``streamed``: under `workbench.capture.StreamedRecorder` with its defaults (sink 4, recent
  window 256, one 64-token span), per-query statistics of every layer copied to the CPU;
- ``streamed, output=kernel`` / ``output=sdpa``: the same with each layer's output taken from
  the fused stats+output kernel, or from SDPA with a separate statistics pass;
- ``streamed mean``: ``reduce="mean"`` (per-head means only);
- ``streamed + received``: per-query statistics plus received attention per key;
- ``streamed, last 64 queries only``: statistics of the last 64 queries (e.g. answer tokens)
  over all keys (default output, and ``output=kernel``).

Times are wall-clock milliseconds (median of ``--repeats`` after a warm-up) until the logits and,
for the streamed variants, every layer's statistics are on the CPU. It writes
``benchmarks/results/<device>-e2e.json`` and the table between the e2e markers in
``docs/benchmarks.md``. ``--check`` compares the streamed statistics of a tiny Llama with eager
patterns; ``--device cpu --layers 1 --length 64`` is a dry run of the script on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kernels import stats_from_pattern
from workbench.atomic import atomic_write_text
from workbench.capture import StreamedRecorder

ROOT = Path(__file__).resolve().parent.parent
MARK_START, MARK_END = "<!-- e2e:start -->", "<!-- e2e:end -->"


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median wall milliseconds over ``repeats`` runs after one warm-up (each run ends with its
    results on the CPU), and the peak GiB of GPU memory beyond what was allocated before."""
    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else math.nan
    return statistics.median(times), peak


def check(device: str) -> bool:
    """A tiny random Llama (fp32, GQA, padding): streamed statistics against the eager attention
    patterns, through the Triton kernels on a GPU (the torch reference on the CPU)."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 64, (2, 300), device=device)
    mask = torch.ones_like(ids)
    mask[0, :37] = 0
    kw = dict(sink_size=2, recent_window=16, spans=[[40, 60]])
    worst = 0.0
    # padded (the fused kernel gives the output), then unpadded with either output source
    for padded, output in ((True, "auto"), (False, "kernel"), (False, "sdpa")):
        attention_mask = mask if padded else torch.ones_like(mask)
        with torch.no_grad():
            out = model(ids, attention_mask=attention_mask, output_attentions=True)
            with StreamedRecorder(model, output=output, **kw) as rec:
                logits = model(ids, attention_mask=attention_mask).logits
        real = attention_mask.bool()
        case = (logits[real] - out.logits[real]).abs().max().item()
        for st, pattern in zip(rec.stats, out.attentions, strict=True):
            want = stats_from_pattern(pattern, key_padding_mask=real, causal=True, **kw)
            want = want.to("cpu")
            for name in ("entropy", "max_prob", "sink_mass", "span_mass", "outside_mass"):
                case = max(case, (getattr(st, name) - getattr(want, name)).abs().max().item())
            agree = (st.argmax == want.argmax).float().mean().item()
        print(f"padded={padded} output={output}: worst {case:.2e}, argmax agreement {agree:.4f}")
        worst = max(worst, case)
    print(f"streamed check on {_device_name(device)}: worst abs error {worst:.2e}")
    return worst <= 1e-4


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32, help="fewer for a dry run")
    parser.add_argument("--device", default="cuda", help="'cpu' for a dry run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--check", action="store_true", help="a small agreement check only")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    if args.check:
        return 0 if check(args.device) else 1
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
        max_position_embeddings=args.length,
    )  # fmt: skip
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 32000, (1, args.length), device=args.device)
    kw = dict(sink_size=4, recent_window=256, spans=[[args.length // 3, args.length // 3 + 64]])

    def plain():
        return model(ids, logits_to_keep=1).logits

    def recorded(**extra):
        def run():
            with StreamedRecorder(model, **kw, **extra) as rec:
                logits = model(ids, logits_to_keep=1).logits
            return logits, rec.stats  # .stats waits for the copies to the CPU

        return run

    last = list(range(args.length - 64, args.length))
    variants = {
        "plain": plain,
        "streamed": recorded(),
        "streamed, output=kernel": recorded(output="kernel"),
        "streamed, output=sdpa": recorded(output="sdpa"),
        "streamed mean": recorded(reduce="mean"),
        "streamed + received": recorded(received=True),
        "streamed, last 64 queries only": recorded(q_positions=last),
        "streamed, last 64 queries only, output=kernel": recorded(
            q_positions=last, output="kernel"
        ),
    }
    rows = []
    drift = {}  # largest |logit difference| against plain, per output source
    with torch.no_grad():
        reference = plain()
        for output in ("kernel", "sdpa"):
            logits, stats = recorded(output=output)()
            drift[output] = (logits.float() - reference.float()).abs().max().item()
            assert len(stats) == args.layers and stats[0].entropy.shape == (1, 32, args.length)
            assert all(bool(torch.isfinite(st.entropy).all()) for st in stats)
            del logits, stats
        for name, fn in variants.items():
            ms, peak = _time(fn, args.repeats)
            rows.append({"variant": name, "ms": ms, "peak_extra_gib": peak})
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        row["ratio_to_plain"] = row["ms"] / rows[0]["ms"]
    command = "python -m benchmarks.e2e_streamed"
    if args.length != 32768:
        command += f" --length {args.length}"
    if args.layers != 32:
        command += f" --layers {args.layers}"
    streamed_ratio = rows[1]["ratio_to_plain"]
    result = {
        "device_name": _device_name(args.device),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": command,
        "length": args.length,
        "model": f"LlamaForCausalLM, Llama-2-7B shape ({args.layers} layers), random bf16 weights",
        "recorder": {**kw, "spans": "one 64-token span at L/3"},
        "default_output": "auto: the fused kernel when every query is recorded on CUDA, else SDPA",
        "max_abs_logit_diff_vs_plain": drift,
        "target": {"streamed ≤ 1.3× plain": streamed_ratio, "met": streamed_ratio <= 1.3},
        "rows": rows,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", result["device_name"].lower()).strip("-")
    atomic_write_text(args.out / f"{slug}-e2e.json", json.dumps(result, indent=1))
    write_docs(result, args.docs)
    print(json.dumps(result, indent=1))
    return 0


def write_docs(result: dict, path: Path) -> None:
    lines = [
        f"Device: **{result['device_name']}**, torch {result['torch']}, {result['date']}. "
        f"{result['model']}, {result['length']} tokens, `logits_to_keep=1`.",
        f"Command: `{result['command']}`",
        "",
        "| variant | ms | × plain | peak memory beyond weights + inputs |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | {r['ms']:.0f} | {r['ratio_to_plain']:.2f}× "
            f"| {r['peak_extra_gib']:.2f} GiB |"
        )
    lines.append("")
    met = "met" if result["target"]["met"] else "NOT met"
    ratio = result["target"]["streamed ≤ 1.3× plain"]
    lines.append(f"Target streamed ≤ 1.3× plain: {met} ({ratio:.2f}×).")
    lines.append("")
    drift = result["max_abs_logit_diff_vs_plain"]
    lines.append(
        "Largest |logit difference| against plain (bf16): "
        f"{drift['kernel']:.3g} with the fused kernel's output, {drift['sdpa']:.3g} with SDPA's."
    )
    block = MARK_START + "\n" + "\n".join(lines) + "\n" + MARK_END
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if MARK_START in text:
        pre, rest = text.split(MARK_START, 1)
        text = pre + block + rest.split(MARK_END, 1)[1]
    else:
        text += "\n" + block + "\n"
    atomic_write_text(path, text)


if __name__ == "__main__":
    raise SystemExit(main())
