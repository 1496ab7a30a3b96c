"""The first thing to run on a GPU: `python -m benchmarks.gpu_check`, one command, about 8 minutes.

Four steps under one deadline (`--budget-seconds`, default 480), each timed, with a progress line
(step, elapsed, budget left) on stderr:

1. the kernel tests, compiled on the GPU: `pytest -q` (no `-x`: every failure is reported) on the test
   files that run fdpo's Triton kernels (those of KERNEL_TESTS that exist), with pytest-xdist's `-n`
   and pytest-timeout's `--timeout` per test where they are installed, in a subprocess with an overall
   timeout (`--pytest-timeout`); a run that reaches it still reports the counts it printed;
2. the benchmark slice through the benchmark CLI's own pieces (`benchmarks.__main__`: every
   implementation checked against float64 before it is timed): bfloat16, V = 128256, D = 4096,
   N = 4096 and 16384, workloads logprobs, dpo-reverse_kl and tdpo, implementations naive,
   naive+compile, fdpo-torch, fdpo-triton (auto), fdpo-triton-fused, fdpo-triton-split, trl, liger
   and cce. An implementation the benchmarks do not define, a peer that is not installed or one that
   does not implement a workload is recorded as unavailable with the reason. Warm-up and repeats are
   sized from the cost model's predictions (`fdpo.cost`) to fit the time left after the tests; a
   shape or implementation that cannot fit even once is skipped, with the reason. Shapes run largest
   N first; each shape's prediction is rescaled by measured / predicted of the shapes before it, and
   a shape cut by the deadline keeps what it measured. The float64 expected results stay on the GPU,
   where each implementation's result is compared with them;
3. a table of measured ms, predicted ms (the cost model for this GPU), measured / predicted, peak
   memory and the ratio to the measured matmul floor, for every row;
4. `<output-dir>/<device>-<date>-<time>-gpu-check.json` (device, versions of torch, Triton, CUDA,
   the driver and the peers, the command, the plan, the pytest summary, every record), written marked
   partial after step 1 and after each shape and whole at the end, then the PNG of time and memory
   against N next to it. Standard output is flushed at every line.

Without CUDA it stops with a one-line error; `--dry-run` prints the plan instead (steps, shapes,
implementations and the predicted time of each on `--device-model`, default h100) and exits 0.

The cost model predicts the log-prob forward + backward of one model. For the two-model workloads
the prediction adds the reference model's passes as forward passes: 1 for dpo (its forward), 2 for
tdpo (its forward and the recomputation for the KL gradient), the matmul counts of the floor. Each
implementation is predicted at the rows it computes (`predicted_rows`): the scored tokens for fdpo,
TRL's head (which keeps the scored positions on CUDA) and cut-cross-entropy, all N tokens for naive and
Liger; the floor's matmul is measured, and predicted for planning, at the scored tokens.
Every predicted number is a prediction from public peak figures and assumptions, not a measurement.
"""

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import torch

from fdpo import cost

from . import __main__ as cli
from .measure import device_info, versions
from .workloads import DRIFT_CHECKED, REGISTRY, TWO_MODEL, scored_tokens, unavailable, workload_kind
from .workloads import IMPLEMENTATIONS as DEFINED

REPO = Path(__file__).resolve().parents[1]
# The test files that run fdpo's Triton kernels (compiled on a GPU); those not present are listed.
KERNEL_TESTS = ("test_logprobs.py", "test_token_stats.py", "test_split_backward.py", "test_backward_strategy.py",
                "test_preference_loss.py", "test_numerics.py", "test_pair_numerics.py", "test_two_model_losses.py",
                "test_double_backward.py", "test_autograd_composition.py")
WORKLOADS = ("logprobs", "dpo-reverse_kl", "tdpo")
TOKENS = (4096, 16384)
VOCAB = 128256
HIDDEN = 4096
DTYPE = "bfloat16"
PAIRS = 2
IMPLEMENTATIONS = ("naive", "naive+compile", "fdpo-torch", "fdpo-triton", "fdpo-triton-fused", "fdpo-triton-split",
                   "trl", "liger", "cce")
DEFAULT_BUDGET_S = 480.0
DEFAULT_PYTEST_TIMEOUT_S = 150
# Kept back from the benchmark slice for writing the JSON and PNG and exiting.
OUTPUT_RESERVE_S = 20.0
# (warm-up, repeats) in order of preference: the first whose predicted time fits is used.
REPEAT_PLANS = ((3, 10), (2, 10), (1, 10), (1, 7), (1, 5), (1, 3), (0, 3), (0, 2), (0, 1))

# The cost-model prediction (`fdpo.cost.predict_all` name) of each implementation; "fdpo-triton" is
# auto's choice (`fdpo.cost.choose_backward`). liger is modelled for logprobs only (its DPO loss is a
# different, chunked torch.compile'd algorithm), trl and cce not for the two-model workloads (which they do
# not implement); cce by its exact backward (an upper bound); naive+compile not at all.
PREDICTION_NAMES = {"naive": "naive", "fdpo-torch": "fdpo-torch", "fdpo-triton-fused": "fdpo-fused",
                    "fdpo-triton-split": "fdpo-split", "trl": "trl", "liger": "liger", "cce": "cce-exact"}

# Planning allowances (assumed, not measured). First calls: torch.compile traces and compiles again at
# each new shape (naive+compile; Liger's compiled DPO loss), about this many seconds; Triton kernels
# compile once per workload, on its first shape.
TORCH_COMPILE_S = 15.0
TRITON_JIT_S = 5.0
TORCH_COMPILED = ("naive+compile", "liger")
# The float64 reference (`benchmarks.workloads.float64_reference`) per workload family: its
# [N, D] x [D, V] matmuls (logprobs: forward, dH, dW; dpo: policy terms, reference, then the
# differentiated pass; tdpo: both models' terms, then both forwards, dH and dW), run at the FP32
# peak (the A100's and H100's FP64 tensor-core peaks equal their FP32 peaks) times cuBLAS's
# efficiency; about 200 bytes of float64 elementwise traffic per logit and model; and the copy of
# its float64 gradients to the host at an assumed 10 GB/s. The workloads of DRIFT_CHECKED are checked
# twice (`checks`): two references, and two check calls of each implementation.
REFERENCE_MATMULS = {"logprobs": 3, "dpo": 5, "tdpo": 6, "epsilon-dpo": 6}
REFERENCE_BYTES_PER_LOGIT = 200
# The float64 expected results stay on the GPU and each check compares there (`benchmarks.workloads.check`):
# about this many bytes of traffic per element of the value and the two gradients (read the result, write
# and read its float64 difference, the absolute value, and max|want|).
COMPARISON_BYTES_PER_ELEMENT = 48
# `benchmarks.measure.free_memory` (a gc.collect, a synchronize and an empty_cache) is called about
# 2 per implementation (after its check, before its peak) plus FREE_MEMORY_PER_SHAPE times per shape,
# each about this many seconds (a full collection of a process that has imported torch and the peers).
FREE_MEMORY_S = 0.2
FREE_MEMORY_PER_SHAPE = 2
# The kernel tests: pytest-xdist workers and pytest-timeout's limit per test, where they are installed;
# at the overall timeout the run is interrupted (SIGINT, for pytest's summary) and killed this much later.
PYTEST_WORKERS = 8
PYTEST_PER_TEST_TIMEOUT_S = 60
PYTEST_INTERRUPT_GRACE_S = 10.0


class DeadlineReached(BaseException):
    """Raised by the alarm at the deadline (a BaseException: the benchmark's `except Exception` lets it by)."""


# Implementations that compute the scored rows only (`predicted_rows`); the others compute all N.
SCORED_ONLY = ("fdpo-torch", "fdpo-triton", "fdpo-triton-fused", "fdpo-triton-split", "trl", "cce")


# ---- predictions and the plan ---------------------------------------------------------------------

def predicted_rows(name: str, workload: str, tokens: int) -> int:
    """The rows whose logits `name` computes on `workload` at N = `tokens`: the scored tokens for those of
    SCORED_ONLY (fdpo, TRL's head on CUDA and cut-cross-entropy skip the ignored positions), else N."""
    return scored_tokens(workload, tokens, PAIRS) if name in SCORED_ONLY else tokens


def predicted_seconds(name: str, workload: str, tokens: int, spec: cost.DeviceSpec) -> float | None:
    """The cost model's predicted seconds of one forward+backward of `name` on `workload` at N = `tokens`
    (V = VOCAB, D = HIDDEN, bfloat16) on `spec`, or None where the model has no such implementation.

    The model is evaluated at `predicted_rows`; the reference model's passes of the two-model workloads
    are added as forward passes (module doc).
    """
    kind = workload_kind(workload)
    rows = predicted_rows(name, workload, tokens)
    if name == "fdpo-triton":
        model = "fdpo-" + cost.choose_backward(rows, VOCAB, HIDDEN, torch.bfloat16, spec)
    elif (name == "liger" and kind != "logprobs") or (name in ("trl", "cce") and kind in TWO_MODEL):
        return None
    else:
        model = PREDICTION_NAMES.get(name)
    if model is None:
        return None
    prediction = _predictions(rows, spec)[model]
    return prediction.total_s + (cli.FLOOR_MATMULS[kind] - 4) * prediction.forward_s


@functools.cache
def _predictions(tokens: int, spec: cost.DeviceSpec) -> dict[str, cost.Prediction]:
    """The cost model's predictions at N = `tokens` (V = VOCAB, D = HIDDEN, bfloat16) by name."""
    return {p.name: p for p in cost.predict_all(cost.Shape(tokens, VOCAB, HIDDEN, torch.bfloat16), spec)}


def planning_seconds(name: str, workload: str, tokens: int, spec: cost.DeviceSpec) -> float:
    """Seconds assumed per call when planning: the prediction, or naive's where the model has none."""
    seconds = predicted_seconds(name, workload, tokens, spec)
    return predicted_seconds("naive", workload, tokens, spec) if seconds is None else seconds


def matmul_seconds(workload: str, tokens: int, spec: cost.DeviceSpec) -> float:
    """Predicted seconds of the floor's unit, timed in every round: one [S, D] x [D, V] matmul at the
    S scored tokens of `workload` at N = `tokens`."""
    rows = scored_tokens(workload, tokens, PAIRS)
    return cost.floor_seconds(cost.Shape(rows, VOCAB, HIDDEN, torch.bfloat16), spec) / 4


def checks(workload: str) -> int:
    """The float64 checks of each implementation on `workload`: 2 for DRIFT_CHECKED (the timed inputs and
    those with the reference CHECK_DRIFT away), else 1."""
    return 2 if workload in DRIFT_CHECKED else 1


def reference_seconds(workload: str, tokens: int, spec: cost.DeviceSpec) -> float:
    """Assumed seconds of the float64 references of one shape (see REFERENCE_MATMULS), `checks` of them
    (they stay on the GPU: no copy to the host)."""
    kind = workload_kind(workload)
    models = 1 if kind == "logprobs" else 2
    matmuls = REFERENCE_MATMULS[kind] * 2 * tokens * VOCAB * HIDDEN / (spec.fp32_flops * cost.GEMM_EFFICIENCY)
    elementwise = REFERENCE_BYTES_PER_LOGIT * models * tokens * VOCAB / (spec.hbm_bytes_per_s
                                                                        * cost.BANDWIDTH_EFFICIENCY)
    return checks(workload) * (matmuls + elementwise)


def comparison_seconds(tokens: int, spec: cost.DeviceSpec) -> float:
    """Assumed seconds of one check's comparison on the GPU against the float64 expected results: the
    gradients of hidden [N, D] and weight [V, D] (COMPARISON_BYTES_PER_ELEMENT each; the value is small)."""
    return COMPARISON_BYTES_PER_ELEMENT * (tokens + VOCAB) * HIDDEN / (spec.hbm_bytes_per_s
                                                                       * cost.BANDWIDTH_EFFICIENCY)


def free_memory_seconds(impls: int) -> float:
    """Assumed seconds of the `free_memory` calls of one shape with `impls` implementations."""
    return (2 * impls + FREE_MEMORY_PER_SHAPE) * FREE_MEMORY_S


def first_call_seconds(name: str, workload: str, compiled: set[tuple[str, str]]) -> float:
    """Assumed compile time of `name`'s first call at a shape of `workload`; `compiled` holds the
    (implementation, workload) pairs whose Triton kernels are already compiled, and is updated."""
    if name in TORCH_COMPILED and not (name == "liger" and workload == "logprobs"):
        return TORCH_COMPILE_S
    if name in ("naive", "fdpo-torch") or (name, workload) in compiled:
        return 0.0
    compiled.add((name, workload))
    return TRITON_JIT_S


@dataclasses.dataclass
class ShapePlan:
    """One shape of the slice: the implementations that run there, those that cannot (`unavailable`)
    and those left out to fit the budget (`dropped`), name -> reason; and its predicted cost:
    `fixed_s` (the float64 references, each implementation's check calls, their comparisons on the GPU
    and its memory call, first-call compiles, the `free_memory` calls) plus `round_s` (one call of each
    implementation and the matmul) per warm-up or timed round."""

    workload: str
    tokens: int
    impls: list[str]
    unavailable: dict[str, str]
    dropped: dict[str, str]
    fixed_s: float
    round_s: float

    def seconds(self, warmup: int, repeats: int) -> float:
        """Predicted seconds of the shape with `warmup` + `repeats` rounds."""
        return self.fixed_s + (warmup + repeats) * self.round_s


@dataclasses.dataclass
class Plan:
    """The benchmark slice sized to `budget_s`: the shapes that run (in order), the warm-up and repeats
    of all of them, and the shapes skipped entirely (workload, tokens, reason)."""

    budget_s: float
    shapes: list[ShapePlan]
    warmup: int
    repeats: int
    skipped: list[dict]

    @property
    def predicted_s(self) -> float:
        return sum(shape.seconds(self.warmup, self.repeats) for shape in self.shapes)


def availability(names: tuple[str, ...] = IMPLEMENTATIONS) -> dict[str, dict[str, str | None]]:
    """Per implementation and workload of the slice, why it cannot run on a CUDA GPU (None: it can):
    not defined by the benchmarks, a peer not installed, or a workload it does not implement."""
    gpu = torch.device("cuda")
    found = {}
    for name in names:
        if name not in DEFINED or name not in REGISTRY:
            found[name] = dict.fromkeys(WORKLOADS, "not defined in benchmarks/workloads.py")
        else:
            found[name] = {workload: unavailable(name, gpu, workload) for workload in WORKLOADS}
    return found


def _shape_plan(workload: str, tokens: int, names: list[str], available: dict[str, dict[str, str | None]],
                dropped: dict[str, str], spec: cost.DeviceSpec, compiled: set[tuple[str, str]]) -> ShapePlan:
    calls = {name: planning_seconds(name, workload, tokens, spec) for name in names}
    fixed = reference_seconds(workload, tokens, spec) + free_memory_seconds(len(names)) + sum(
        (checks(workload) + 1) * calls[name] + checks(workload) * comparison_seconds(tokens, spec)
        + first_call_seconds(name, workload, compiled) for name in names)
    missing = {name: reasons[workload] for name, reasons in available.items() if reasons[workload]}
    return ShapePlan(workload, tokens, names, missing, dict(dropped), fixed,
                     sum(calls.values()) + matmul_seconds(workload, tokens, spec))


def _fit(budget_s: float, spec: cost.DeviceSpec, available: dict[str, dict[str, str | None]], warmup: int,
         repeats: int) -> tuple[list[ShapePlan], list[dict]]:
    """(shapes, skipped shapes) of the slice at `warmup` and `repeats` within `budget_s`, shapes largest
    N first (N = 16384 is the shape the targets are about): a shape that does not fit loses its slowest
    implementations (never naive, the baseline) until it does, and is skipped when naive alone does not fit."""
    shapes, skipped, used = [], [], 0.0
    compiled: set[tuple[str, str]] = set()
    for tokens in sorted(TOKENS, reverse=True):
        for workload in WORKLOADS:
            names = [name for name in available if available[name][workload] is None]
            dropped: dict[str, str] = {}
            left = budget_s - used
            while True:
                trial = set(compiled)
                shape = _shape_plan(workload, tokens, names, available, dropped, spec, trial)
                if shape.seconds(warmup, repeats) <= left or names == ["naive"]:
                    break
                slowest = max((n for n in names if n != "naive"),
                              key=lambda n: planning_seconds(n, workload, tokens, spec))
                names.remove(slowest)
                dropped[slowest] = f"does not fit in the {max(left, 0):.0f} s left (predicted)"
            if shape.seconds(warmup, repeats) > left:
                skipped.append({"workload": workload, "tokens": tokens,
                                "reason": f"predicted {shape.seconds(warmup, repeats):.0f} s with naive alone, "
                                          f"{max(left, 0):.0f} s left"})
                continue
            compiled = trial
            shapes.append(shape)
            used += shape.seconds(warmup, repeats)
    return shapes, skipped


def make_plan(budget_s: float, spec: cost.DeviceSpec, available: dict[str, dict[str, str | None]]) -> Plan:
    """The slice that fits in `budget_s` predicted seconds on `spec`: every shape and implementation
    with the first (warm-up, repeats) of REPEAT_PLANS at which all of them fit; when none does, the
    last (fewest rounds), leaving out the slowest implementations and then whole shapes as `_fit` does.
    The plan never predicts more than the budget."""
    for warmup, repeats in REPEAT_PLANS:
        shapes, skipped = _fit(budget_s, spec, available, warmup, repeats)
        if not skipped and not any(shape.dropped for shape in shapes):
            break
    return Plan(budget_s, shapes, warmup, repeats, skipped)


# ---- records and the table ------------------------------------------------------------------------

def blank_record(workload: str, tokens: int, name: str, status: str, reason: str | None) -> dict:
    """A record of an implementation that was not measured, with the fields of the benchmark's records."""
    return {"workload": workload, "tokens": tokens, "scored_tokens": scored_tokens(workload, tokens, PAIRS),
            "pairs": None if workload == "logprobs" else PAIRS, "vocab": VOCAB, "hidden": HIDDEN, "dtype": DTYPE,
            "implementation": name, "floor_matmuls": cli.FLOOR_MATMULS[workload_kind(workload)],
            "status": status, "reason": reason, "errors": None, "peak_bytes": None, "largest_bytes": None,
            "seconds": None, "matmul_seconds": None, "floor_ratio": None, "time_vs_naive": None,
            "memory_vs_naive": None}


def add_predictions(records: list[dict], spec: cost.DeviceSpec | None) -> None:
    """Set each record's predicted_tokens (the rows it is predicted at, `predicted_rows`), predicted_seconds
    (None without a device model or a prediction) and measured_vs_predicted (None unless both exist)."""
    for r in records:
        predicted = None if spec is None else predicted_seconds(r["implementation"], r["workload"], r["tokens"], spec)
        r["predicted_tokens"] = predicted_rows(r["implementation"], r["workload"], r["tokens"])
        r["predicted_seconds"] = predicted
        r["measured_vs_predicted"] = r["seconds"] / predicted if r["seconds"] and predicted else None


def comparison_table(records: list[dict]) -> str:
    """Markdown table of every record: measured and predicted ms, measured / predicted, peak memory
    above the inputs and time over the measured floor (floor_matmuls x one measured matmul)."""
    lines = ["| workload | N | implementation | measured ms | predicted ms | measured / predicted | peak MiB | "
             "time / measured floor | status |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in records:
        status = r["status"] if r["status"] == "ok" or not r["reason"] else f"{r['status']}: {r['reason']}"
        lines.append(f"| {r['workload']} | {r['tokens']} | {r['implementation']} | "
                     f"{cli.fmt(r['seconds'] and r['seconds'] * 1e3, '.1f')} | "
                     f"{cli.fmt(r['predicted_seconds'] and r['predicted_seconds'] * 1e3, '.1f')} | "
                     f"{cli.fmt(r['measured_vs_predicted'], '.2f')} | {cli.mib(r['peak_bytes'])} | "
                     f"{cli.fmt(r['floor_ratio'], '.2f')} | {status} |")
    return "\n".join(lines)


def plan_table(plan: Plan, spec: cost.DeviceSpec, available: dict[str, dict[str, str | None]]) -> str:
    """Markdown table of the plan: every (workload, N, implementation) with its predicted ms per step
    and what happens to it (run, or why not)."""
    lines = ["| workload | N | implementation | predicted ms per step | plan |", "|---|---:|---|---:|---|"]
    planned = {(s.workload, s.tokens): s for s in plan.shapes}
    skipped = {(s["workload"], s["tokens"]): s["reason"] for s in plan.skipped}
    for tokens in sorted(TOKENS, reverse=True):  # the run's order: largest N first
        for workload in WORKLOADS:
            shape = planned.get((workload, tokens))
            for name in available:
                predicted = predicted_seconds(name, workload, tokens, spec)
                if shape is not None and name in shape.impls:
                    action = "run"
                elif available[name][workload]:
                    action = f"unavailable: {available[name][workload]}"
                elif shape is not None:
                    action = f"skipped: {shape.dropped[name]}"
                else:
                    action = f"skipped: {skipped[(workload, tokens)]}"
                lines.append(f"| {workload} | {tokens} | {name} | {cli.fmt(predicted and predicted * 1e3, '.1f')} "
                             f"| {action} |")
    return "\n".join(lines)


# ---- the steps ------------------------------------------------------------------------------------

class Clock:
    """The run's deadline and its progress lines (step, elapsed, budget left) on stderr."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def progress(self, message: str) -> None:
        cli.log(f"[gpu-check {self.elapsed():6.1f} s elapsed, {max(self.left(), 0):6.1f} s left] {message}")


def kernel_test_files() -> tuple[list[str], list[str]]:
    """(present, missing) paths of KERNEL_TESTS, relative to the repository."""
    paths = [f"tests/{name}" for name in KERNEL_TESTS]
    return [p for p in paths if (REPO / p).exists()], [p for p in paths if not (REPO / p).exists()]


def pytest_summary(output: str) -> dict[str, int]:
    """The outcome counts of pytest's last summary line ("3 passed, 1 failed, 2 skipped in 4.2s")."""
    summary = next((line for line in reversed(output.splitlines()) if re.search(r"\d+ \w+.* in [\d.]+s", line)), "")
    counts = {}
    for count, outcome in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", summary):
        counts["error" if outcome.startswith("error") else outcome] = int(count)
    return counts


def progress_counts(output: str) -> dict[str, int]:
    """The outcome counts of pytest's progress characters (`-q`: "..F.s  [ 12%]"), for a run stopped
    before its summary line."""
    names = {".": "passed", "F": "failed", "E": "error", "s": "skipped", "x": "xfailed", "X": "xpassed"}
    counts: dict[str, int] = {}
    for line in output.splitlines():
        match = re.fullmatch(r"([.FEsxX]+)\s*(\[\s*\d+%\])?", line.strip())
        for char in match.group(1) if match else "":
            counts[names[char]] = counts.get(names[char], 0) + 1
    return counts


def kernel_test_command(files: list[str]) -> list[str]:
    """The pytest arguments of step 1 (after `python -m pytest`): no `-x` (every failure is reported),
    pytest-xdist's `-n` workers and pytest-timeout's `--timeout` per test where they are installed."""
    command = ["-q", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist") is not None:
        command += ["-n", str(min(PYTEST_WORKERS, os.cpu_count() or 1))]
    if importlib.util.find_spec("pytest_timeout") is not None:
        command += ["--timeout", str(PYTEST_PER_TEST_TIMEOUT_S)]
    return [*command, *files]


def run_kernel_tests(timeout_s: float) -> dict:
    """Step 1: pytest (`kernel_test_command`) on the kernel test files in a subprocess of its
    own process group, finished within `timeout_s`: when it runs long it is interrupted (SIGINT: pytest
    prints its summary) PYTEST_INTERRUPT_GRACE_S before, then killed with its workers; a run stopped so
    reports the counts of its summary, or else of its progress characters."""
    present, missing = kernel_test_files()
    arguments = kernel_test_command(present)
    grace = min(PYTEST_INTERRUPT_GRACE_S, timeout_s / 4)
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "pytest", *arguments], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = process.communicate(timeout=timeout_s - grace)[0]
        returncode, counts = process.returncode, pytest_summary(output)
        status = "passed" if returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            output = process.communicate(timeout=grace)[0]
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
            output = process.communicate()[0]
        returncode, status = None, f"timed out after {timeout_s:.0f} s"
        counts = pytest_summary(output) or progress_counts(output)
    finally:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)  # workers left behind
    return {"command": shlex.join(["python", "-m", "pytest", *arguments]),
            "files": present, "missing_files": missing, "status": status, "returncode": returncode,
            "counts": counts, "seconds": round(time.monotonic() - started, 1),
            "output_tail": (output or "").splitlines()[-40:]}


@contextmanager
def deadline_alarm(seconds: float) -> Iterator[None]:
    """Raise DeadlineReached in the main thread after `seconds` (at once when not positive)."""
    def ring(signum: int, frame: FrameType | None) -> None:
        raise DeadlineReached

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def slice_argv(impls: list[str], plan: Plan, output_dir: Path, device: str = "cuda") -> list[str]:
    """The benchmark CLI's arguments for the slice with the implementations `impls` (all defined)."""
    return ["--device", device, "--dtype", DTYPE, "--tokens", *map(str, TOKENS), "--vocab", str(VOCAB),
            "--hidden", str(HIDDEN), "--pairs", str(PAIRS), "--workloads", *WORKLOADS, "--impls", *impls,
            "--warmup", str(plan.warmup), "--repeats", str(plan.repeats), "--no-search",
            "--output-dir", str(output_dir)]


def cut_records(partial: list[dict]) -> list[dict]:
    """The records of a shape stopped at the deadline (`measure_shape`'s `sink`), what was measured kept:
    a record checked (and its peak memory measured) but not timed keeps its errors and peak and becomes
    "skipped"; one not reached is "skipped"; wrong, failed, out-of-memory and unavailable ones stay."""
    kept = []
    for record in partial:
        record = dict(record)
        for key in ("floor_ratio", "time_vs_naive", "memory_vs_naive"):
            record.setdefault(key, None)
        if record["status"] == "not run":
            record.update(status="skipped", reason="stopped: the budget ran out")
        elif record["status"] == "ok" and record["seconds"] is None:
            record.update(status="skipped", reason="stopped: the budget ran out before it was timed "
                                                   "(its check and peak memory are kept)")
        kept.append(record)
    return kept


def run_slice(args: argparse.Namespace, plan: Plan, clock: Clock, measure: Callable[..., list[dict]] | None = None,
              on_shape: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Step 2: measure each planned shape with the benchmark CLI's `measure_shape` (`args` from its
    `parse_args`), all under an alarm at the output reserve, in the plan's order (largest N first). Before
    each shape its prediction is rescaled by measured / predicted seconds of the shapes done so far (when
    above 1: the predictions are only ever raised); it runs with the plan's rounds, or the
    fewest fewer rounds of REPEAT_PLANS that fit what is left, else it is skipped. A shape stopped by the
    deadline keeps what it measured (`cut_records`). `on_shape` is called with the records so far after
    each shape. Returns a record for every (workload, N, implementation): measured, or unavailable /
    skipped with the reason."""
    measure = measure or cli.measure_shape
    runner = cli.Runner(args, torch.device(args.device))
    available = availability()
    records = []
    for skip in plan.skipped:
        records += [blank_record(skip["workload"], skip["tokens"], name, *(
            ("unavailable", available[name][skip["workload"]]) if available[name][skip["workload"]]
            else ("skipped", skip["reason"]))) for name in IMPLEMENTATIONS]
    pending = list(plan.shapes)
    partial: list[dict] = []
    current = None  # the shape being measured
    measured_s = predicted_s = 0.0
    plans = REPEAT_PLANS[REPEAT_PLANS.index((plan.warmup, plan.repeats)):] if (
        plan.warmup, plan.repeats) in REPEAT_PLANS else ((plan.warmup, plan.repeats),)
    try:
        with deadline_alarm(clock.left() - OUTPUT_RESERVE_S):
            while pending:
                # The shape is `current` before it leaves `pending`: a deadline anywhere in between or
                # later still records it (and the pending loop below skips it).
                current, partial = pending[0], []
                pending.pop(0)
                shape = current
                scale = max(measured_s / predicted_s, 1.0) if predicted_s > 0 else 1.0
                left = clock.left() - OUTPUT_RESERVE_S
                warmup, repeats = next((p for p in plans if scale * shape.seconds(*p) <= left), plans[-1])
                predicted = shape.seconds(warmup, repeats)
                label = f"{shape.workload} N={shape.tokens}"
                not_run = ([blank_record(shape.workload, shape.tokens, name, "unavailable", reason)
                            for name, reason in shape.unavailable.items()]
                           + [blank_record(shape.workload, shape.tokens, name, "skipped", reason)
                              for name, reason in shape.dropped.items()])
                if scale * predicted > left:
                    clock.progress(f"step 2/4: skipping {label}: predicted {scale * predicted:.0f} s "
                                   f"(x {scale:.2f}, measured / predicted so far), {left:.0f} s left")
                    reason = (f"predicted {scale * predicted:.0f} s (rescaled by measured / predicted {scale:.2f}), "
                              f"{max(left, 0):.0f} s left when its turn came")
                    skipped = [blank_record(shape.workload, shape.tokens, name, "skipped", reason)
                               for name in shape.impls]
                    records, current = records + not_run + skipped, None
                    continue
                clock.progress(f"step 2/4: {label}: {', '.join(shape.impls)}, warm-up {warmup}, repeats {repeats} "
                               f"(predicted {scale * predicted:.0f} s)")
                shape_args = copy.copy(args)
                shape_args.impls, shape_args.warmup, shape_args.repeats = list(shape.impls), warmup, repeats
                shape_dict = {"workload": shape.workload, "tokens": shape.tokens, "vocab": VOCAB, "hidden": HIDDEN,
                              "dtype": DTYPE, "warmup": warmup, "repeats": repeats}
                started = clock.elapsed()
                got = measure(shape_args, runner, shape_dict, cli.DTYPES[DTYPE], runner.device, sink=partial)
                records, current = records + got + not_run, None  # one step: the alarm cannot split it
                measured_s += clock.elapsed() - started
                predicted_s += predicted
                if on_shape is not None:
                    on_shape(records)
    except DeadlineReached:
        clock.progress("step 2/4: the budget ran out; what the current shape measured is kept, "
                       "the shapes left are recorded as skipped")
        if current is not None:
            shape = current
            records += cut_records(partial) or [blank_record(shape.workload, shape.tokens, name, "skipped",
                                                             "stopped: the budget ran out") for name in shape.impls]
            records += [blank_record(shape.workload, shape.tokens, name, "skipped", "stopped: the budget ran out")
                        for name in shape.dropped]
            records += [blank_record(shape.workload, shape.tokens, name, "unavailable", reason)
                        for name, reason in shape.unavailable.items()]
        for shape in pending:
            if shape is current:
                continue
            records += [blank_record(shape.workload, shape.tokens, name, "skipped", "stopped: the budget ran out")
                        for name in [*shape.impls, *shape.dropped]]
            records += [blank_record(shape.workload, shape.tokens, name, "unavailable", reason)
                        for name, reason in shape.unavailable.items()]
    return records


def gpu_model() -> cost.DeviceSpec | None:
    """The cost model's spec of this machine's GPU (from torch.cuda.get_device_name); None without
    CUDA or for a GPU the model has no figures for (PCIe, NVL and 40 GB parts and MIG slices among them)."""
    if not torch.cuda.is_available():
        return None
    try:
        return cost.device_spec(torch.cuda.get_device_name())
    except ValueError:
        return None


def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi (None when it is not there)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


# ---- the command ----------------------------------------------------------------------------------

def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def device_model(text: str) -> cost.DeviceSpec:
    """argparse type: a device of the cost model (a100, h100, h200 or a CUDA device name)."""
    try:
        return cost.device_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-seconds", type=positive_float, default=DEFAULT_BUDGET_S,
                        help=f"deadline of the whole run in seconds (default: {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--pytest-timeout", type=positive_float, default=DEFAULT_PYTEST_TIMEOUT_S,
                        help="stop the kernel tests after this many seconds, within the budget "
                             f"(default: {DEFAULT_PYTEST_TIMEOUT_S})")
    parser.add_argument("--device-model", type=device_model,
                        help="cost-model device of the predictions: a100, h100, h200 or a CUDA device name "
                             "(default: the GPU's own; for --dry-run without a GPU: h100)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (steps, shapes, implementations, predicted times) and exit")
    parser.add_argument("--output-dir", type=Path, default=cli.RESULTS_DIR,
                        help="where the JSON and PNG go (default: benchmarks/results)")
    return parser.parse_args(argv)


def print_plan(plan: Plan, spec: cost.DeviceSpec, available: dict[str, dict[str, str | None]],
               tests: tuple[list[str], list[str]], pytest_timeout_s: float) -> None:
    """Print the steps, the slice and the predicted time of each (workload, N, implementation)."""
    present, missing = tests
    print(f"Plan for {spec.name}, budget {plan.budget_s + pytest_timeout_s + OUTPUT_RESERVE_S:.0f} s "
          "(times are predicted by the cost model, fdpo.cost, not measured)")
    print(f"step 1/4: kernel tests, compiled on the GPU, at most {pytest_timeout_s:.0f} s: "
          f"pytest {shlex.join(kernel_test_command(present))}"
          + (f" (not present: {', '.join(missing)})" if missing else ""))
    print(f"step 2/4: benchmark slice, {DTYPE}, V = {VOCAB}, D = {HIDDEN}, N = {' '.join(map(str, TOKENS))}, "
          f"workloads {' '.join(WORKLOADS)}; each implementation checked against float64, then warm-up "
          f"{plan.warmup} and {plan.repeats} timed repeats: predicted {plan.predicted_s:.0f} s of the "
          f"{plan.budget_s:.0f} s left after the tests; largest N first")
    print(plan_table(plan, spec, available))
    print("step 3/4: table of measured ms, predicted ms, measured / predicted, peak memory, time / measured floor")
    print("step 4/4: JSON + PNG in <output-dir>/<device>-<date>-<time>-gpu-check.{json,png} (the JSON, marked "
          "partial, also after step 1 and after each shape; the PNG last)")


def failures(pytest_result: dict, records: list[dict]) -> list[str]:
    """Why the check failed, one line each (none when it passed): kernel tests that did not pass, an fdpo
    implementation that was wrong or raised, or no fdpo-triton implementation measured at all (every one
    skipped, out of memory or failed: the check then measured none of fdpo's kernels)."""
    found = [] if pytest_result["status"] == "passed" else [f"kernel tests: {pytest_result['status']}"]
    found += [f"{r['implementation']} on {r['workload']} N={r['tokens']}: {r['status']}"
              + (f" ({r['reason']})" if r["reason"] else "")
              for r in records if r["implementation"].startswith("fdpo-") and r["status"] in ("wrong", "error")]
    if not any(r["implementation"].startswith("fdpo-triton") and r["status"] == "ok" for r in records):
        found.append("no fdpo-triton implementation was measured (all skipped, out of memory or failed): "
                     "the check measured none of fdpo's kernels")
    return found


def write_json(path: Path, report: dict) -> None:
    """Write `report` to `path` whole or not at all (a temporary file renamed over it)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(temporary, path)


def line_buffered_stdout() -> None:
    """Flush stdout at every line (a killed run keeps the lines printed so far)."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(ValueError, OSError):
            reconfigure(line_buffering=True)


def main(argv: list[str] | None = None) -> int:
    """Run the check (or print its plan with --dry-run); return the exit status: 0 when every step ran,
    the kernel tests passed, no fdpo implementation was wrong or failed and at least one fdpo-triton
    record was measured, else 1, with each reason on stderr (`failures`).

    The JSON is written (with "partial": true) after step 1 and after each shape, whole at the end, and
    the PNG after it: a kill keeps what was measured, a plotting failure loses only the PNG."""
    line_buffered_stdout()
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    available = availability()
    tests = kernel_test_files()
    if args.dry_run:
        spec = args.device_model or gpu_model() or cost.DEVICES["h100"]
        budget = args.budget_seconds - min(args.pytest_timeout, args.budget_seconds) - OUTPUT_RESERVE_S
        print_plan(make_plan(budget, spec, available), spec, available, tests, min(args.pytest_timeout,
                                                                                   args.budget_seconds))
        return 0
    if not torch.cuda.is_available():
        print("error: python -m benchmarks.gpu_check needs a CUDA GPU and none is available "
              "(--dry-run prints the plan without one)", file=sys.stderr)
        return 1
    clock = Clock(args.budget_seconds)
    started = datetime.datetime.now(datetime.timezone.utc)
    gpu = torch.device("cuda")
    spec = args.device_model or gpu_model()
    notes = [] if spec else [f"no cost model for {torch.cuda.get_device_name(gpu)}: no predictions; "
                             "the benchmark is sized as on an H100 SXM"]
    steps = []
    info = device_info(gpu) | {"driver": driver_version()}
    stem = f"{cli.slug(info['name'])}-{started:%Y%m%d-%H%M%S}-gpu-check"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / f"{stem}.json"
    report = {
        "created_utc": started.isoformat(timespec="seconds"),
        "command": command,
        "partial": True,
        "device": info,
        "versions": versions() | {"cuda": torch.version.cuda, "driver": info["driver"]},
        "budget_seconds": args.budget_seconds,
        "cost_model_device": spec.name if spec else None,
        "pytest": None,
        "plan": None,
        "steps": steps,
        "notes": notes,
        "floor_matmuls": cli.FLOOR_MATMULS,
        "results": [],
        "plots": [],
        "table": None,
        "wall_seconds": None,
    }

    def save(records: list[dict] | None = None, partial: bool = True) -> None:
        if records is not None:
            report["results"] = records
        report.update(partial=partial, wall_seconds=round(clock.elapsed(), 1))
        write_json(json_path, report)

    clock.progress(f"step 1/4: kernel tests ({len(tests[0])} files, at most {args.pytest_timeout:.0f} s)")
    pytest_result = run_kernel_tests(min(args.pytest_timeout, max(clock.left(), 1.0)))
    steps.append({"step": "kernel tests", "seconds": pytest_result["seconds"], "status": pytest_result["status"]})
    report["pytest"] = pytest_result
    save()
    clock.progress(f"step 1/4 done: {pytest_result['status']} {pytest_result['counts']}; wrote {json_path.name}")

    step_start = clock.elapsed()
    plan = make_plan(clock.left() - OUTPUT_RESERVE_S, spec or cost.DEVICES["h100"], available)
    report["plan"] = {"warmup": plan.warmup, "repeats": plan.repeats, "predicted_seconds": round(plan.predicted_s, 1),
                      "shapes": [dataclasses.asdict(s) for s in plan.shapes], "skipped": plan.skipped}
    save()  # the plan is in the file before the first (longest) shape starts
    clock.progress(f"step 2/4: benchmark slice, {len(plan.shapes)} shapes, warm-up {plan.warmup}, "
                   f"repeats {plan.repeats}, predicted {plan.predicted_s:.0f} s")
    defined = [name for name in IMPLEMENTATIONS if name in DEFINED and name in REGISTRY]
    cli_args = cli.parse_args(slice_argv(defined, plan, args.output_dir))
    records = run_slice(cli_args, plan, clock, on_shape=lambda so_far: save(copy.deepcopy(so_far)))
    steps.append({"step": "benchmark slice", "seconds": round(clock.elapsed() - step_start, 1), "status": "ran"})

    clock.progress("step 3/4: table")
    order = {(w, n, i): k for k, (n, w, i) in enumerate((n, w, i) for n in TOKENS for w in WORKLOADS
                                                         for i in IMPLEMENTATIONS)}
    records.sort(key=lambda r: order.get((r["workload"], r["tokens"], r["implementation"]), len(order)))
    add_predictions(records, spec)
    text = comparison_table(records)
    print(f"{torch.cuda.get_device_name(gpu)}, {DTYPE}, V = {VOCAB}, D = {HIDDEN}; predicted: fdpo.cost for "
          f"{spec.name if spec else 'no device'}")
    print(text)

    clock.progress("step 4/4: JSON, then PNG")
    report["table"] = text
    save(records, partial=False)
    try:
        png = cli.plot(records, lambda vocab, dim: args.output_dir / f"{stem}.png", f"{info['name']} ({DTYPE})")
    except Exception as err:  # the JSON is written: a plotting failure loses the PNG only
        png = []
        notes.append(f"no PNG: {type(err).__name__}: {err}"[:2000])
    report["plots"] = [p.name for p in png]
    save(partial=False)
    for note in notes:
        print(f"note: {note}")
    print(f"kernel tests: {pytest_result['status']} {pytest_result['counts']}")
    print(f"wrote {os.path.relpath(json_path)}" + "".join(f", {p.name}" for p in png))
    clock.progress("done")
    problems = failures(pytest_result, records)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
