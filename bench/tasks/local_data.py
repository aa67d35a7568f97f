"""Loader of the local task files for the task YAMLs here (`custom_dataset: !function local_data.load`).

The files live outside the repository (`data/mc_eval/` of the shared assets), so a plain
`data_files:` path would resolve against the working directory. This finds them from anywhere:
`--metadata '{"assets": "DIR"}'`, else $SUBFIT_ASSETS, else `../shared/assets` next to the repository.
Every line is checked before lm-eval sees it, so a bad example is refused naming its file and line
instead of surfacing as an IndexError deep in lm-eval (or, worse, being scored against a wrong gold).
"""
import json
import numbers
import os
from pathlib import Path

import datasets

DEFAULT_ASSETS = Path(__file__).resolve().parents[2].parent / "shared" / "assets"
# The three formats of the files: field -> "text" (a string), "texts" (a non-empty list of strings)
# or "index" (the gold entry of the list field beside it).
FORMATS = {
    "choices": {"query": "text", "choices": "texts", "gold": "index"},
    "context_options": {"context_options": "texts", "continuation": "text", "gold": "index"},
    "context": {"context": "text", "continuation": "text"},
}


def check_example(doc) -> None:
    """Refuse an example whose format, field types or gold index are wrong, saying which."""
    if not isinstance(doc, dict):
        raise ValueError(f"an example is {doc!r:.60}; expected a JSON object.")
    kind = next((key for key in FORMATS if key in doc), None)
    if kind is None:
        raise ValueError(f"unknown format with keys {sorted(doc)}; expected the fields of one of "
                         f"{[list(fields) for fields in FORMATS.values()]}.")
    fields = FORMATS[kind]
    missing = [name for name in fields if name not in doc]
    if missing:
        raise ValueError(f"the example lacks {', '.join(map(repr, missing))}; its format needs {list(fields)}.")
    for name, need in fields.items():
        value = doc[name]
        if need == "text" and not (isinstance(value, str) and value.strip()):
            raise ValueError(f"{name} is {value!r:.60}; expected a non-empty string.")
        if need == "texts" and not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise ValueError(f"{name} is {value!r:.60}; expected a non-empty list of strings.")
        if need == "index":
            count = len(doc[kind])
            if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < count):
                raise ValueError(f"gold is {value!r}; expected the index of the right entry of {kind!r}, an "
                                 f"integer from 0 to {count - 1}.")


def read_examples(path: Path) -> list[dict]:
    """The examples of a JSON-lines task file, each checked; a bad line is refused as FILE:LINE."""
    examples = []
    for line_no, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw.decode("utf-8"))
            check_example(doc)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{line_no} is not UTF-8 text (byte {e.start}); task files are UTF-8 JSON "
                             "lines.") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{path}:{line_no} is not valid JSON ({e}).") from None
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: {e}") from None
        examples.append(doc)
    if not examples:
        raise ValueError(f"Task file {path} holds no examples.")
    return examples


def load(file: str, assets: str | None = None, **_metadata) -> datasets.DatasetDict:
    """The JSON-lines task `file` as a one-split ("test") dataset; other lm-eval metadata is ignored."""
    root = Path(assets or os.environ.get("SUBFIT_ASSETS") or DEFAULT_ASSETS)
    path = root / "data" / "mc_eval" / file
    if not path.is_file():
        raise FileNotFoundError(f"Task file {path} not found: set SUBFIT_ASSETS to the shared assets folder "
                                "(or pass --metadata '{\"assets\": \"DIR\"}').")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_examples(path))})
