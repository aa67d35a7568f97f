"""The quality sweep presets: `python bench/sweep/run_sweep.py stories260k|smollm2 [--print] [FLAGS]`.

Each preset is one `subfit sweep` command (printed before it runs; `--print` prints it only; later
flags win).
Results go to bench/results/sweep_<preset>.{json,md} and _quality.png/_layers.png; plans,
statistics and evaluations are cached under plans/sweep_<preset>/ (git-ignored), so running the
same preset again after an interruption resumes where it stopped. Results that exist are
replaced only with `--overwrite`.

stories260k: calibrate on the first half of tinystories_validation_head.txt, perplexity on the
    second half (split at a document boundary), window 512 (the model's context).
smollm2: the reference protocol: SmolLM2-135M-Instruct (embedded GGUF), calibration
    wiki_passages.txt 128 x 512, WikiText-2 test window 1024 on the first 16,384 tokens, first 300
    examples of each task (dense perplexity about 22.55). The committed results were run with
    `--limit 100` (later flags win) to fit CPU time: 100 examples per task, every method.

Both presets pin SubFit's selection as the committed sweeps made it (one draw on 128 sequences, 32
scored); `--calib-samples 272 --subfit selection_draws=3 score_samples=64` runs compress's default
selection (bench/results/default_draws_smollm2.md).
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("SUBFIT_ASSETS", ROOT.parent / "shared" / "assets"))
DATA = ASSETS / "data"
TASKS = ["--tasks", *(f"{t}_local" for t in ("piqa", "arc_easy", "arc_challenge", "winogrande", "lambada_openai")),
         "--include-path", str(ROOT / "bench" / "tasks")]  # offline lm-eval copies of the five tasks
PINNED_SELECTION = ["--subfit", "score_samples=32", "selection_draws=1"]


def split_halves(source: Path, folder: Path) -> tuple[Path, Path]:
    """First half of the documents -> calibration, second half -> held-out evaluation text."""
    folder.mkdir(parents=True, exist_ok=True)
    calib, heldout = folder / "calib_first_half.txt", folder / "heldout_second_half.txt"
    if not (calib.exists() and heldout.exists()):
        text = source.read_text(encoding="utf-8").replace("\r\n", "\n")
        cut = text.find("\n\n", len(text) // 2)
        calib.write_text(text[:cut].strip() + "\n", encoding="utf-8")
        heldout.write_text(text[cut:].strip() + "\n", encoding="utf-8")
    return calib, heldout


def preset(name: str) -> list[str]:
    cache = ROOT / "plans" / f"sweep_{name}"
    out = ROOT / "bench" / "results" / f"sweep_{name}"
    if name == "stories260k":
        calib, heldout = split_halves(DATA / "tinystories" / "tinystories_validation_head.txt", cache / "data")
        return [str(ASSETS / "models" / "stories260K"), "--calib", str(calib), "--calib-samples", "128",
                "--calib-len", "256", *PINNED_SELECTION,
                "--ppl", str(heldout), "--window", "512", "--max-tokens", "32768",
                *TASKS, "--limit", "300", "--agreement", "--map-levels", "0.25", "0.375",
                "--title", "SubFit quality sweep: stories260K (TinyStories held-out half; MC tasks near chance)",
                "--cache", str(cache), "--out", str(out)]
    if name == "smollm2":
        return ["--calib", str(DATA / "calib" / "wiki_passages.txt"), "--calib-samples", "128", "--calib-len", "512",
                *PINNED_SELECTION,
                "--ppl", str(DATA / "wikitext-2-raw" / "wiki.test.raw"), "--window", "1024", "--max-tokens", "16384",
                *TASKS, "--limit", "300",
                "--title", "SubFit quality sweep: SmolLM2-135M-Instruct (WikiText-2 and five zero-shot tasks)",
                "--cache", str(cache), "--out", str(out)]
    raise SystemExit(f"unknown preset {name!r}: choose stories260k or smollm2")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("stories260k", "smollm2"):
        raise SystemExit(__doc__)
    args = [*preset(argv[0]), *[a for a in argv[1:] if a != "--print"]]
    print("subfit sweep " + " ".join(shlex.quote(a) for a in args), flush=True)
    if "--print" in argv:
        return 0
    from sweep import main as sweep_main

    return sweep_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
