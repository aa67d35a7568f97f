"""The one-shot GPU check run by bench/gpu.sh: one module per phase, each a separate, time-boxed process.

device.py (1: the ceilings), cuda_tests.py (2), kernels.py (3), decode.py (4), compress.py (5);
report.py merges what they wrote into gpu.json / gpu.md and prints the closing table.
"""
