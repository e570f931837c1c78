"""The architecture matrix: one tiny random model per transformer family.

Every family is a Hugging Face ``*Config`` small enough to run on two CPU cores in well under a
second (2-4 layers, hidden 32, four heads, grouped-query attention where the family has it),
with its distinctive attention feature switched on and made *small*: sliding windows and chunks
of 8 tokens, so that a prompt of :data:`SEQ_LEN` tokens is several windows long and every mask
is exercised. Weights are random and seeded (:func:`build`), and drawn wider than the
families' own initialisers (:data:`INIT_STD`) so that attention patterns are peaked rather than
uniform: equal statistics between two paths then mean something.

The tests (``tests/architectures/test_matrix.py``) and the report (``python -m
tests.architectures.matrix``, which writes ``docs/architectures.md``) both read
:data:`FAMILIES` from here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

SEQ_LEN = 48  # tokens per test prompt: six windows / chunks of WINDOW
WINDOW = 8  # sliding-window and chunk size of every family that has one
INIT_STD = 0.25  # std of every weight matrix (attention scores of std ~2: peaked patterns)
SEED = 0

# A word-level vocabulary: specials, then WORDS. Prompts are made of these words, one token each.
SPECIALS = ("<unk>", "<bos>", "<eos>", "<pad>", "<mask>")
WORDS = tuple(f"w{i}" for i in range(59))
VOCAB = len(SPECIALS) + len(WORDS)  # 64
BOS, EOS, PAD, MASK = range(1, len(SPECIALS))  # <unk> is 0
TOKEN_IDS = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}

# Shared by the decoder families: a Llama-sized block scaled down.
DECODER = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    **TOKEN_IDS,
}
ENCODER_NO_CACHE = "an encoder attends bidirectionally and keeps no KV cache to evict from"
# Local/global families alternate; three layers put a global layer between two local ones.
SLIDING_FULL_SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]


@dataclass(frozen=True)
class Family:
    """One row of the matrix.

    Attributes:
        name: short name used in test ids and the report (``"gemma2"``).
        model_class: the ``transformers`` class to build (``"Gemma2ForCausalLM"``).
        config: keyword arguments of its config class (``model_class``'s ``config_class``).
        features: what the row exercises, for the report (``"softcap 5, window 8 / global"``).
        refuses: the capture paths the workbench cannot offer for this family, each with the
            reason: ``"pattern"`` (TransformerLens patterns), ``"streamed"`` (the workbench
            attention function, and with it the KV-policy simulation, which swaps in its
            attention function the same way), ``"kv_policy"`` (the KV-cache policy
            simulation alone) or ``"pattern_output"`` (the heads' outputs on the pattern path,
            ``hook_z``, which interventions edit). There the tests assert a one-line
            :class:`~workbench.errors.CaptureError` instead of numbers.
        learned_sinks: the attention has learned sink logits (gpt-oss), whose probability the
            eager patterns leave out (rows sum to less than 1).
        head_output: the module, inside a layer, whose input is the heads' outputs side by side
            ``[..., n_heads * d_v]`` (the attention's output projection); tests ablate a head
            there, independently of the workbench.
    """

    name: str
    model_class: str
    config: dict[str, Any]
    features: str
    refuses: dict[str, str] = field(default_factory=dict)
    learned_sinks: bool = False
    head_output: str = "self_attn.o_proj"

    @property
    def causal(self) -> bool:
        return not self.model_class.endswith("ForMaskedLM")

    @property
    def tl_bridge(self) -> bool:
        """Whether TransformerLens 4.x has an adapter for ``model_class`` (the pattern path
        runs on its ``TransformerBridge``)."""
        return "pattern" not in self.refuses


FAMILIES: tuple[Family, ...] = (
    Family("llama", "LlamaForCausalLM", DECODER, "RoPE, GQA 4/2"),
    Family(
        "mistral",
        "MistralForCausalLM",
        {**DECODER, "sliding_window": WINDOW},
        f"GQA 4/2, sliding window {WINDOW} on every layer",
    ),
    Family("qwen2", "Qwen2ForCausalLM", DECODER, "GQA 4/2, q/k/v bias"),
    Family("qwen3", "Qwen3ForCausalLM", {**DECODER, "head_dim": 16}, "GQA 4/2, QK-norm"),
    Family(
        "gemma",
        "GemmaForCausalLM",
        {**DECODER, "num_key_value_heads": 1, "head_dim": 16},
        "multi-query (4/1), d_head x heads != hidden",
    ),
    Family(
        "gemma2",
        "Gemma2ForCausalLM",
        {
            **DECODER,
            "num_hidden_layers": 3,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 10.0,
            "sliding_window": WINDOW,
            "layer_types": SLIDING_FULL_SLIDING,
        },
        f"attention softcap 5, window {WINDOW} / global alternating",
    ),
    Family(
        "gemma3",
        "Gemma3ForCausalLM",
        {
            **DECODER,
            "num_hidden_layers": 3,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": WINDOW,
            "layer_types": SLIDING_FULL_SLIDING,
        },
        f"QK-norm, window {WINDOW} / global, two RoPE bases",
    ),
    Family(
        "gpt-oss",
        "GptOssForCausalLM",
        {
            **DECODER,
            "num_hidden_layers": 3,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": WINDOW,
            "layer_types": SLIDING_FULL_SLIDING,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
        f"learned sink logits, window {WINDOW} / global, MoE",
        learned_sinks=True,
    ),
    Family(
        "llama4",
        "Llama4ForCausalLM",
        {
            **DECODER,
            "num_hidden_layers": 4,
            "head_dim": 8,
            "intermediate_size_mlp": 64,
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
            "attention_chunk_size": WINDOW,
            "no_rope_layer_interval": 4,
        },
        f"chunked attention ({WINDOW}) on RoPE layers, global NoPE layer, QK-norm, MoE",
    ),
    Family("phi3", "Phi3ForCausalLM", DECODER, "fused qkv_proj, GQA 4/2"),
    Family(
        "gpt2",
        "GPT2LMHeadModel",
        {
            "vocab_size": VOCAB,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 128,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
        },
        "learned positions, fused c_attn (Conv1D)",
        head_output="attn.c_proj",
    ),
    Family(
        "gpt-neox",
        "GPTNeoXForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "rotary_pct": 0.25,
            **TOKEN_IDS,
        },
        "partial rotary (25%), parallel residual (Pythia)",
        head_output="attention.dense",
    ),
    Family(
        "opt",
        "OPTForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "ffn_dim": 64,
            "word_embed_proj_dim": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            **TOKEN_IDS,
        },
        "learned positions (offset 2), q/k/v/out bias",
        head_output="self_attn.out_proj",
    ),
    Family(
        "falcon",
        "FalconForCausalLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "multi_query": True,
            "parallel_attn": True,
            "max_position_embeddings": 128,
            **TOKEN_IDS,
        },
        "multi-query, parallel attention + MLP",
        refuses={
            "streamed": "its attention modules compute attention themselves instead of calling "
            "transformers' AttentionInterface, so no attention function can be swapped in",
        },
        head_output="self_attention.dense",
    ),
    Family(
        "olmo2",
        "Olmo2ForCausalLM",
        DECODER,
        "QK-norm over all heads, post-norm blocks",
    ),
    Family(
        "deepseek-v3",
        "DeepseekV3ForCausalLM",
        {
            **DECODER,
            "num_hidden_layers": 2,
            "num_key_value_heads": 4,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 8,
            "v_head_dim": 12,
            "moe_intermediate_size": 32,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
        },
        "multi-head latent attention: d_qk 16, d_v 12, MoE",
        refuses={
            "pattern_output": "TransformerLens 4.x splits the outputs of latent-attention heads "
            "(hook_z) with the query/key head size; interventions take the streamed path",
        },
    ),
    Family(
        "cohere2",
        "Cohere2ForCausalLM",
        {
            **DECODER,
            "num_hidden_layers": 3,
            "sliding_window": WINDOW,
            "layer_types": SLIDING_FULL_SLIDING,
        },
        f"window {WINDOW} (RoPE) / global (NoPE), parallel block, logit scale",
    ),
    Family(
        "bert",
        "BertForMaskedLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "pad_token_id": PAD,
        },
        "bidirectional encoder, absolute positions",
        refuses={"kv_policy": ENCODER_NO_CACHE},
        head_output="attention.output.dense",
    ),
    Family(
        "modernbert",
        "ModernBertForMaskedLM",
        {
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "local_attention": 2 * WINDOW,
            "global_attn_every_n_layers": 2,
            "pad_token_id": PAD,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
            "cls_token_id": BOS,
            "sep_token_id": EOS,
            "mask_token_id": MASK,
        },
        f"bidirectional, local window +-{WINDOW} / global, RoPE",
        refuses={
            "pattern": "TransformerLens 4.x has no adapter for ModernBertForMaskedLM",
            "kv_policy": ENCODER_NO_CACHE,
        },
        head_output="attn.Wo",
    ),
)

BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def tokenizer() -> Any:
    """A word-level fast tokenizer over :data:`WORDS` that prepends ``<bos>`` (ids: SPECIALS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>", mask_token="<mask>", cls_token="<bos>", sep_token="<eos>",
        model_max_length=128, name_or_path="matrix-words", add_bos_token=True,
    )  # fmt: skip


def build(family: Family, *, attn_implementation: str = "eager") -> torch.nn.Module:
    """The family's model with seeded random weights, in eval mode, fp32.

    Every weight matrix is drawn from N(0, INIT_STD²) and every other parameter keeps the
    family's own initialisation, except learned sink logits (gpt-oss ``sinks``), drawn from
    N(0, 1) so that the sink takes a visible share of the attention.
    """
    import transformers

    cls = getattr(transformers, family.model_class)
    # Set at construction: models with their own attention code (Falcon) ignore a later
    # set_attn_implementation, and their eager patterns are right only when built eager.
    config = cls.config_class(
        **copy.deepcopy(family.config), attn_implementation=attn_implementation
    )
    config.architectures = [family.model_class]  # as a saved checkpoint records it
    torch.manual_seed(SEED)
    model = cls(config)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * INIT_STD)
            elif name.endswith(".sinks"):
                p.copy_(torch.randn(p.shape, generator=generator))
    return model.float().eval()


def prompt_ids(n: int = 1, seq_len: int = SEQ_LEN, seed: int = SEED) -> torch.Tensor:
    """``[n, seq_len]`` token ids: ``<bos>`` then random words."""
    words = torch.randint(
        len(SPECIALS), VOCAB, (n, seq_len - 1), generator=torch.Generator().manual_seed(seed)
    )
    return torch.cat([torch.full((n, 1), BOS), words], dim=1)


def prompt_texts(n: int, seq_len: int = SEQ_LEN, seed: int = SEED) -> list[str]:
    """``n`` texts that tokenize to ``seq_len`` tokens each (``<bos>`` included)."""
    ids = prompt_ids(n, seq_len, seed)[:, 1:]
    return [" ".join((SPECIALS + WORDS)[i] for i in row.tolist()) for row in ids]
