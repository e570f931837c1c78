import pytest

from workbench.errors import PromptSetError
from workbench.tasks import load_prompts, shipped_prompt_sets


def test_shipped_demo_set():
    assert "demo" in shipped_prompt_sets()
    demo = load_prompts("demo")
    assert len(demo) >= 10 and demo.name == "demo"


def test_jsonl_and_txt(tmp_path, prompt_file):
    a = load_prompts(prompt_file)
    txt = tmp_path / "p.txt"
    txt.write_text("\n\n".join(a.texts) + "\n")
    b = load_prompts(txt)
    assert a.texts == b.texts and a.hash == b.hash
    txt.write_text("\n\n".join(reversed(a.texts)))
    assert load_prompts(txt).hash != a.hash


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ('{"text": "ok"}\n{broken\n', ".jsonl", r"p\.jsonl:2: not valid JSON"),
        ('{"prompt": "x"}\n', ".jsonl", r'expected an object with a "text" string'),
        ("", ".jsonl", "holds no prompts"),
        ("a,b\n", ".csv", "must be .jsonl"),
    ],
)
def test_bad_files(tmp_path, content, suffix, message):
    path = tmp_path / f"p{suffix}"
    path.write_text(content)
    with pytest.raises(PromptSetError, match=message):
        load_prompts(path)


def test_missing_file_lists_shipped_sets(tmp_path):
    with pytest.raises(PromptSetError, match="shipped prompt sets: .*demo"):
        load_prompts(tmp_path / "nope.jsonl")
