"""Count how the workbench answers generated inputs: ``python -m tests.reliability.fuzz --n 2000``.

Draws ``--n`` inputs from the generators of tests/reliability/generators.py (seeded: the same
``--seed`` gives the same inputs), runs each in a worker process with a time limit
(tests/reliability/harness.py) and prints, per family and in total, how many were clean errors,
correct results, tracebacks, hangs, silent cases (an invalid input accepted or a wrong result)
and valid inputs refused; then one line per input that was not a clean error or a correct
result. Exit code 1 when there is any. docs/reliability.md holds the numbers of a run.

Families and their shares: intervention specs through the API on toy-ioi (45%), spec texts
(5%), command lines with one bad argument (25%), run-file corruptions of a real scan of toy-bb
and of a synthetic run (15%), prompt files (7%), scan options (3%).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.reliability import generators
from tests.reliability.harness import CATEGORIES, Worker, classify, make_run_file, read_everything

FAMILIES = {  # family -> (share of the inputs, generator)
    "spec": (0.45, generators.spec_case),
    "spec text": (0.05, generators.raw_spec_text_case),
    "cli": (0.25, generators.cli_case),
    "corruption": (0.15, None),  # needs the run files: see main
    "prompts": (0.07, generators.prompt_file_case),
    "options": (0.03, generators.option_case),
}


def fixtures(workdir: Path, real_scan: bool) -> dict[str, str]:
    """Files the inputs refer to: run files (a real toy-bb scan, unless ``real_scan`` is
    False, and a synthetic one), a file, a directory, a prompt file."""
    runs = workdir / "fixtures"
    runs.mkdir()
    synthetic = make_run_file(runs / "synthetic.h5", seed=1)
    other = make_run_file(runs / "other.h5", seed=2)
    real = runs / "toy-bb.h5"
    if real_scan:
        subprocess.run(
            [sys.executable, "-m", "workbench", "scan", "toy-bb", "--out", str(real), "--quiet"],
            check=True,
            capture_output=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    (runs / "a-file").write_text("x")
    (runs / "a-dir").mkdir()
    (runs / "prompts.txt").write_text("one prompt\n\nanother prompt\n")
    return {
        "synthetic": str(synthetic),
        "other": str(other),
        "real": str(real) if real_scan else str(synthetic),
        "MODEL": str(workdir / "no-model-here"),
        "RUN": str(synthetic),
        "DIR": str(runs / "a-dir"),
        "FILE": str(runs / "a-file"),
        "OUTDIR": str(workdir / "out-dir"),
        "OUTFILE": str(workdir / "out.h5"),
        "PROMPTS": str(runs / "prompts.txt"),
        "SPEC": '{"kind": "zero", "heads": [[0, 0]]}',
    }


def draw(rng: random.Random, fill: dict[str, str], runs: dict[str, bytes]) -> tuple[str, object]:
    """One ``(family, case)``."""
    families = list(FAMILIES)
    family = rng.choices(families, weights=[FAMILIES[f][0] for f in families])[0]
    if family == "corruption":
        source = rng.choice(["real", "synthetic"])
        other = runs["other"] if source == "synthetic" else runs["synthetic"]
        case = generators.corruption(rng, runs[source], other)
        case.extra["source"] = source
    else:
        case = FAMILIES[family][1](rng)
    if family == "cli":
        case.extra["placeholders"] = fill
    return family, case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="inputs to generate (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    parser.add_argument("--no-real-scan", action="store_true", help="synthetic run files only")
    parser.add_argument("--json", help="also write the counts as JSON here")
    args = parser.parse_args(argv)

    started = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="reliability-"))
    try:
        fill = fixtures(workdir, real_scan=not args.no_real_scan)
        runs = {k: Path(fill[k]).read_bytes() for k in ("real", "synthetic", "other")}
        digests = {k: read_everything(Path(fill[k])) for k in ("real", "synthetic")}
        worker = Worker(workdir, {"RELIABILITY_GOOD_RUN": fill["synthetic"]})
        worker.warm("spec", generators.Case({"kind": "zero", "heads": [[0, 0]]}, True))
        rng = random.Random(args.seed)
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        problems = []
        for index in range(args.n):
            family, case = draw(rng, fill, runs)
            result = worker.run(family, case)
            good = digests.get(case.extra.get("source", "")) if family == "corruption" else None
            category = classify(family, case, result, good)
            counts[family][category] += 1
            if category not in ("clean error", "correct"):
                detail = (
                    "no answer in time"
                    if result is None
                    else (result.get("message") or result.get("stderr") or result.get("checks"))
                )
                problems.append(
                    f"#{index} {family} {category}: {case.defect or 'valid'}: {str(detail)[:200]!r}"
                )
        worker.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    total = collections.Counter()
    for family_counts in counts.values():
        total.update(family_counts)
    header = f"{'family':<11} {'inputs':>6} " + " ".join(f"{c:>13}" for c in CATEGORIES)
    print(header)
    for family in FAMILIES:
        row = counts[family]
        cells = " ".join(f"{row[c]:>13}" for c in CATEGORIES)
        print(f"{family:<11} {sum(row.values()):>6} {cells}")
    print(
        f"{'total':<11} {sum(total.values()):>6} " + " ".join(f"{total[c]:>13}" for c in CATEGORIES)
    )
    print(f"seed {args.seed}, {time.time() - started:.0f} s, worker restarts {worker.restarts}")
    for line in problems:
        print(line)
    if args.json:
        document = {
            "n": args.n,
            "seed": args.seed,
            "total": dict(total),
            "families": {f: dict(c) for f, c in counts.items()},
            "problems": problems,
        }
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
