"""How things are measured: time, peak memory above the inputs, the matmul floor, the machine.

Time: median over repeats after warm-up, with CUDA events on a GPU; on CPU with one thread, the
process's CPU time (time.process_time), which other processes on a shared machine do not inflate the
way they inflate wall time (a time slice spent waiting for a core is not counted); on CPU with more
threads, wall time (time.perf_counter), since the process time would add up the threads. The
implementations compared at one shape are called in turn in each round, so that what load remains
(shared caches and memory bandwidth) weighs on all of them alike.
Peak memory above the inputs: on a GPU, torch.cuda.max_memory_allocated during the call minus what
was allocated before it; on CPU, the peak of live bytes in PyTorch's CPU allocator during the call,
from torch.profiler's memory events. (fdpo.profiling.AllocationTracker sees the tensors that eager
operators return, but not the buffers inside a torch.compile graph, so the allocator's own events are
the one measure that is fair to every implementation.) Both count the gradients the call creates.
Largest single allocation (CPU): the biggest block the allocator hands out during the call, from the
same events: a materialized [N, V] float32 logits tensor shows up here as 4 N V bytes.
"""

import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata

import torch
from torch.profiler import ProfilerActivity, profile

PEER_DISTRIBUTIONS = ("triton", "transformers", "numpy", "liger-kernel", "cut-cross-entropy", "trl")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_name(device: torch.device) -> str:
    """What `_seconds` measures on `device` with the current thread count (recorded with the results)."""
    if device.type == "cuda":
        return "CUDA events"
    return "process CPU time" if torch.get_num_threads() == 1 else "wall time"


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of `fn`: CUDA events on a GPU; on CPU, process CPU time with one thread, else
    wall time (see the module doc)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    start_s = clock()
    fn()
    return clock() - start_s


def median_seconds(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int,
                   repeats: int) -> dict[str, float | Exception]:
    """Median time in seconds (see `_seconds`) of each of `fns` over `repeats` rounds after `warmup` rounds.

    Every round calls each function once, in turn, so that a change in the load of a shared
    machine hits all of them alike. A function that raises (out of memory, say) is dropped from the
    later rounds and its exception returned in place of its time.
    """
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    failed: dict[str, Exception] = {}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            if name in failed:
                continue
            try:
                seconds = _seconds(fn, device)
            except Exception as err:  # reported with the results, the other functions go on
                failed[name] = err
                free_memory(device)
                continue
            if round_ >= warmup:
                times[name].append(seconds)
    return {name: failed[name] if name in failed else statistics.median(times[name]) for name in fns}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines) inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, int | None]:
    """Peak bytes allocated during `fn()` above what was allocated when it started (see the module doc),
    and the largest single allocation made during the call (CPU: from the allocator's events; None on a GPU)."""
    if device.type == "cuda":
        free_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, None
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = largest = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
        largest = max(largest, event.nbytes())
    return peak, largest


def matmul_call(tokens: int, vocab: int, dim: int, *, dtype: torch.dtype,
                device: torch.device) -> Callable[[], torch.Tensor]:
    """A call of torch.matmul [N, D] x [D, V] (2 N V D flops) on random operands: the matmul floor's unit."""
    a = torch.randn(tokens, dim, device=device, dtype=dtype)
    b = torch.randn(vocab, dim, device=device, dtype=dtype).T
    return lambda: torch.matmul(a, b)


def free_memory(device: torch.device) -> None:
    """On a GPU, collect garbage and return cached blocks (after an out-of-memory error, before a peak)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    """The machine: device name, CPU model, threads, and for a GPU its capability and memory."""
    info = {"type": device.type, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_bytes=props.total_memory, cuda=torch.version.cuda)
    else:
        info["name"] = info["cpu"]
    return info


def versions() -> dict[str, str | None]:
    """Python, torch and fdpo versions, and those of Triton, transformers, numpy and the peers (None: absent)."""
    import fdpo

    found = {"python": platform.python_version(), "torch": torch.__version__, "fdpo": fdpo.__version__}
    for dist in PEER_DISTRIBUTIONS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found
