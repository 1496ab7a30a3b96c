"""Benchmark fdpo against naive PyTorch, torch.compile and the peers: `python -m benchmarks`.

Every implementation runs in this one process on identical inputs and is first checked against the
naive computation in float64 (values and gradients); a wrong one is reported and not timed. For each
workload, vocabulary V, hidden size D and token count N it reports the median forward+backward time,
the peak memory above the inputs, the ratio to the matmul floor (the workload's matmul count times a
measured torch.matmul [S, D] x [D, V] at the S scored tokens, those whose label is not ignored: the
work an implementation cannot avoid; 4 for log-probs, 5 for the f-DPO head: the policy's 4 plus the
reference's forward and 5 for epsilon-DPO, 6 for TDPO, whose KL gradient recomputes the reference's
logits) and both ratios to naive (on the same N tokens). Each record holds N (`tokens`) and S
(`scored_tokens`). On a GPU it also finds, at a fixed V and D, the most tokens each
implementation handles before running out of memory (doubling N).

Outputs: a table on stdout, and in --output-dir a JSON file named by device and time (device,
versions, settings, command line, load average, every figure) and one PNG per (V, D) of time and
memory against N.

Workloads: logprobs, dpo-reverse_kl, dpo-forward_kl, dpo-js, dpo-alpha, tdpo, epsilon-dpo, divergence,
distillation (benchmarks/workloads.py).
Implementations: naive, naive+compile, fdpo-torch, fdpo-triton (its head backward chosen by the
cost model), fdpo-triton-fused and fdpo-triton-split (each head backward pinned; the three triton
ones CUDA only), and the peers when installed: liger and liger-eager (Liger-Kernel's DPO loss
compiled and eager; its per-token cross entropy is CUDA only), cce (cut-cross-entropy;
impl="torch_compile" on CPU) and trl (TRL's chunked log-prob function). The unavailable ones are
listed with the reason.

Examples:
    python -m benchmarks --quick                       # CPU, float32, N in {128, 256, 512}, < 5 min
    python -m benchmarks                               # GPU: the full sweep in bfloat16
    python -m benchmarks --tokens 4096 16384 --vocab 128256 --hidden 4096 --workloads logprobs
"""

import argparse
import datetime
import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .measure import (
    clock_name,
    device_info,
    free_memory,
    matmul_call,
    median_seconds,
    peak_bytes,
    synchronize,
    versions,
)
from .workloads import (
    CHECK_DRIFT,
    DRIFT_CHECKED,
    IMPLEMENTATIONS,
    REGISTRY,
    TOLERANCE,
    WORKLOADS,
    Inputs,
    allowed_error,
    check,
    check_workload,
    float64_reference,
    make_inputs,
    scored_tokens,
    step,
    tolerance,
    unavailable,
    workload_kind,
)

RESULTS_DIR = Path(__file__).parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Matmuls of 2 S V D flops (S: the scored tokens) a workload cannot do without (without keeping [S, V] tensors): the
# policy's forward, its recomputation in the backward, dE and dW; the reference's forward (all but
# logprobs) and its recomputation for the KL gradient (tdpo) or the divergence's (divergence, distillation:
# its logged entropy needs none of its own). epsilon-DPO's perturbed logits are sums of the two models'
# logits: no matmul of their own.
FLOOR_MATMULS = {"logprobs": 4, "dpo": 5, "tdpo": 6, "epsilon-dpo": 5, "divergence": 6, "distillation": 6}

FULL = {"tokens": [1024 * 2**i for i in range(7)], "vocab": [32000, 128256, 256000], "hidden": [2048, 4096],
        "repeats": 10, "warmup": 3}
# --quick runs on one CPU thread: on a small shared machine, two OpenMP threads of PyTorch (and those of
# the compiled kernels) wait on each other whenever another process holds a core, which slows the
# many-operation implementations several-fold and makes the comparison meaningless.
QUICK = {"tokens": [128, 256, 512], "vocab": [32000], "hidden": [256], "repeats": 3, "warmup": 0, "threads": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the small CPU sweep: float32 on CPU, N in {128, 256, 512}, V=32000, D=256, "
                             "3 repeats, no extra warm-up, one thread (explicit options below still apply)")
    parser.add_argument("--tokens", type=int, nargs="+", metavar="N",
                        help="token counts N (default: 1024 ... 65536 in powers of 2)")
    parser.add_argument("--vocab", type=int, nargs="+", metavar="V",
                        help="vocabulary sizes V (default: 32000 128256 256000)")
    parser.add_argument("--hidden", type=int, nargs="+", metavar="D", help="hidden sizes D (default: 2048 4096)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="dtype of hidden states and head (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        help="where to run (default: cuda when available, else cpu; --quick: cpu)")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS),
                        help="workloads to run (default: all)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS),
                        help="implementations to compare (default: all; naive is always run, it is the baseline)")
    parser.add_argument("--pairs", type=int, default=2,
                        help="preference pairs P of the dpo workloads: N tokens are 2P rows of N / 2P (default: 2)")
    parser.add_argument("--repeats", type=int, help="timed repeats per measurement, median reported "
                                                    "(default: 10; --quick: 3)")
    parser.add_argument("--warmup", type=int, help="untimed calls before the timed ones, after the checking "
                                                   "and the memory call (default: 3; --quick: 0)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of naive+compile (default: inductor)")
    parser.add_argument("--search-vocab", type=int,
                        help="V of the out-of-memory search on CUDA (default: the largest --vocab)")
    parser.add_argument("--search-hidden", type=int,
                        help="D of the out-of-memory search on CUDA (default: the largest --hidden)")
    parser.add_argument("--search-max-tokens", type=int, default=1 << 21,
                        help="stop the out-of-memory search at this many tokens (default: 2097152)")
    parser.add_argument("--no-search", action="store_true", help="skip the out-of-memory search on CUDA")
    parser.add_argument("--threads", type=int,
                        help="CPU threads of PyTorch (torch.set_num_threads; default: PyTorch's default; --quick: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR,
                        help="where the JSON and PNG files go (default: benchmarks/results)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if "naive" not in args.impls:
        args.impls.insert(0, "naive")
    for name in ("tokens", "vocab", "hidden"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name} values must be positive, got {getattr(args, name)}")
    if args.repeats < 1 or args.warmup < 0 or args.pairs < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats, --pairs and --threads must be at least 1, --warmup at least 0")
    try:
        for workload in args.workloads:
            for tokens in args.tokens:
                check_workload(workload, tokens, args.pairs)
    except ValueError as err:
        parser.error(str(err))
    args.search_vocab = args.search_vocab or max(args.vocab)
    args.search_hidden = args.search_hidden or max(args.hidden)
    return args


class Runner:
    """Builds each implementation once (so compiled graphs are reused) and measures it on given inputs."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self._built: dict[str, Callable[[Inputs], torch.Tensor] | Exception] = {}

    def implementation(self, name: str) -> Callable[[Inputs], torch.Tensor]:
        if name not in self._built:
            try:
                self._built[name] = REGISTRY[name].build(compile_backend=self.args.compile_backend)
            except Exception as err:  # an import or set-up failure of a peer is a result, not a crash
                self._built[name] = err
        built = self._built[name]
        if isinstance(built, Exception):
            raise built
        return built

    def check_and_peak(self, name: str, inputs: Inputs, expected: tuple[torch.Tensor, ...], allowed: float,
                       drift_check: tuple[Inputs, tuple[torch.Tensor, ...], float] | None = None) -> dict:
        """Check `name` on `inputs` against `expected` (the largest relative error accepted: `allowed`) and,
        given `drift_check` (inputs with the reference CHECK_DRIFT away, their float64 reference and the
        error accepted there), on those too; then (if right) measure its peak memory on `inputs`.

        Returns the record fields status ("ok", "wrong", "out of memory" or "error"), reason, errors and
        drift_errors (relative errors of value, grad_hidden, grad_weight on each; None where not checked),
        peak_bytes and largest_bytes (see `peak_bytes`).
        """
        record: dict = {"status": "ok", "reason": None, "errors": None, "drift_errors": None, "peak_bytes": None,
                        "largest_bytes": None}
        try:
            impl = self.implementation(name)
            record["errors"] = check(impl, inputs, expected)
            checked = [(record["errors"], allowed, "")]
            if drift_check is not None:
                record["drift_errors"] = check(impl, *drift_check[:2])
                checked.append((record["drift_errors"], drift_check[2], f" at reference drift {CHECK_DRIFT:g}"))
            for errors, limit, where in checked:
                if max(errors.values()) > limit:
                    worst = max(errors, key=errors.get)
                    return record | {"status": "wrong", "reason": f"{worst} differs from the float64 reference by "
                                                                  f"{errors[worst]:.2e} > {limit:g}{where}"}
            record["peak_bytes"], record["largest_bytes"] = peak_bytes(lambda: step(impl, inputs), self.device)
        except Exception as err:  # e.g. a torch.compile failure: recorded, and the sweep goes on
            record.update(failure_fields(err), peak_bytes=None, largest_bytes=None)
        finally:
            inputs.reset_grads()
            free_memory(self.device)
        return record

    def fits(self, name: str, workload: str, tokens: int, vocab: int, dim: int) -> bool:
        """Whether one step of `name` at these sizes runs without running out of memory."""
        inputs = None
        try:
            inputs = make_inputs(workload, tokens, vocab, dim, dtype=DTYPES[self.args.dtype], device=self.device,
                                 pairs=self.args.pairs, seed=self.args.seed)
            step(self.implementation(name), inputs)
            synchronize(self.device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del inputs
            free_memory(self.device)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sweep(args: argparse.Namespace, runner: Runner) -> list[dict]:
    """Every (workload, V, D, N, implementation) record, with the ratios to naive filled in."""
    dtype, device = DTYPES[args.dtype], runner.device
    records = []
    for workload in args.workloads:
        for vocab in args.vocab:
            for dim in args.hidden:
                for tokens in args.tokens:
                    shape = {"workload": workload, "tokens": tokens, "vocab": vocab, "hidden": dim,
                             "dtype": args.dtype}
                    records.extend(measure_shape(args, runner, shape, dtype, device))
    return records


def failure_fields(err: Exception) -> dict:
    """The status and reason of a record whose implementation raised `err`."""
    if isinstance(err, torch.OutOfMemoryError):
        return {"status": "out of memory", "reason": None}
    return {"status": "error", "reason": f"{type(err).__name__}: {err}"[:2000]}


def measure_shape(args: argparse.Namespace, runner: Runner, shape: dict, dtype: torch.dtype,
                  device: torch.device, sink: list[dict] | None = None) -> list[dict]:
    """The records of every implementation at one shape: checked first, then peak memory, then time.

    The float64 expected results stay where `float64_reference` computed them (on a GPU, on the GPU),
    so each comparison runs there. They are allocated before any peak is measured, so they are part of
    the baseline that `peak_bytes` subtracts and no part of a reported peak. Given `sink`, the records
    (status "not run" until their turn) are appended to it at once and filled in place as they are
    measured, so that a caller stopped mid-shape (a deadline) keeps what was measured.

    The timed calls go in rounds over the implementations that passed and the matmul of the floor
    (see `median_seconds`). The floor's matmul is timed at the shape's scored tokens (`scored_tokens`).
    The workloads of DRIFT_CHECKED are also checked on inputs with the reference CHECK_DRIFT away from
    the policy (`Runner.check_and_peak`), dropped before anything is timed.
    """
    workload, tokens, vocab, dim = shape["workload"], shape["tokens"], shape["vocab"], shape["hidden"]
    floor = FLOOR_MATMULS[workload_kind(workload)]
    scored = scored_tokens(workload, tokens, args.pairs)
    records = {name: dict(shape, scored_tokens=scored, pairs=None if workload == "logprobs" else args.pairs,
                          implementation=name, floor_matmuls=floor, status="not run", reason=None,
                          errors=None, drift_errors=None, peak_bytes=None, largest_bytes=None, seconds=None,
                          matmul_seconds=None)
               for name in args.impls}
    if sink is not None:
        sink.extend(records.values())
    try:
        inputs = make_inputs(workload, tokens, vocab, dim, dtype=dtype, device=device, pairs=args.pairs,
                             seed=args.seed)
        expected = tuple(float64_reference(inputs))  # on the device: compared there, inside the peak's baseline
        allowed = allowed_error(inputs)
        drift_check = None
        if workload in DRIFT_CHECKED:
            drifted = make_inputs(workload, tokens, vocab, dim, dtype=dtype, device=device, pairs=args.pairs,
                                  seed=args.seed, drift=CHECK_DRIFT)
            drift_check = drifted, tuple(float64_reference(drifted)), allowed_error(drifted)
    except torch.OutOfMemoryError:
        for record in records.values():
            record.update(status="out of memory", reason="the inputs or the float64 reference do not fit")
        free_memory(device)
        return list(records.values())
    for name, record in records.items():
        record["reason"] = unavailable(name, device, workload)
        if record["reason"] is None:
            record.update(runner.check_and_peak(name, inputs, expected, allowed, drift_check))
        else:
            record["status"] = "unavailable"
    drift_check = drifted = None
    free_memory(device)
    passed = {name: runner.implementation(name) for name, record in records.items() if record["status"] == "ok"}
    calls = {name: (lambda impl=impl, inputs=inputs: step(impl, inputs)) for name, impl in passed.items()}
    try:
        calls["matmul"] = matmul_call(scored, vocab, dim, dtype=dtype, device=device)
    except torch.OutOfMemoryError:
        free_memory(device)
    timings = median_seconds(calls, device, warmup=args.warmup, repeats=args.repeats)
    inputs.reset_grads()
    inputs = expected = calls = None  # the tensors of this shape go before the next one is made
    free_memory(device)
    matmul = timings.pop("matmul", None)
    matmul = matmul if isinstance(matmul, float) else None
    naive = records["naive"]
    naive_seconds = timings.get("naive")
    for name, seconds in timings.items():
        if isinstance(seconds, Exception):
            records[name].update(failure_fields(seconds))
            continue
        record = records[name]
        record.update(seconds=seconds, matmul_seconds=matmul,
                      floor_ratio=seconds / (floor * matmul) if matmul else None,
                      time_vs_naive=seconds / naive_seconds if isinstance(naive_seconds, float) else None,
                      memory_vs_naive=(record["peak_bytes"] / naive["peak_bytes"]
                                       if naive["status"] == "ok" and naive["peak_bytes"] else None))
    for name, record in records.items():
        for key in ("floor_ratio", "time_vs_naive", "memory_vs_naive"):
            record.setdefault(key, None)
        log(f"{workload:15} V={vocab:<6} D={dim:<5} N={tokens:<6} {name:14} {record['status']}"
            + (f" {record['seconds'] * 1e3:9.1f} ms {record['peak_bytes'] / 2**20:9.1f} MiB"
               if record["status"] == "ok" else f" ({record['reason']})" if record["reason"] else ""))
    return list(records.values())


def search_max_tokens(args: argparse.Namespace, runner: Runner) -> list[dict]:
    """On CUDA: per workload and implementation, the most tokens (doubling from 4096) that fit in memory."""
    found = []
    for workload in args.workloads:
        for name in args.impls:
            record = {"workload": workload, "implementation": name, "vocab": args.search_vocab,
                      "hidden": args.search_hidden, "dtype": args.dtype, "max_tokens": 0,
                      "stopped_by": None, "reason": unavailable(name, runner.device, workload)}
            if record["reason"] is None:
                tokens = 4096
                while tokens <= args.search_max_tokens:
                    try:
                        fits = runner.fits(name, workload, tokens, args.search_vocab, args.search_hidden)
                    except Exception as err:
                        record["reason"] = f"{type(err).__name__}: {err}"[:2000]
                        break
                    if not fits:
                        record["stopped_by"] = "out of memory"
                        break
                    record["max_tokens"] = tokens
                    tokens *= 2
                else:
                    record["stopped_by"] = f"--search-max-tokens {args.search_max_tokens}"
                if workload != "logprobs":
                    record["max_row_length"] = record["max_tokens"] // (2 * args.pairs)
            log(f"max tokens {workload:15} {name:14} {record['max_tokens']} "
                f"({record['stopped_by'] or record['reason']})")
            found.append(record)
    return found


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def mib(nbytes: int | None) -> str:
    return fmt(nbytes and nbytes / 2**20, ".1f")


def table(records: list[dict]) -> str:
    """The measured results as a Markdown table (ratios: implementation / naive, and time / matmul floor).

    Implementations that could not run here (not installed, needs CUDA) are left out: `notes` says why.
    """
    lines = ["| workload | V | D | N | implementation | time ms | time / naive | time / floor | peak MiB | "
             "memory / naive | largest alloc. MiB | max rel. error | status |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        if r["status"] == "unavailable":
            continue
        err = max(r["errors"].values()) if r["errors"] else None
        status = r["status"] if r["status"] in ("ok", "out of memory") else f"{r['status']}: {r['reason']}"
        lines.append(f"| {r['workload']} | {r['vocab']} | {r['hidden']} | {r['tokens']} | {r['implementation']} | "
                     f"{fmt(r['seconds'] and r['seconds'] * 1e3, '.1f')} | {fmt(r['time_vs_naive'], '.2f')} | "
                     f"{fmt(r['floor_ratio'], '.2f')} | {mib(r['peak_bytes'])} | {fmt(r['memory_vs_naive'], '.3f')} | "
                     f"{mib(r['largest_bytes'])} | {fmt(err, '.1e')} | {status} |")
    return "\n".join(lines)


def plot(records: list[dict], path_for: Callable[[int, int], Path], title: str) -> list[Path]:
    """One PNG per (V, D): time and peak memory against N, a line per implementation, a row per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    paths = []
    for vocab, dim in sorted({(r["vocab"], r["hidden"]) for r in records}):
        subset = [r for r in records if (r["vocab"], r["hidden"]) == (vocab, dim)]
        workloads = list(dict.fromkeys(r["workload"] for r in subset))
        fig, axes = plt.subplots(len(workloads), 2, figsize=(11, 3.2 * len(workloads)), squeeze=False,
                                 layout="constrained")
        for row, workload in enumerate(workloads):
            for col, (key, scale, label) in enumerate((("seconds", 1e3, "time (ms)"),
                                                       ("peak_bytes", 2**-20, "peak memory above inputs (MiB)"))):
                ax = axes[row][col]
                for name in dict.fromkeys(r["implementation"] for r in subset):
                    points = sorted((r["tokens"], r[key] * scale) for r in subset
                                    if r["workload"] == workload and r["implementation"] == name
                                    and r["status"] == "ok")
                    if points:
                        ax.plot(*zip(*points, strict=True), marker="o", label=name)
                ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel=label, title=f"{workload}: {label}")
                ax.set_xticks(sorted({r["tokens"] for r in subset}), minor=False)
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize="small")
        fig.suptitle(f"{title}, V={vocab}, D={dim}")
        path = path_for(vocab, dim)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48].strip("-")


def notes(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Why implementations (or some of their workloads) were not run here."""
    found = []
    for name in args.impls:
        reason = unavailable(name, device)
        if reason is not None:
            found.append(f"{name}: {reason}")
            continue
        for workload in args.workloads:
            reason = unavailable(name, device, workload)
            if reason is not None:
                found.append(f"{name} on {workload}: {reason}")
    if device.type != "cuda":
        found.append("longest sequence before out-of-memory: searched on CUDA only")
    return found


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmarks of `argv` (default: sys.argv), print the table, write JSON and plots; return the JSON."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    wall = time.perf_counter()
    runner = Runner(args, device)
    records = sweep(args, runner)
    max_tokens = search_max_tokens(args, runner) if device.type == "cuda" and not args.no_search else []
    info = device_info(device)
    report = {
        "created_utc": started.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)]),
        "device": info,
        "versions": versions(),
        "settings": {key: (os.path.relpath(value) if isinstance(value, Path) else value)
                     for key, value in vars(args).items()},
        "implementations": {name: REGISTRY[name].description for name in args.impls},
        "tolerance": {str(k).removeprefix("torch."): v for k, v in TOLERANCE.items()},
        "tolerance_epsilon_dpo": tolerance("epsilon-dpo", DTYPES[args.dtype]),
        "check_drift": {"drift": CHECK_DRIFT, "workloads": DRIFT_CHECKED},
        "floor_matmuls": FLOOR_MATMULS,
        "clock": clock_name(device),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_seconds": round(time.perf_counter() - wall, 1),
        "notes": notes(args, device),
        "results": records,
        "max_tokens": max_tokens,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(info['type'] + '-' + info['name'])}-{started:%Y%m%d-%H%M%S}"
    title = f"{info['name']} ({args.dtype})"
    report["plots"] = [p.name for p in plot(records, lambda v, d: args.output_dir / f"{stem}-V{v}-D{d}.png",
                                            title)]
    json_path = args.output_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{info['name']}, {args.dtype}, torch {torch.__version__}, {report['wall_seconds']} s, "
          f"load average {load_before[0]:.2f} -> {report['loadavg_after'][0]:.2f}")
    print(table(records))
    for record in max_tokens:
        print(f"max tokens at V={record['vocab']} D={record['hidden']}: {record['workload']:15} "
              f"{record['implementation']:14} {record['max_tokens']} ({record['stopped_by'] or record['reason']})")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"wrote {json_path} and {', '.join(report['plots'])}")
    return report


if __name__ == "__main__":
    main()
