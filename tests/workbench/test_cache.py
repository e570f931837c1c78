import pytest
import torch

from workbench.cache import open_cache, write_cache
from workbench.errors import ForeignFileError, MissingEntryError, WorkbenchError
from workbench.tasks import load_prompts


def test_cache_roundtrip_matches_run_with_cache(tiny_model, prompt_file, tmp_path):
    prompts = load_prompts(prompt_file)
    out = write_cache(
        tiny_model,
        prompts,
        "blocks.*.attn.hook_z, blocks.0.hook_resid_pre",
        tmp_path / "cache.h5",
        progress=False,
    )
    assert not list(tmp_path.glob(".cache.h5*"))  # no temporary file left
    with open_cache(out) as cache:
        expected_hooks = ["blocks.0.attn.hook_z", "blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"]
        assert sorted(cache.hooks) == expected_hooks
        assert cache.n_prompts == len(prompts) and cache.model == tiny_model.info
        ids = tiny_model.tokenize(prompts.texts[1])
        _, expected = tiny_model.bridge().run_with_cache(ids[None])
        got = cache["blocks.1.attn.hook_z", 1]  # [pos, head, d_head]
        assert got.shape == expected["blocks.1.attn.hook_z"][0].shape
        torch.testing.assert_close(got, expected["blocks.1.attn.hook_z"][0])
        with pytest.raises(MissingEntryError, match="hook 'blocks.9.attn.hook_z' is not in"):
            cache["blocks.9.attn.hook_z", 0]
        with pytest.raises(IndexError):
            cache["blocks.1.attn.hook_z", 99]


def test_unknown_hook_pattern(tiny_model, prompt_file, tmp_path):
    with pytest.raises(WorkbenchError, match="no hook matches 'blocks.*.nothing'"):
        write_cache(tiny_model, load_prompts(prompt_file), "blocks.*.nothing", tmp_path / "c.h5")
    assert not list(tmp_path.glob("*c.h5*"))


def test_run_file_is_not_a_cache(tiny_model, prompt_file, tmp_path):
    from workbench.scanner import scan

    run = scan(tiny_model, str(prompt_file), out=tmp_path / "run.h5", progress=False)
    with pytest.raises(ForeignFileError, match="kind 'attention-head-workbench/run', not .*cache"):
        open_cache(run.path)
