"""Loader of the local task files for the task YAMLs here (`custom_dataset: !function local_data.load`).

The files live outside the repository (`data/mc_eval/` of the shared assets), so a plain
`data_files:` path would resolve against the working directory. This finds them from anywhere:
`--metadata '{"assets": "DIR"}'`, else $SUBFIT_ASSETS, else `../shared/assets` next to the repository.
"""
import os
from pathlib import Path

import datasets

DEFAULT_ASSETS = Path(__file__).resolve().parents[2].parent / "shared" / "assets"


def load(file: str, assets: str | None = None, **_metadata) -> datasets.DatasetDict:
    """The JSON-lines task `file` as a one-split ("test") dataset; other lm-eval metadata is ignored."""
    root = Path(assets or os.environ.get("SUBFIT_ASSETS") or DEFAULT_ASSETS)
    path = root / "data" / "mc_eval" / file
    if not path.is_file():
        raise FileNotFoundError(f"Task file {path} not found: set SUBFIT_ASSETS to the shared assets folder "
                                "(or pass --metadata '{\"assets\": \"DIR\"}').")
    return datasets.load_dataset("json", data_files={"test": str(path)})
