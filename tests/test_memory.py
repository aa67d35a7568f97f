"""glibc's heap during compress, in fresh child processes: `release_freed_memory` returns the
heap's free holes (256 MB of freed 64 KB blocks pinned in place by small live ones leave the
resident memory only once it is called), and `heap_kept_during_compress` reuses freed large blocks
instead of faulting new ones in, gives them back on the way out, and leaves a user's own settings
alone."""
import json
import os
import subprocess
import sys

import pytest

from subfit.memory import _glibc

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


@pytest.mark.skipif(_glibc() is None, reason="no glibc malloc_trim here")
def test_release_freed_memory_returns_free_heap_pages():
    done = subprocess.run([sys.executable, "-c", JOB], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["held"] - result["released"] > 200 * 2**20, result


CHURN = r"""
import json, resource, torch
from subfit.memory import heap_kept_during_compress

def churn():
    # minor page faults of each of ROUNDS 64 MB blocks, allocated, written and freed in turn (over the
    # threshold glibc's own adjustment stops at: by default each is mapped anew)
    counts = []
    for _ in range(ROUNDS):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(2**24)
        del block
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))

outside, before = churn(), rss()
with heap_kept_during_compress() as kept:
    inside = churn()
print(json.dumps({"kept": kept, "outside": outside, "inside": inside, "grown": rss() - before}))
"""
# The heap settles within a few blocks (measured: by the 7th; until then a small block allocated above
# a freed one can leave it a few bytes short of the next aligned request): the last SETTLED are judged.
ROUNDS, SETTLED = 16, 6
PAGES_PER_BLOCK = 2**26 // 4096


def _churn(env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHURN.replace("ROUNDS", str(ROUNDS))], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result | {key: sum(result[key][-SETTLED:]) for key in ("outside", "inside")}


@pytest.mark.skipif(_glibc() is None, reason="glibc's allocator only")
def test_compress_reuses_freed_blocks_instead_of_faulting_them_in():
    result = _churn({k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
    assert result["kept"], result
    assert result["outside"] >= SETTLED * PAGES_PER_BLOCK, result  # mapped and faulted in anew each time
    assert result["inside"] < PAGES_PER_BLOCK, result  # reused, not faulted in again
    assert result["grown"] < 16 * 2**20, result  # the freed blocks are given back on the way out


@pytest.mark.skipif(_glibc() is None, reason="glibc's allocator only")
def test_allocator_settings_of_the_user_are_left_alone():
    result = _churn({**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)})
    assert not result["kept"], result
    assert result["inside"] >= SETTLED * PAGES_PER_BLOCK, result
