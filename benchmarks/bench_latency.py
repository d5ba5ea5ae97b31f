"""Wall-clock budgets, measured here rather than asserted in tests (a timing on a shared CI core is no test):

    python benchmarks/bench_latency.py

- a YAML alias bomb (10^9 items once expanded) is refused within 1 s: aliases are refused before expansion;
- a RULER needle-in-a-haystack prompt of one million byte tokens is built within 5 s (the haystack of
  tests/fixtures/niah).

Prints each measurement against its budget; exits 1 when one is over.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from titans.config import RunConfig
from titans.data.niah import NIAHGenerator
from titans.data.tokenizer import ByteTokenizer
from titans.typed_yaml import ConfigError, load_yaml

NIAH_FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "niah"


def alias_bomb() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bomb.yaml"
        path.write_text("model:\n  dim: 64\ndata:\n  kwargs:\n" + "".join(f"    {line}\n" for line in lines))
        try:
            load_yaml(path, RunConfig)
        except ConfigError as exc:
            assert "YAML aliases are not allowed" in str(exc)
        else:
            raise AssertionError("the alias bomb was accepted")


def million_token_prompt() -> None:
    essays = [p.read_text(encoding="utf-8") for p in sorted((NIAH_FIXTURES / "essays").glob("*.txt"))]
    words = {name: (NIAH_FIXTURES / f"{name}.txt").read_text(encoding="utf-8").splitlines()
             for name in ("adjectives", "nouns")}
    generator = NIAHGenerator("niah_single_2", ByteTokenizer(), essays=essays, adjectives=words["adjectives"],
                              nouns=words["nouns"])
    generator.sample(1_000_000, depth=33, seed=0)


BUDGETS = {"YAML alias bomb refused": (alias_bomb, 1.0), "1M-token NIAH prompt": (million_token_prompt, 5.0)}


def main() -> int:
    over = 0
    for name, (run, budget) in BUDGETS.items():
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        over += seconds > budget
        print(f"{name:<28} {seconds:8.3f} s  (budget {budget:g} s){'  OVER' if seconds > budget else ''}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
