"""Timing on the device: CUDA events, never the host clock around asynchronous work.

`time_calls` times one implementation two ways, both cycling through several input sets so that
inputs larger than L2 come from device memory on every call:
  graph: the calls captured back to back in one CUDA graph and replayed; per call, the GPU's own
         time (how the decode runtime runs, with no launch gaps from Python);
  eager: the same calls launched from Python; per call, what a framework loop pays (at decode
         shapes mostly the host's launch cost).
On the CPU (the dry run) both are host-clock loops: they check the machinery, not the speed.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

MIN_CALLS = 32  # per timed region: keeps a region well above the event resolution (~1 us)


@dataclass
class CallTimes:
    eager_s: float
    graph_s: float | None  # None where capture failed (graph_error says why)
    graph_error: str | None = None


def time_calls(call: Callable[[int], object], sets: int, device: torch.device, repeats: int = 10) -> CallTimes:
    """Per-call seconds of `call(i)`, i cycling over `sets` input sets (median of `repeats` regions)."""
    calls = sets * math.ceil(MIN_CALLS / sets)
    for i in range(sets):  # compile, autotune, first-touch: outside every timing
        call(i)
    if device.type != "cuda":
        return CallTimes(_host_seconds(call, sets, min(calls, 2 * sets), repeats), None, "no CUDA graphs on CPU")
    def all_calls() -> None:  # results are dropped at once, as a decode step drops its intermediates
        for i in range(calls):
            call(i % sets)

    torch.cuda.synchronize(device)
    eager = _event_seconds(all_calls, repeats) / calls
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            all_calls()
        graph.replay()
        return CallTimes(eager, _event_seconds(graph.replay, repeats) / calls)
    except Exception as error:  # noqa: BLE001 - e.g. an implementation that syncs with the host
        torch.cuda.synchronize(device)
        return CallTimes(eager, None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")


def _event_seconds(region: Callable[[], object], repeats: int) -> float:
    """Median seconds of `region` between two CUDA events on the current stream."""
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        region()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return statistics.median(seconds)


def _host_seconds(call: Callable[[int], object], sets: int, calls: int, repeats: int) -> float:
    seconds = []
    for _ in range(min(repeats, 3)):
        start = time.perf_counter()
        for i in range(calls):
            call(i % sets)
        seconds.append((time.perf_counter() - start) / calls)
    return statistics.median(seconds)


def event_seconds(region: Callable[[], object], repeats: int = 10) -> float:
    """Median seconds of `region` on the device (host clock on CPU), after one warm-up run."""
    region()
    if not torch.cuda.is_available():
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            region()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds)
    torch.cuda.synchronize()
    return _event_seconds(region, repeats)


def rotation_sets(set_bytes: int, device: torch.device, cap: int = 64) -> int:
    """Input sets to cycle through so that together they are 3x the L2 cache (2 on CPU): a set is
    then evicted before its next use. Sets of a few KB cannot leave L2 (cap): those are decode
    shapes, reported in microseconds, where latency rather than bandwidth is the figure."""
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 60 << 20)
    return max(2, min(cap, math.ceil(3 * l2 / max(set_bytes, 1))))


def copy_bandwidth(work: Path, device: torch.device) -> float:
    """Bytes/s every roofline figure is read against: phase 1's measurement of this run, or
    measured here when phase 1 did not get that far (the phases are independent)."""
    from subfit.runtime.bench import memory_bandwidth

    try:
        return float(json.loads((work / "phase1.json").read_text())["figures"]["copy_bandwidth_Bps"])
    except (OSError, KeyError, ValueError):
        return memory_bandwidth(device)
