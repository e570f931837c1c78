"""Shipped text corpora: English prose and Python code taken from CPython's standard library.

Probes need long, natural text that ships with the project (no downloads): the haystack of the
needle-in-a-haystack task and the prose/code domains of the active-dormant probe. Both corpora
are snapshots of CPython 3.11's standard library (Python Software Foundation License, which
permits redistribution): *prose* is the module docstrings' paragraphs, *code* is module source.
``python -m workbench.tasks.corpus`` regenerates ``data/corpus/{prose,code}.txt`` from the running
interpreter; the shipped files are what tests and docs use.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parents[2] / "data" / "corpus"

# Modules with long, plain-English docstrings and readable source; fixed so the snapshot is stable.
MODULES = [
    "argparse",
    "asyncio.events",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "functools",
    "getopt",
    "gettext",
    "heapq",
    "html.parser",
    "http.client",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "mailbox",
    "optparse",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "sched",
    "shlex",
    "shutil",
    "smtplib",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "turtle",
    "typing",
    "unittest.case",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
]

CODE_CHARS_PER_MODULE = 6000  # the head of each module: imports, classes, docstrings and code


def corpus(name: str) -> str:
    """The shipped corpus ``"prose"`` or ``"code"`` as one string."""
    path = CORPUS_DIR / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped corpus {name!r} at {path}")
    return path.read_text(encoding="utf-8")


def _prose_paragraphs(module: object) -> list[str]:
    docs = [inspect.getdoc(module) or ""]
    for _, member in inspect.getmembers(module):
        if (inspect.isclass(member) or inspect.isfunction(member)) and getattr(
            member, "__module__", None
        ) == module.__name__:
            docs.append(inspect.getdoc(member) or "")
    paragraphs = []
    for doc in docs:
        for block in re.split(r"\n\s*\n", doc):
            text = " ".join(block.split())
            # keep sentences, not signatures, tables or examples
            if (
                len(text.split()) >= 12
                and text[0].isupper()
                and text.endswith(".")
                and (">>>" not in text and "::" not in text and "|" not in text)
            ):
                paragraphs.append(text)
    return paragraphs


def build() -> None:
    prose, code = [], []
    for name in MODULES:
        module = importlib.import_module(name)
        prose.extend(_prose_paragraphs(module))
        code.append(f"# ---- {name} ----\n" + inspect.getsource(module)[:CODE_CHARS_PER_MODULE])
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    (CORPUS_DIR / "prose.txt").write_text("\n\n".join(dict.fromkeys(prose)) + "\n")
    (CORPUS_DIR / "code.txt").write_text("\n\n".join(code))
    print(f"python {sys.version.split()[0]}: {len(prose)} prose paragraphs, {len(code)} modules")


if __name__ == "__main__":
    build()
