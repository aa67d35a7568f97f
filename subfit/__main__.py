"""`python -m subfit ...`, the `subfit` command; also what `torchrun --nproc-per-node N -m subfit generate
--tp N ...` starts in each process."""
import sys

from subfit.cli import main

sys.exit(main())
