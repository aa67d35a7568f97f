"""Phase 5: compression time and peak GPU memory, Llama-3.2-1B-shaped random model at 25% on the GPU.

The model is float32 (as `subfit compress` loads one) and lives on the GPU; calibration is 128 x 512
random tokens with one selection draw on 32 scored sequences.
"""
from __future__ import annotations

import time

import torch

from bench.gpu.figures import Phase, phase_args
from bench.gpu.shapes import random_model

MODEL, SPARSITY = "Llama-3.2-1B", 0.25
CALIB, DRY_RUN_CALIB = (128, 512), (8, 32)  # sequences x tokens
SCORE_SAMPLES, DRY_RUN_SCORE_SAMPLES = 32, 4


def compress_on(model, calib_ids: torch.Tensor, device: torch.device, score_samples: int):
    """The one call of the compression API this phase makes (its progress bars show in the log how
    far a run cut by the time box got)."""
    from subfit import DevOptions, SubFitConfig, compress

    config = SubFitConfig(calib_samples=calib_ids.shape[0], calib_len=calib_ids.shape[1], selection_draws=1,
                          device=str(device))
    return compress(model, SPARSITY, calib_ids, config=config, dev=DevOptions(score_samples=score_samples),
                    progress=device.type == "cuda")


def main() -> None:
    args = phase_args(__doc__.splitlines()[0])
    phase = Phase(5, "compress", args)
    with phase.running():
        device = torch.device("cpu" if args.dry_run else "cuda")
        samples, length = DRY_RUN_CALIB if args.dry_run else CALIB
        phase.figure("setting", f"{MODEL}-shaped random model, float32, sparsity {SPARSITY}, calibration {samples} x "
                                f"{length} random tokens, 1 selection draw, "
                                f"{DRY_RUN_SCORE_SAMPLES if args.dry_run else SCORE_SAMPLES} scored, device {device}")
        start = time.perf_counter()
        model, _ = random_model(MODEL, dtype=torch.float32, device=device, dry_run=args.dry_run)
        calib_ids = torch.randint(0, model.config.vocab_size, (samples, length), generator=torch.Generator().manual_seed(0))
        phase.figure("model_build_s", time.perf_counter() - start)
        phase.figure("model_bytes", sum(p.numel() * p.element_size() for p in model.parameters()))
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        plan = compress_on(model, calib_ids, device, DRY_RUN_SCORE_SAMPLES if args.dry_run else SCORE_SAMPLES)
        if device.type == "cuda":
            torch.cuda.synchronize()
        phase.figure("compress_s", time.perf_counter() - start)
        if device.type == "cuda":
            phase.figure("peak_gpu_allocated_bytes", torch.cuda.max_memory_allocated())  # the model's bytes included
            phase.figure("peak_gpu_reserved_bytes", torch.cuda.max_memory_reserved())
        phase.figure("sparsity", plan.accounting()["sparsity"])
        phase.figure("removed", plan.removed_units())


if __name__ == "__main__":
    main()
