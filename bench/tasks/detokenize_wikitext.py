"""WikiText-2 raw with its tokenization undone, as lm-evaluation-harness's `wikitext` task scores it.

`python bench/tasks/detokenize_wikitext.py $SUBFIT_ASSETS/data/wikitext-2-raw/wiki.test.raw OUT.txt`
writes the text with lm-eval's own `wikitext_detokenizer` applied (" @-@ " -> "-", split punctuation
joined, ...), for `subfit eval --ppl OUT.txt`. Raw WikiText, which compression papers score, is a
format no calibration text has; the two files together tell a plan's loss on the format from its
loss on the language (docs/method.md, Known limits).
"""
from __future__ import annotations

import argparse
import sys

from subfit.calibration import read_text
from subfit.files import write_text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", help="WikiText raw text, e.g. wiki.test.raw")
    parser.add_argument("out", help="where to write the detokenized text")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
    except ImportError:
        parser.error("needs lm-eval's detokenizer: pip install -e '.[eval]'")
    try:
        write_text(args.out, wikitext_detokenizer({"page": read_text(args.raw, "WikiText file")}),
                   overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
