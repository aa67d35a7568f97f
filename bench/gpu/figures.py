"""What a phase measured, kept on disk as it goes: a phase killed by its time box keeps every figure
it had, and the report says where it stopped.

Each phase writes WORK/phase<N>.json ({"phase", "name", "dry_run", "status", "figures", "rows",
"notes"}), a child process of it WORK/phase<N>_<part>.json; bench/gpu.sh writes WORK/phase<N>.rc
(exit code, time box, seconds) after it.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def phase_args(description: str, flags: dict[str, str] | None = None) -> argparse.Namespace:
    """The options every phase takes from bench/gpu.sh, plus a phase's own on/off `flags` (name: help)."""
    parser = argparse.ArgumentParser(description=description)
    for flag, help_text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=help_text)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("SUBFIT_GPU_WORK", "bench/results/gpu")),
                        help="folder for this phase's JSON (bench/gpu.sh passes its scratch folder)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds this phase may take (its time box)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script, measures nothing")
    return parser.parse_args()


class Phase:
    """One phase's figures (single values), rows (tables) and notes, saved after every change."""

    def __init__(self, number: int, name: str, args: argparse.Namespace, part: str = ""):
        """`part` names a child process's share of a phase (phase<N>_<part>.json, merged by the report)."""
        self.path = args.work / f"phase{number}{'_' + part if part else ''}.json"
        self.started = time.monotonic()
        self.budget = args.budget
        self.data: dict[str, Any] = {"phase": number, "name": name, "dry_run": args.dry_run, "status": "running",
                                     "figures": {}, "rows": [], "notes": []}
        args.work.mkdir(parents=True, exist_ok=True)
        self.save()

    def seconds_left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def figure(self, key: str, value: Any) -> None:
        self.data["figures"][key] = value
        self.save()

    def row(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()
        print("  " + "  ".join(f"{k}={_short(v)}" for k, v in row.items()), flush=True)

    def note(self, text: str) -> None:
        """A line the report shows under the phase's table (loud failures, skipped parts)."""
        self.data["notes"].append(text)
        self.save()
        print(f"NOTE: {text}", flush=True)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)  # atomic: the report never reads half a file

    @contextmanager
    def running(self) -> Iterator["Phase"]:
        """Marks the phase ok, or failed with the exception's last line (the traceback goes to the log)."""
        try:
            yield self
            self.data["status"] = "ok"
        except BaseException as error:  # KeyboardInterrupt/SystemExit too: the figure file must say why
            traceback.print_exc()
            self.data["status"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            raise
        finally:
            self.save()


@contextmanager
def attempt(phase: Phase, what: str) -> Iterator[None]:
    """Run one part of a phase; a failure becomes a note and the phase goes on with its next part."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - one part failing must not stop the others
        traceback.print_exc()
        phase.note(f"{what} failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
