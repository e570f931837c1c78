"""Word-level tokenizers for the toy models, built with the `tokenizers` library.

Every toy task speaks a closed vocabulary of whitespace-separated words, so a WordLevel model with
a whitespace pre-tokenizer maps text to ids one word per token, with no merges to get in the way of
the position bookkeeping the tasks rely on. The saved `tokenizer.json` + `tokenizer_config.json`
make `transformers.AutoTokenizer.from_pretrained(dir)` return a `PreTrainedTokenizerFast` offline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors

from workbench.tasks.toy import BOS, PAD, SPECIALS, UNK


def build_tokenizer(words: Sequence[str]) -> Tokenizer:
    """Word-level tokenizer over SPECIALS + `words`; encoding text prepends <bos>."""
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    if len(vocab) != len(SPECIALS) + len(words):
        raise ValueError("toy vocabulary has duplicate words")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, *, model_max_length: int) -> None:
    """Write tokenizer.json and the tokenizer_config.json that AutoTokenizer needs offline."""
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "pad_token": PAD, "unk_token": UNK}, indent=2) + "\n"
    )
