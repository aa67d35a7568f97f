"""`release_freed_memory` returns the heap's free holes to the system: in a fresh process, 256 MB
of freed heap blocks (64 KB each, under any mmap threshold) pinned in place by small live ones
leave the resident memory only once it is called. `heap_for_walks` reuses a freed large block
instead of faulting a new one in page by page, and gives the memory back when it ends."""
import json
import os
import subprocess
import sys

import pytest

from subfit.memory import _libc

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


@pytest.mark.skipif(_libc("malloc_trim") is None, reason="no glibc malloc_trim here")
def test_release_freed_memory_returns_free_heap_pages():
    done = subprocess.run([sys.executable, "-c", JOB], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["held"] - result["released"] > 200 * 2**20, result


REUSE = r"""
import json, resource, torch
from subfit.memory import heap_for_walks

def faults(rounds):
    # minor page faults of each of `rounds` 64 MB blocks, allocated, written and freed in turn (above
    # glibc's largest mmap threshold: by default each is mapped anew)
    counts = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(2**24)
        del block
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts

def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))

default = faults(ROUNDS)
start = rss()
with heap_for_walks():
    inside = faults(ROUNDS)
after = rss()
print(json.dumps({"default": default, "inside": inside, "grown": after - start}))
"""
ROUNDS, SETTLED = 16, 6  # the heap settles within a few blocks (measured: by the 7th); the last SETTLED are judged
PAGES_PER_BLOCK = 2**26 // 4096


@pytest.mark.skipif(_libc("mallopt") is None, reason="no glibc mallopt here")
@pytest.mark.parametrize("environment", [{}, {"MALLOC_ARENA_MAX": "2"}], ids=["default", "malloc_env"])
def test_heap_for_walks_reuses_large_blocks_and_gives_them_back(environment):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | environment
    done = subprocess.run([sys.executable, "-c", REUSE.replace("ROUNDS", str(ROUNDS))], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    settled = {key: sum(result[key][-SETTLED:]) for key in ("default", "inside")}
    assert settled["default"] >= SETTLED * PAGES_PER_BLOCK, result  # mapped and faulted in anew each time
    assert result["grown"] < 16 * 2**20, result  # what the block held was given back at its end
    if environment:  # an allocator set up through the environment is left as it is
        assert settled["inside"] >= SETTLED * PAGES_PER_BLOCK, result
    else:  # reused, not faulted in again
        assert settled["inside"] < PAGES_PER_BLOCK, result
