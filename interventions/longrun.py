"""Long-context check of the streamed intervention path (``python -m interventions.longrun``).

Builds a random-weight Llama of a given shape (default: SmolLM2-135M's, 30 layers × 9 query
heads, 3 KV heads, d_head 64) directly on the device, then at each length runs one forward pass
per intervention kind on ``--heads`` heads of the middle layer and records wall time and peak
GPU memory. Two correctness checks ride along:

* ``noop``: a ``scale`` by 1 on the streamed path equals the model's own SDPA forward;
* ``closed_form``: at the shortest length (at most 4096), each pattern kind's closed form in
  fp32 (Triton kernels on a GPU) equals the materialised float64 pattern of the same heads
  times v, on the intervened layer's real q, k, v.

A random-weight model retrieves nothing, so this measures cost and agreement, not accuracy.
Output: JSON (``--out``) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from interventions import ops
from interventions.engine import Intervener
from interventions.specs import load_specs
from interventions.streamed import intervening
from workbench.capture import AttentionCall
from workbench.models import Model, ModelInfo

KINDS = [
    {"kind": "zero"},
    {"kind": "uniform"},
    {"kind": "first_token"},
    {"kind": "redistribute", "sinks": [0, 1, 2, 3], "beta": 0.4},
    {"kind": "redistribute", "threshold": 0.1, "beta": 0.4},
]


def random_llama(device: str, dtype: torch.dtype, layers: int, max_len: int) -> Model:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max_len + 16,
        rope_theta=100000.0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(dtype).eval()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0})))
    info = ModelInfo(
        name="random-smollm2-shape", source="random", revision="torch.manual_seed(0)",
        architecture="LlamaForCausalLM", n_layers=layers, n_heads=9, n_kv_heads=3, d_head=64,
        d_model=576, causal=True, max_context=max_len + 16, config_hash="",
    )  # fmt: skip
    return Model(info, hf, tokenizer)


def closed_form_errors(model: Model, tokens: torch.Tensor, layer: int) -> dict[str, float]:
    """Max |closed form (fp32) − pattern @ v (float64)| per pattern kind on one layer's q, k, v."""
    captured = {}

    def work(call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        captured.update(q=call.query.double(), k=call.key.double(), v=call.value.double(),
                        scale=call.scale, causal=call.causal)  # fmt: skip
        return out.transpose(1, 2)

    with intervening(model.hf, {layer}, work), torch.no_grad():
        model.hf(tokens, logits_to_keep=1)
    group = model.info.group_size
    q = captured["q"][:, :2]
    k = captured["k"][:, [h // group for h in range(2)]]
    v = captured["v"][:, [h // group for h in range(2)]]
    scores = (q @ k.transpose(-1, -2)) * captured["scale"]
    n = q.shape[2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    pattern = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    errors = {}
    for item in KINDS[1:]:
        spec = load_specs({**item, "heads": [[layer, 0]]})[0]
        expected = ops.new_pattern(spec, pattern, causal=True) @ v
        # fp32 closed form (the Triton kernels on a GPU) against the float64 pattern
        got = ops.new_attention_output(
            spec, q.float(), k.float(), v.float(), causal=True, scale=captured["scale"]
        ).double()
        errors[spec.describe()] = float((got - expected).abs().max())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4096,32768")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--heads", type=int, default=6, help="heads of the middle layer")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="JSON results")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    lengths = [int(x) for x in args.lengths.split(",")]
    model = random_llama(args.device, dtype, args.layers, max(lengths))
    layer = args.layers // 2
    heads = [[layer, h] for h in range(args.heads)]
    iv = Intervener(model)
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    rows = []
    gen = torch.Generator().manual_seed(0)
    for length in lengths:
        tokens = torch.randint(0, 49152, (1, length), generator=gen).to(args.device)
        with torch.no_grad():
            plain = model.hf(tokens, logits_to_keep=1).logits.float()
        for item in [{"kind": "scale", "factor": 1.0}, *KINDS]:
            spec = load_specs({**item, "heads": heads})[0]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            logits = iv.run(tokens, [[spec]], keep=1, path="streamed").logits[0, 0].float()
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            row = {"length": length, "spec": spec.describe(), "seconds": round(seconds, 3),
                   "peak_gib": round(peak, 3),
                   "max_logit_change": float((logits - plain[0]).abs().max())}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    errors = closed_form_errors(model, tokens[:, : min(lengths[0], 4096)], layer)
    result = {"device": device_name, "dtype": args.dtype, "layers": args.layers,
              "torch": torch.__version__, "rows": rows,
              "closed_form_max_abs_error": errors}  # fmt: skip
    print(f"\n{device_name}, {args.dtype}, {args.layers} layers, heads {heads}\n")
    print("| length | intervention | seconds | peak GiB | max |Δlogit| |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['length']} | {r['spec']} | {r['seconds']} | {r['peak_gib']} | "
              f"{r['max_logit_change']:.3g} |")  # fmt: skip
    print("\nclosed form (fp32) vs pattern @ v (float64):", json.dumps(errors))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
