"""Scaling past one GPU: data-parallel scan throughput (1 vs N GPUs) and a model sharded over GPUs.

``python -m benchmarks.scaling_bench --results DIR`` (a machine with 2+ CUDA GPUs):

1. builds a random-weight Llama of TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads,
   4 KV heads, intermediate 5632, vocab 32000; bf16) as a Hugging Face directory with a
   word-level tokenizer, and ``--prompts`` prompts of ``--length`` tokens of random words;
2. **data parallel**: for N in 1 and ``--gpus``, ``torchrun --nproc-per-node N`` runs this file's
   ``worker``, which loads the model on ``cuda:LOCAL_RANK``, warms the kernels up on one prompt,
   then times ``workbench.scan(..., probes="sink,entropy", path="streamed", out=...)`` between
   two barriers: every rank's share, the merge of the parts and the published run file. The
   N-GPU run file must equal the 1-GPU one (largest absolute difference of every statistic and
   score is reported). The same scans through the CLI (``torchrun ... -m workbench scan``) are
   timed end to end (process start, model load, scan) as a user runs them;
3. **sharded**: the model loaded with ``device_map="balanced"`` over all GPUs; per GPU the
   weight memory, and the streamed statistics of ``--sharded-prompts`` prompts against the same
   model on one GPU (largest absolute difference, milliseconds per prompt).

Random weights make the statistics meaningless as findings but cost what real ones of this shape
cost. It writes ``DIR/scaling-<device>.json``. ``--report FILE.json`` copies a result into
``benchmarks/results/`` and rewrites the table between the scaling markers of
``docs/benchmarks.md``. ``--device cpu --tiny`` is a dry run of the whole script on the CPU (gloo,
2 processes; no sharded part).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from workbench import distributed
from workbench.capture import head_statistics
from workbench.models import load
from workbench.scanner import scan
from workbench.store import open_run
from workbench.tasks import load_prompts

ROOT = Path(__file__).resolve().parent.parent
MARK_START, MARK_END = "<!-- scaling:start -->", "<!-- scaling:end -->"
PROBES, PATH = "sink,entropy", "streamed"
SHAPE = dict(  # TinyLlama-1.1B
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
)


def build_model(target: Path, shape: dict, length: int, device: str) -> None:
    """A random-weight Llama (bf16) with a word-level tokenizer ``w0 .. w{vocab-3}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = shape["vocab_size"] - 2
    vocab = {"<unk>": 0, "<bos>": 1, **{f"w{i}": i + 2 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>")
    config = LlamaConfig(**shape, max_position_embeddings=2 * length, bos_token_id=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(target)
    fast.save_pretrained(target)


def write_prompts(path: Path, n: int, length: int, vocab_size: int) -> None:
    """``n`` prompts of ``length`` tokens (``<bos>`` + random words), as JSON lines."""
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for _ in range(n):
            words = rng.integers(0, vocab_size - 2, size=length - 1)
            f.write(json.dumps({"text": " ".join(f"w{w}" for w in words)}) + "\n")


def worker(args: argparse.Namespace) -> None:
    """Under torchrun: load on this rank's device, warm up, time one scan between barriers."""
    import torch.distributed as dist

    ranks = distributed.init_from_env()
    device = distributed.rank_device(ranks, None if args.device == "cuda" else args.device)
    start = time.perf_counter()
    model = load(str(args.model), device=device, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    prompts = load_prompts(str(args.prompts))
    head_statistics(model, model.tokenize(prompts.texts[0]), path=PATH)  # compile the kernels
    start = time.perf_counter()  # what every rank repeats inside scan (the probes tokenize all)
    tokens = sum(len(model.tokenize(t)) for t in prompts.texts)
    tokenize_s = time.perf_counter() - start
    if ranks.world_size > 1:
        dist.barrier()
    start = time.perf_counter()
    scan(model, prompts, probes=PROBES, path=PATH, out=args.run_file, batch_size=8, progress=False)
    if ranks.world_size > 1:
        dist.barrier()
    scan_s = time.perf_counter() - start
    if ranks.is_main:
        result = {
            "gpus": ranks.world_size,
            "prompts": len(prompts.texts),
            "tokens": tokens,
            "load_s": round(load_s, 2),
            "tokenize_all_s": round(tokenize_s, 3),
            "scan_s": round(scan_s, 3),
            "tokens_per_s": round(tokens / scan_s),
        }
        args.json.write_text(json.dumps(result))
    distributed.shutdown()


def _torchrun(n: int, *args: str) -> float:
    """Wall seconds of ``torchrun --standalone --nproc-per-node n ARGS`` (raises on failure)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    path = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH")] if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "4"}
    start = time.perf_counter()
    done = subprocess.run([*command, str(n), *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun -n {n} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def _run_difference(a: Path, b: Path) -> float:
    """Largest absolute difference of any statistic or score between two run files."""

    worst = 0.0
    with open_run(a) as ra, open_run(b) as rb:
        for key in ra.measurement_names:
            for name in ra.stat_names(key):
                worst = max(worst, float(np.abs(ra.stat(key, name) - rb.stat(key, name)).max()))
        for name in ra.score_names:
            diff = np.abs(ra.score(name).values - rb.score(name).values).max()
            worst = max(worst, float(diff))
    return worst


def data_parallel(args: argparse.Namespace, work: Path, gpus: int) -> dict:
    """1 vs ``gpus`` ranks on the same prompts: in-process scan timing and the CLI end to end."""
    runs = {}
    for n in sorted({1, gpus}):
        out, record = work / f"run-{n}.h5", work / f"scan-{n}.json"
        common = ["--model", str(work / "model"), "--prompts", str(work / "prompts.jsonl")]
        _torchrun(n, "-m", "benchmarks.scaling_bench", "worker", *common, "--run-file", str(out),
                  "--json", str(record), "--device", args.device)  # fmt: skip
        runs[n] = json.loads(record.read_text())
        print(f"{n} GPU(s), in process: {runs[n]}", flush=True)
        cli_out = work / f"cli-{n}.h5"
        runs[n]["cli_wall_s"] = round(
            _torchrun(n, "-m", "workbench", "scan", str(work / "model"), "--prompts",
                      str(work / "prompts.jsonl"), "--out", str(cli_out), "--probes", PROBES,
                      "--path", PATH, "--dtype", "bfloat16", "--batch-size", "8", "--quiet",
                      *(["--device", "cpu"] if args.device == "cpu" else [])),
            2,
        )  # fmt: skip
        print(f"{n} GPU(s), CLI: {runs[n]['cli_wall_s']} s", flush=True)
        runs[n]["max_abs_diff_vs_1"] = _run_difference(out, work / "run-1.h5")
        runs[n]["cli_max_abs_diff_vs_1"] = _run_difference(cli_out, work / "run-1.h5")
    base = runs[1]["scan_s"]
    for record in runs.values():
        record["speedup"] = round(base / record["scan_s"], 3)
    return {"runs": list(runs.values())}


def sharded(args: argparse.Namespace, work: Path) -> dict:
    """The model over all GPUs (``device_map="balanced"``) against the same model on GPU 0."""

    prompts = load_prompts(str(work / "prompts.jsonl")).texts[: args.sharded_prompts]

    def per_prompt(model) -> tuple[list[dict], float]:
        ids = [model.tokenize(t) for t in prompts]
        head_statistics(model, ids[0], path=PATH)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        stats = [head_statistics(model, i, path=PATH) for i in ids]
        return stats, (time.perf_counter() - start) * 1e3 / len(ids)

    whole = load(str(work / "model"), device="cuda:0", dtype=torch.bfloat16)
    expected, whole_ms = per_prompt(whole)
    del whole
    torch.cuda.empty_cache()
    before = [torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())]
    spread = load(str(work / "model"), device_map="balanced", dtype=torch.bfloat16)
    weights = [
        round((torch.cuda.memory_allocated(i) - before[i]) / 2**30, 3)
        for i in range(torch.cuda.device_count())
    ]
    got, spread_ms = per_prompt(spread)
    diff = max(
        float(np.abs(g[name] - e[name]).max())
        for g, e in zip(got, expected, strict=True)
        for name in e
    )
    layers = sorted({str(v) for k, v in spread.hf.hf_device_map.items() if ".layers." in k})
    return {
        "device_map": "balanced",
        "devices_used": layers,
        "weights_gib_per_gpu": weights,
        "prompts": len(prompts),
        "ms_per_prompt_one_gpu": round(whole_ms, 1),
        "ms_per_prompt_sharded": round(spread_ms, 1),
        "max_abs_diff_vs_one_gpu": diff,
        "pattern_path": _pattern_on_sharded(spread, prompts[0]),
    }


def _pattern_on_sharded(model, text: str, tokens: int = 512) -> dict:
    """The pattern path (TransformerLens bridge) on the sharded model against its streamed path
    on one ``tokens``-token prompt; recorded as not run where TransformerLens is missing."""

    try:
        import transformer_lens  # noqa: F401
    except Exception as e:  # missing, or its own dependencies broken
        return {"status": f"not run: {type(e).__name__}: {e}"[:500]}
    ids = model.tokenize(text, max_tokens=tokens)
    try:
        pattern = head_statistics(model, ids, path="pattern")
        streamed = head_statistics(model, ids, path=PATH)
    except Exception as e:  # reported, not hidden: the benchmark's other numbers still stand
        return {"status": f"failed: {type(e).__name__}: {e}"[:500]}
    return {
        "status": "ran",
        "tokens": len(ids),
        "bridge_n_devices": getattr(model.bridge().cfg, "n_devices", None),
        "max_abs_diff_vs_streamed": max(
            float(np.abs(pattern[name] - streamed[name]).max()) for name in pattern
        ),
    }


def run(args: argparse.Namespace) -> None:
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shape = TINY if args.tiny else SHAPE
    cuda = args.device == "cuda"
    gpus = torch.cuda.device_count() if cuda else 2
    if cuda and gpus < 2:
        raise SystemExit(f"needs 2+ GPUs, found {gpus}")
    start = time.perf_counter()
    build_model(work / "model", shape, args.length, "cuda" if cuda else "cpu")
    write_prompts(work / "prompts.jsonl", args.prompts, args.length, shape["vocab_size"])
    print(f"model and prompts: {time.perf_counter() - start:.1f} s", flush=True)
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "gpus": gpus,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "model": {**shape, "dtype": "bfloat16", "weights": "random"},
        "length": args.length,
    }
    slug = re.sub(r"[^a-z0-9]+", "-", result["device"].lower()).strip("-")
    path = args.results / f"scaling-{slug}-x{gpus}.json"
    args.results.mkdir(parents=True, exist_ok=True)
    result["data_parallel"] = data_parallel(args, work, gpus)
    path.write_text(json.dumps(result, indent=1))  # kept if the sharded part does not finish
    print(json.dumps(result["data_parallel"]), flush=True)
    if cuda:
        result["sharded"] = sharded(args, work)
        print(json.dumps(result["sharded"]), flush=True)
        path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def table(result: dict) -> str:
    """The markdown written between the scaling markers of docs/benchmarks.md."""
    m = result["model"]
    lines = [
        f"Device: **{result['gpus']}× {result['device']}**; torch {result['torch']}; "
        f"{result['date']}. Command: `{result['command']}`. Model: random-weight Llama, "
        f"{m['num_hidden_layers']} layers × {m['num_attention_heads']} heads "
        f"({m['num_key_value_heads']} KV), hidden {m['hidden_size']}, bf16.",
        "",
        "Data parallel (`probes=sink,entropy`, streamed path, "
        f"{result['data_parallel']['runs'][0]['prompts']} prompts × {result['length']} tokens):",
        "",
        "| GPUs | scan s | tokens/s | speedup | tokenizing all prompts s | CLI end to end s "
        "| max abs diff vs 1 GPU (scan / CLI) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["data_parallel"]["runs"]:
        lines.append(
            f"| {r['gpus']} | {r['scan_s']:.2f} | {r['tokens_per_s']:,} | {r['speedup']:.2f}× "
            f"| {r['tokenize_all_s']:.2f} | {r['cli_wall_s']:.1f} | {r['max_abs_diff_vs_1']:.1e} / "
            f"{r['cli_max_abs_diff_vs_1']:.1e} |"
        )
    if "sharded" in result:
        s = result["sharded"]
        lines += [
            "",
            f'Sharded (`device_map="{s["device_map"]}"`, decoder layers on GPUs '
            f"{', '.join(s['devices_used'])}; weights per GPU "
            f"{' / '.join(f'{w:.2f}' for w in s['weights_gib_per_gpu'])} GiB): "
            f"{s['ms_per_prompt_sharded']:.1f} ms per {result['length']}-token prompt against "
            f"{s['ms_per_prompt_one_gpu']:.1f} ms on one GPU; largest statistic difference "
            f"{s['max_abs_diff_vs_one_gpu']:.1e} over {s['prompts']} prompts.",
        ]
        p = s.get("pattern_path", {"status": "not run"})
        lines.append("")
        if p["status"] == "ran":
            lines.append(
                f"Pattern path (TransformerLens bridge, n_devices {p['bridge_n_devices']}) on the "
                f"sharded model, {p['tokens']} tokens: largest difference from the streamed "
                f"path {p['max_abs_diff_vs_streamed']:.1e} (bf16)."
            )
        else:
            lines.append(f"Pattern path on the sharded model: {p['status']}.")
    return "\n".join(lines)


def report(path: Path) -> None:
    result = json.loads(path.read_text())
    target = ROOT / "benchmarks" / "results" / path.name
    if path.resolve() != target.resolve():
        shutil.copyfile(path, target)
    docs = ROOT / "docs" / "benchmarks.md"
    text = docs.read_text()
    start, end = text.index(MARK_START) + len(MARK_START), text.index(MARK_END)
    docs.write_text(text[:start] + "\n" + table(result) + "\n" + text[end:])
    print(f"wrote {target} and the scaling table of {docs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="(internal) one torchrun rank")
    w.add_argument("--model", type=Path, required=True)
    w.add_argument("--prompts", type=Path, required=True)
    w.add_argument("--run-file", type=Path, required=True)
    w.add_argument("--json", type=Path, required=True)
    w.add_argument("--device", default="cuda")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/workbench-scaling"))
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--sharded-prompts", type=int, default=8)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (dry runs)")
    parser.add_argument("--report", type=Path, help="result JSON -> results dir + docs table")
    args = parser.parse_args()
    if args.command == "worker":
        worker(args)
    elif args.report:
        report(args.report)
    else:
        run(args)


if __name__ == "__main__":
    main()
