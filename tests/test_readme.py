"""The README tells the truth: its result tables are the renderings of the committed results
files, and its Python example runs as written (on stories260K instead of the hub model, with
local files for the calibration and perplexity text)."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_tables_come_from_the_results_files():
    sys.path.insert(0, str(ROOT / "bench"))
    from readme_tables import check

    assert check(README) == []


def test_readme_has_at_most_about_200_lines():
    assert len(README.read_text().splitlines()) <= 210


def test_readme_python_example_runs(stories_dir, tinystories_file, tmp_path, monkeypatch):
    text = README.read_text()
    code = re.search(r"<!-- example:python -->\n```python\n(.*?)```", text, re.S).group(1)
    calib, heldout = tmp_path / "calib.txt", tmp_path / "heldout.txt"
    stories = tinystories_file.read_text()
    calib.write_text(stories[:-20_000])
    heldout.write_text(stories[-20_000:])
    substitutions = {'"HuggingFaceTB/SmolLM2-135M"': repr(str(stories_dir)), '"calib.txt"': repr(str(calib)),
                     '"wiki.test.raw"': repr(str(heldout))}
    for old, new in substitutions.items():
        assert old in code, f"the README example no longer uses {old}"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # the example writes plans/s25 relative to the working directory
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "plans" / "s25" / "plan.json").exists()
    assert namespace["plan"].accounting()["sparsity"] <= 0.25
