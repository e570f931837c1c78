"""The README's notebook example runs as written (with the run file redirected to a temp dir)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def notebook_example() -> str:
    text = README.read_text()
    section = text.split("## In a notebook", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python block under 'In a notebook'"
    return match.group(1)


def demo_summary() -> str:
    """The summary in the README's ``make demo`` output (between the command and the run file)."""
    text = README.read_text()
    match = re.search(
        r"\$ make demo\n[^\n]*scan smollm2-135m[^\n]*\n(.*?)\n\nrun file: ", text, re.S
    )
    assert match, "README shows no make demo output"
    return match.group(1)


@pytest.mark.slow
def test_readme_notebook_example_runs(tmp_path, monkeypatch, smollm2):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(notebook_example(), str(README), "exec"), namespace)
    assert (tmp_path / "runs" / "demo.h5").exists()
    assert namespace["result"].scores.shape[0] == 30 * 9
    # the same scan as make demo's: the README shows its summary as it is
    assert namespace["result"].summary() == demo_summary()
    assert tuple(namespace["cache"]["blocks.3.attn.hook_pattern"].shape[1:2]) == (9,)
