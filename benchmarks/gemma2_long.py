"""A Gemma-2-shaped model at long context on the streamed path, checked against eager attention.

``python -m benchmarks.gemma2_long [--length 16384] [--out DIR]`` (CUDA GPU) builds
Gemma2ForCausalLM with gemma-2-2b's attention shape (26 layers alternating local and global, 8
query heads, 4 KV heads, head size 256, query scale 256^-0.5, sliding window 4096, logit softcap
50, final softcap 30; a 32K-word vocabulary instead of 256K) and random weights (seed 0, fp32),
then:

1. runs ``workbench.scanner.scan`` with the default probes over one random prompt of
   ``--length`` tokens with ``path="streamed"``, writing a run file, and times it;
2. records the last 64 queries of every layer with a ``StreamedRecorder`` (``q_positions``), and
   in the same forward hands those 64 query rows, every key and value, to transformers' own
   ``gemma2.eager_attention_forward`` with the mask made by transformers' own
   ``sliding_window_causal_mask_function`` (local layers) or ``causal_mask_function`` (global
   layers): the eager pattern, from which ``kernels.stats_from_pattern`` computes the same
   statistics independently of the kernels;
3. writes ``gemma2-long-<device>.json`` with the scan's time and labels and, per layer, the
   largest difference of each statistic and of the attention output.

Only the last 64 rows of the eager pattern exist at once (64 × L per head), so the check runs at
any length the model runs at.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from kernels import stats_from_pattern
from workbench.arguments import Parser, integer
from workbench.atomic import atomic_write_text
from workbench.capture import AttentionCall, StreamedRecorder, attend, use_attention
from workbench.capture.attention import register
from workbench.models import from_hf
from workbench.scanner import scan

VOCAB = 32000
LAST = 64  # query rows compared with eager attention
FIELDS = ("entropy", "max_prob", "sink_mass")
CHECK_NAME = "gemma2_long_check"


def gemma2_2b_shape() -> Gemma2Config:
    return Gemma2Config(
        vocab_size=VOCAB, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        max_position_embeddings=131072, architectures=["Gemma2ForCausalLM"],
        pad_token_id=0, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``w0 … w{VOCAB-4}`` that prepends ``<bos>``."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(VOCAB - 4)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>", model_max_length=131072, name_or_path="gemma2-long-words",
    )  # fmt: skip


def eager_rows(call: AttentionCall, config: Gemma2Config) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager Gemma 2 attention for the last :data:`LAST` queries of ``call``:
    ``(output [1, LAST, heads, d], pattern [1, heads, LAST, k_len])``."""
    k_len = call.key.shape[2]
    rows = torch.arange(k_len - LAST, k_len, device=call.query.device)[:, None]  # [LAST, 1]
    keys = torch.arange(k_len, device=call.query.device)[None]  # [1, k_len]
    local = call.module.sliding_window is not None
    mask_function = sliding_window_causal_mask_function(config.sliding_window) if local else (
        causal_mask_function
    )  # fmt: skip
    visible = mask_function(0, 0, rows, keys)  # [LAST, k_len] bool
    additive = torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, -torch.inf)
    return eager_attention_forward(
        call.module, call.query[:, :, -LAST:], call.key, call.value, additive[None, None],
        scaling=call.scale, softcap=call.module.config.attn_logit_softcapping,
    )  # fmt: skip


def check_last_queries(model: Any, ids: torch.Tensor) -> list[dict[str, Any]]:
    """Per layer, the largest differences between the streamed statistics / output of the last
    :data:`LAST` queries and transformers' eager attention."""
    k_len = ids.shape[1]
    eager: dict[int, dict[str, Any]] = {}

    def checked(call: AttentionCall) -> torch.Tensor:
        output = attend(call)  # [1, heads, q, d]: what the model gets, SDPA or the fused kernel
        want_out, pattern = eager_rows(call, model.hf.config)
        positions = torch.arange(k_len - LAST, k_len, device=pattern.device)
        eager[call.layer] = {
            "window": call.window,
            "stats": stats_from_pattern(pattern.float(), causal=True, q_positions=positions),
            "output_error": (output[:, :, -LAST:].transpose(1, 2) - want_out).abs().max().item(),
        }
        return output

    register(CHECK_NAME, checked)
    with torch.no_grad(), use_attention(model.hf, CHECK_NAME):
        model.hf(ids, logits_to_keep=1)
    positions = torch.arange(k_len - LAST, k_len)
    with torch.no_grad(), StreamedRecorder(model.hf, q_positions=positions) as recorder:
        model.hf(ids, logits_to_keep=1)
    rows = []
    for layer, streamed in enumerate(recorder.stats):  # fields [1, heads, LAST]
        want = eager[layer]["stats"]
        row = {"layer": layer, "window": eager[layer]["window"]}
        for name in FIELDS:
            got, ref = getattr(streamed, name).float().cpu(), getattr(want, name).float().cpu()
            row[f"{name}_error"] = (got - ref).abs().max().item()
        row["argmax_agree"] = (streamed.argmax.cpu() == want.argmax.cpu()).float().mean().item()
        row["output_error"] = eager[layer]["output_error"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--length", type=integer(LAST + 1), default=16384, help="prompt length in tokens"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gemma2_long needs a CUDA GPU")
        return 2
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = Gemma2ForCausalLM(gemma2_2b_shape()).eval()
    model = from_hf(hf, word_tokenizer(), name="gemma2-2b-shape-random")
    words = torch.randint(
        0, VOCAB - 4, (args.length - 1,), generator=torch.Generator().manual_seed(1)
    )
    prompts = args.out / "gemma2-long-prompt.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        prompts, json.dumps({"text": " ".join(f"w{w}" for w in words.tolist())}) + "\n"
    )
    ids = model.tokenize(" ".join(f"w{w}" for w in words.tolist()))[None].cuda()
    assert ids.shape[1] == args.length, ids.shape

    torch.cuda.synchronize()
    start = time.perf_counter()
    result = scan(model, str(prompts), path="streamed", out=args.out / "gemma2-long.h5",
                  progress=False)  # fmt: skip
    torch.cuda.synchronize()
    scan_s = time.perf_counter() - start
    rows = check_last_queries(model, ids)
    device = torch.cuda.get_device_name()
    document = {
        "device_name": device,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "machine": platform.node(),
        "command": f"python -m benchmarks.gemma2_long --length {args.length}",
        "length": args.length,
        "scan_seconds": round(scan_s, 2),
        "scan_path": "streamed",
        "labels": {t.label: int(t.selected.sum()) for t in result.tables.values() if t.label},
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "layers": rows,
    }
    slug = device.lower().replace(" ", "-")
    path = atomic_write_text(args.out / f"gemma2-long-{slug}.json", json.dumps(document, indent=1))
    worst = {f"{name}_error": max(r[f"{name}_error"] for r in rows) for name in (*FIELDS, "output")}
    print(json.dumps({k: document[k] for k in ("length", "scan_seconds", "labels", "peak_gib")}))
    print(json.dumps(worst), f"argmax agree >= {min(r['argmax_agree'] for r in rows):.4f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
