"""`release_freed_memory` returns the heap's free holes to the system: in a fresh process, 256 MB
of freed heap blocks (64 KB each, under any mmap threshold) pinned in place by small live ones
leave the resident memory only once it is called."""
import json
import subprocess
import sys

import pytest

from subfit.memory import _malloc_trim

JOB = r"""
import json, torch
from subfit.memory import release_freed_memory

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))

blocks, pins = [], []
for _ in range(4096):
    blocks.append(torch.ones(2**14))  # 64 KB each: glibc serves them from its heap
    pins.append(torch.ones(16))  # small live tensors between them: the heap cannot shrink from its top
del blocks
held = rss()
release_freed_memory()
print(json.dumps({"held": held, "released": rss()}))
"""


@pytest.mark.skipif(_malloc_trim() is None, reason="no glibc malloc_trim here")
def test_release_freed_memory_returns_free_heap_pages():
    done = subprocess.run([sys.executable, "-c", JOB], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["held"] - result["released"] > 200 * 2**20, result
