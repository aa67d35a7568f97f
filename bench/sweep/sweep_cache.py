"""The sweep's cache: what every cached plan and evaluation depends on, and whether it still holds.

Under `cache/`: `manifest.json` (the data every plan depends on: model, calibration; a cache made
with other data is refused rather than silently mixed in), `dense_scores.pt` (the one dense walk
every baseline ranks by), `plans/<variant>@<level>/` (each plan, so an interrupted sweep resumes),
`plans/<variant>@<level>.error` (an infeasible level, as deterministic as a plan) and
`evals/<variant>@<level>.json` (each evaluation, keyed by its settings and the plan's digest).
Each SubFit plan records the settings it was made with: after a change of SubFit's settings only
the SubFit rows are made again.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from subfit.files import write_json

MANIFEST = "manifest.json"


def file_id(path: str | os.PathLike) -> str:
    """Size and head hash: tells an edited evaluation file from the one a cached result used."""
    p = Path(path)
    with p.open("rb") as f:
        head = f.read(1 << 20)
    return f"{p.stat().st_size}:{hashlib.sha1(head).hexdigest()[:12]}"


def plan_digest(plan) -> str:
    """Hash of a plan's decisions and weights: an evaluation is reused only for the very plan it scored."""
    h = hashlib.sha1(json.dumps([plan.attn, plan.ffn, plan.base.get("fingerprint")]).encode())
    for name in sorted(plan.tensors):
        h.update(name.encode())
        h.update(plan.tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_manifest(cache: Path, key: dict) -> None:
    """Record `key` in a new cache; refuse a cache whose plans were made from other data."""
    manifest = cache / MANIFEST
    if not manifest.exists():
        write_json(manifest, key)
        return
    cached_key = json.loads(manifest.read_text())
    if {k: cached_key.get(k) for k in key} != json.loads(json.dumps(key)):
        raise ValueError(f"The cache {cache} holds plans made with other settings ({cached_key}); "
                         "use another --cache folder, or delete this one to start afresh.")


def cached_evaluation(folder: Path, tag: str, settings: dict) -> tuple[dict, float | None, bool] | None:
    """(report, seconds, reused from a twin) of an evaluation made with `settings`, or None.

    Another variant may have made the very same plan (ShortGPT and UIDL often do): its evaluation
    is copied under this tag instead of scoring the same plan twice."""
    path = folder / f"{tag}.json"
    if path.exists():
        blob = json.loads(path.read_text())
        if blob.get("settings") == settings:
            return blob["report"], blob.get("seconds"), False
    twin = next((other for other in sorted(folder.glob("*.json")) if other != path
                 and json.loads(other.read_text()).get("settings") == settings), None)
    if twin is None:
        return None
    blob = {**json.loads(twin.read_text()), "same_plan_as": twin.stem}
    write_json(path, blob, overwrite=True)
    return blob["report"], blob.get("seconds"), True


def store_evaluation(folder: Path, tag: str, settings: dict, report: dict, seconds: float) -> None:
    write_json(folder / f"{tag}.json", {"settings": settings, "seconds": seconds, "report": report}, overwrite=True)
