"""Prompt sets: named, hashed lists of texts.

A prompt set is read from

* a shipped name (``demo``, ...): ``data/prompts/<name>.jsonl`` in the repository;
* a ``.jsonl`` file: one JSON object per line with a ``"text"`` field (other fields are ignored);
* a ``.txt`` file: prompts separated by blank lines.

The hash covers the texts in order, so a run file can tell whether a partial scan was made on the
same prompts before resuming it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import PromptSetError

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "data" / "prompts"


@dataclass(frozen=True)
class PromptSet:
    name: str
    texts: tuple[str, ...]

    @property
    def hash(self) -> str:
        digest = hashlib.sha256()
        for text in self.texts:
            digest.update(text.encode())
            digest.update(b"\x00")
        return digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.texts)


def shipped_prompt_sets() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.jsonl"))


def load_prompts(spec: str | Path) -> PromptSet:
    """Read a prompt set by shipped name or path (see the module docstring).

    Raises:
        PromptSetError: missing file, unknown format, not UTF-8, bad JSON, or no prompts.
    """
    path = Path(spec)
    if not path.exists() and str(spec) in shipped_prompt_sets():
        path = PROMPTS_DIR / f"{spec}.jsonl"
    if not path.is_file():
        shipped = ", ".join(shipped_prompt_sets())
        raise PromptSetError(f"no prompt file {spec!s} (shipped prompt sets: {shipped})")
    if path.suffix not in (".jsonl", ".txt"):
        raise PromptSetError(
            f'{path}: prompt files must be .jsonl (one {{"text": ...}} per line) '
            "or .txt (prompts separated by blank lines)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptSetError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PromptSetError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix == ".jsonl":
        texts = _read_jsonl(path, text)
    else:
        texts = [p.strip() for p in text.split("\n\n") if p.strip()]
    if not texts:
        raise PromptSetError(f"{path} holds no prompts")
    return PromptSet(name=path.stem, texts=tuple(texts))


def _read_jsonl(path: Path, text: str) -> list[str]:
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptSetError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        except (ValueError, RecursionError) as e:  # too many digits, nested too deep
            raise PromptSetError(f"{path}:{number}: not usable JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise PromptSetError(f'{path}:{number}: expected an object with a "text" string')
        texts.append(record["text"])
    return texts
