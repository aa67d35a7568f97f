"""One selection draw of compress at one level: the units it picks and the held-out loss its plan
gets, as compress scores draws; with --float32, as on a machine without fast bf16 matmuls.

`python bench/compress/one_draw.py --calib FILE [--sparsity 0.375] [--draw 0] [--float32]
[--set seed=0 ...] [--model ID] [--threads 2] [--json FILE]` takes compress's calibration, held-out
split, draw order, greedy trajectory, final fit and held-out loss for draw `--draw` of
`compress_levels` at one level (a third of a default compress), on the embedded
SmolLM2-135M-Instruct unless --model names another. Where the machine has bf16 matrix units,
compress runs its scoring walks and probes in bf16 (subfit.hardware); --float32 turns bf16 off
everywhere, so the two runs show what the rounding changes in one draw.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from profile_compress import settings


def check_draw(draw: int, config) -> None:
    if not 0 <= draw < config.selection_draws:
        raise ValueError(f"draw {draw}: compress makes draws 0 to {config.selection_draws - 1}.")


def one_draw(model, tokenizer, calib: str | torch.Tensor, sparsity: float, draw: int, config, dev) -> dict:
    """Draw `draw` of `compress_levels(model, [sparsity], calib, config=config, dev=dev)` (`calib` a
    text file or token ids, as compress takes): its removed units and the loss its plan gets on the
    held-out sequences that choose between draws."""
    from subfit import compression, hardware, models, selection
    from subfit.config import check_sparsity
    from subfit.evaluation import mean_token_loss
    from subfit.plan import Plan
    from subfit.reference import ReferenceModel

    check_draw(draw, config)
    decoder = models.Decoder(model)
    source = models.source_of(model)
    empty = Plan.empty(decoder, source)
    calib_ids, _ = compression._calibration(calib, model, tokenizer, config)
    ranks = config.ranks(decoder.hidden_size)
    groups = selection.unit_groups(decoder.num_layers, dev.granularity)
    sizes = selection.group_sizes(groups, empty.unit_params)
    quota = int(check_sparsity(sparsity) * empty.block_params)
    walk_args = dict(batch_size=dev.batch_size, device=config.device, progress=False)
    fit_ids, validation_ids = selection.validation_split(calib_ids, config.selection_draws, config.seed)
    scoring_ids, probe_ids = selection.scoring_and_probe_ids(selection.draw_order(fit_ids, draw, config.seed),
                                                             dev.scoring_sequences(fit_ids.shape[0]), dev.probe_samples)
    start = time.perf_counter()
    selector = selection.Selector(decoder, groups, sizes, ranks, config.ridge, scoring_ids, probe_ids,
                                  dev.shortlist, walk_args, reuse_first_walk=False)
    removed, basis = selector.trajectory([quota], int(dev.step * empty.block_params))[quota]
    selected = time.perf_counter()
    del selector
    plan = Plan.empty(decoder, source)
    compression._fit_bypasses(plan, decoder, fit_ids, removed, basis, ranks, config.ridge, walk_args)
    home = next(model.parameters()).device
    with hardware.bf16_matmuls(home):  # as compress scores the draws
        loss = mean_token_loss(ReferenceModel(model, plan, check_base=False), validation_ids.to(home), 1)
    return {"removed": plan.removed_units(), "validation_loss": loss, "validation_samples": validation_ids.shape[0],
            "selection_s": selected - start, "total_s": time.perf_counter() - start}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", required=True, help="calibration text file")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--draw", type=int, default=0, help="which of compress's draws (0-based)")
    parser.add_argument("--float32", action="store_true", help="no bf16 matmuls, as on a CPU without bf16 units")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="SubFitConfig / DevOptions fields, e.g. seed=3 (default: compress's defaults)")
    parser.add_argument("--model", default=None, help="model id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from subfit import hardware, models

    if args.float32:
        hardware.fast_bf16 = lambda device: False  # the walks', fits' and losses' bf16 decisions all go through it
    try:
        config, dev = settings(args.set)
        check_draw(args.draw, config)
    except (ValueError, TypeError) as e:  # checked before the model loads
        parser.error(str(e))
    model, tokenizer, _ = models.load(args.model)
    result = {
        "command": "python bench/compress/one_draw.py " + " ".join(argv),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
                   f"bf16 units: {', '.join(hardware.cpu_bf16_units()) or 'none'}",
        "bf16_matmuls": hardware.fast_bf16("cpu"),
        **one_draw(model, tokenizer, args.calib, args.sparsity, args.draw, config, dev),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
