"""Shared fixtures: a tiny random Llama in Hugging Face format, built once per session.

Tests never reach the network: HF_HUB_OFFLINE is set before transformers is imported, and the
real models come from the built-in packages. TRITON_INTERPRET is set here, before anything imports
triton, so kernel tests run on the CPU through Triton's interpreter.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json
from pathlib import Path

import pytest
import torch

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "and",
    "ran",
    "to",
    "park",
    "when",
    "mary",
    "john",
    "went",
    "store",
    "gave",
    "drink",
    "it",
    "was",
    "big",
    "small",
    "red",
    "blue",
    "old",
    "new",
    "house",
    "tree",
    "bird",
    "sun",
    "day",
    "night",
]


def make_tiny_llama(
    path: Path, *, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2
) -> Path:
    """Save a random Llama (word-level tokenizer with <bos>) as a Hugging Face directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_factory():
    """:func:`make_tiny_llama`, for tests that need other shapes (conftest is not importable by
    name: each test package has its own)."""
    return make_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir: Path):
    from workbench.models import load

    return load(str(tiny_llama_dir), device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """The built-in real model (first load dequantizes the GGUF file and caches it)."""
    from workbench.models import load

    return load("smollm2-135m", device="cpu")


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    texts = [
        "the cat sat on the mat",
        "when mary and john went to the store john gave a drink to mary",
        "the dog ran to the park and the bird sat on the tree",
        "it was a big red house",
        "the sun was small and the night was blue",
    ]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path
