"""The README's result tables, rendered from the committed results files.

`python bench/readme_tables.py` prints every table; `tests/test_readme.py` fails when a table in
README.md differs from its rendering, so a number in the README always comes from a results file.
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = (0.125, 0.1875, 0.25, 0.3125, 0.375)
BASELINES = ("shortgpt", "uidl", "replaceme", "llm-drop")
NAMES = {"shortgpt": "ShortGPT", "uidl": "UIDL", "replaceme": "ReplaceMe-LS", "llm-drop": "LLM-Drop"}


def _rows(name: str) -> list[dict]:
    path = RESULTS / name
    return json.loads(path.read_text())["rows"] if path.exists() else []


def _tag(level: float) -> str:
    return f"{level:.4f}".rstrip("0").rstrip(".")


def _retention(row: dict | None) -> str:
    return f"{row['mean_retention']:.1f}%" if row else "–"


def quality_table() -> str:
    """SubFit's default (three selection draws, `default_draws_smollm2.md`) against the baseline
    with the lowest perplexity at each level, from the sweep (128 calibration windows) or
    ReplaceMe-LS re-fitted on SubFit's 272."""
    sweep = [r for r in _rows("sweep_smollm2.json") if r["method"] in BASELINES and "error" not in r]
    lines = ["| target | SubFit: exact sparsity | WikiText-2, x dense | 5-task retention, 100 (300) examples "
             "| best baseline (exact sparsity) | WikiText-2, x dense | 5-task retention, 100 (300) examples |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for level in LEVELS:
        draws = _rows(f"draws3_{_tag(level)}_smollm2.json")
        more = {r["method"]: r for r in _rows(f"draws3_{_tag(level)}_300_smollm2.json")}
        ours = next(r for r in draws if r["method"] == "subfit")
        candidates = [r for r in sweep if r["level"] == level] + [r for r in draws if r["method"] in BASELINES]
        best = min(candidates, key=lambda r: r["ppl_ratio"])
        lines.append(
            f"| {level:.2%} | {ours['sparsity']:.3f} | **{ours['ppl_ratio']:.2f}x** | "
            f"{_retention(ours)} ({_retention(more.get('subfit'))}) | {NAMES[best['method']]} ({best['sparsity']:.3f}) | "
            f"{best['ppl_ratio']:.2f}x | {_retention(best)} "
            f"({_retention(more.get(best['method']) if best in draws else None)}) |")
    return "\n".join(lines)


TABLES = {"quality": quality_table}


def check(readme: Path) -> list[str]:
    """The names of the tables whose rendering does not appear verbatim in `readme`."""
    text = readme.read_text()
    return [name for name, render in TABLES.items() if render() not in text]


if __name__ == "__main__":
    for name, render in TABLES.items():
        print(f"<!-- table:{name} -->\n{render()}\n")
