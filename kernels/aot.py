"""Compile every kernel for an NVIDIA architecture ahead of time, on any machine (no GPU needed).

The launches compiled are the ones the launchers build, with the block sizes and flags used on a
GPU, so this catches what the CPU interpreter forgives (tl.dot shape and dtype rules, shared
memory overflow, unsupported ops) and reports each kernel's resources: shared memory from
Triton's metadata, registers and spills from `ptxas -v`, and whether tensor-core instructions
were emitted (`wgmma` on sm_90, `mma` on sm_80).

Run `python -m fdpo.kernels.aot` (without TRITON_INTERPRET) for a table; `--json` for JSON.
"""

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import create_function_from_signature

from .launch import Launch, interpreting

CAPABILITIES = (80, 90)

# Modules of this package whose `aot_launches(dtype)` list the launches to compile.
KERNEL_MODULES = ("head_logprob_fwd", "head_stats_fwd", "head_stats_bwd", "head_stats_split_bwd", "preference_loss",
                  "token_divergence_fwd", "token_divergence_bwd")


@dataclass
class KernelReport:
    """Resources of one compiled kernel variant."""

    kernel: str
    variant: str
    dtype: str
    capability: int
    shared_bytes: int
    registers: int
    spill_bytes: int
    uses_dot: bool
    tensor_cores: bool
    ieee_fp32: bool
    nan_dropping_minmax: int
    nan_dropping_sites: dict[str, int]
    num_warps: int
    num_stages: int


def _bind(launch: Launch, capability: int, **changed: Any) -> tuple:
    """(backend, bound arguments, specialization) of `launch` on sm_<capability>, as Triton 3.6's launch
    binds them (its arguments replaced by `changed`): the specialization is the kernel's compile key."""
    kernel = launch.kernel
    if not hasattr(kernel, "_pack_args"):
        raise RuntimeError(f"ahead-of-time compilation uses Triton 3.6's launch specialization; "
                           f"this is Triton {triton.__version__}")
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.args, **changed, **launch.constexprs, num_warps=launch.num_warps,
                  num_stages=launch.num_stages)
    bound_args, specialization, _ = binder(**kwargs)
    return backend, bound_args, specialization


def compile_key(launch: Launch, capability: int = 90, **changed: Any) -> str:
    """The specialization Triton compiles `launch` for (with its arguments replaced by `changed`): two
    launches with equal keys share one compiled kernel."""
    return repr(_bind(launch, capability, **changed)[2])


def _compile(launch: Launch, capability: int):
    """triton.compile() of `launch` for sm_<capability>, specialized as a real launch would be."""
    backend, bound_args, specialization = _bind(launch, capability)
    options, signature, constexprs, attrs = launch.kernel._pack_args(
        backend, {"num_warps": launch.num_warps, "num_stages": launch.num_stages}, bound_args, specialization, None)
    return compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=backend.target,
                   options=options.__dict__)


def _ptxas_resources(ptx: str, capability: int) -> tuple[int, int]:
    """(registers, spill store bytes) reported by `ptxas -v` for the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
             str(src), "-o", str(Path(tmp) / "kernel.cubin")],
            check=True, capture_output=True, text=True)
    log = out.stderr + out.stdout
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    return registers, spills


# A float min / max of the PTX without .NaN: it returns the other operand of a NaN (tl.minimum /
# tl.maximum without propagate_nan, and the tl.min / tl.max reductions).
NAN_DROPPING_MINMAX = re.compile(r"\b(?:min|max)(?:\.(?!NaN\b)\w+)*\.f(?:16|32)\b")


def nan_dropping_sites(ptx: str) -> dict[str, int]:
    """The PTX's NaN-dropping float min / max instructions counted by source site, "module.py: line".

    The site is the innermost frame in this package of the instruction's location (the `.loc` before
    it, whose comment lists the inlined call chain, innermost first: a tl.max reduction's combine
    function in triton/language/standard.py is attributed to the line of this package that calls
    it), given as the source text of that line.
    """
    here = Path(__file__).parent
    files = {index: Path(name).name for index, name in re.findall(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M)}
    sites: Counter = Counter()
    frames: list[tuple[str, str]] = []
    for line in ptx.splitlines():
        text = line.strip()
        if text.startswith(".loc"):
            index, number = text.split()[1:3]
            frames = re.findall(r"([\w.]+\.py):(\d+)", text.partition("//")[2]) or [(files.get(index, "?"), number)]
        elif NAN_DROPPING_MINMAX.search(text):
            ours = [(name, int(number)) for name, number in frames if (here / name).is_file() and int(number) > 0]
            if ours:
                name, number = ours[0]
                sites[f"{name}: {(here / name).read_text().splitlines()[number - 1].strip()}"] += 1
            else:
                sites[f"unattributed: {frames}"] += 1
    return dict(sorted(sites.items()))


def compute_dtypes(launch: Launch) -> set:
    """The Triton dtypes `launch`'s heads form their products in (its COMPUTE_DTYPE constexprs)."""
    return {v for k, v in launch.constexprs.items() if k.endswith("COMPUTE_DTYPE") and v is not None}


def compile_report(launch: Launch, capability: int, variant: str, dtype: torch.dtype) -> KernelReport:
    """Compile `launch` for sm_<capability> and report its resources.

    uses_dot: the kernel has a tl.dot; tensor_cores: the PTX has the architecture's tensor-core
    instruction (wgmma on sm_90, mma on sm_80), expected whenever a dot is not full-precision fp32;
    ieee_fp32: a head forms full-precision fp32 products (`dtype` is the operands', not the products').
    nan_dropping_minmax: the PTX's float min / max without .NaN, which return the other operand of
    a NaN (tl.minimum / tl.maximum without propagate_nan), where the interpreter's numpy propagates it;
    nan_dropping_sites: the same counted by source line (`nan_dropping_sites`).
    """
    compiled = _compile(launch, capability)
    ptx = compiled.asm["ptx"]
    registers, spills = _ptxas_resources(ptx, capability)
    mma = "wgmma" if capability >= 90 else "mma.sync"
    return KernelReport(
        kernel=launch.name, variant=variant, dtype=str(dtype).removeprefix("torch."), capability=capability,
        shared_bytes=compiled.metadata.shared, registers=registers, spill_bytes=spills,
        uses_dot="tt.dot" in compiled.asm["ttir"], tensor_cores=mma in ptx,
        ieee_fp32=launch.constexprs.get("INPUT_PRECISION") == "ieee" and tl.float32 in compute_dtypes(launch),
        nan_dropping_minmax=len(NAN_DROPPING_MINMAX.findall(ptx)), nan_dropping_sites=nan_dropping_sites(ptx),
        num_warps=launch.num_warps, num_stages=launch.num_stages)


def representative_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """Every kernel variant the launchers build for `dtype` (each module's `aot_launches`)."""
    launches = {}
    for module in KERNEL_MODULES:
        for variant, launch in import_module(f"{__package__}.{module}").aot_launches(dtype).items():
            launches[f"{module}: {variant}"] = launch
    return launches


def all_reports(dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32),
                capabilities: tuple[int, ...] = CAPABILITIES) -> list[KernelReport]:
    """Compile every kernel variant for every dtype and capability."""
    if interpreting():
        raise RuntimeError("ahead-of-time compilation needs the real compiler: unset TRITON_INTERPRET")
    jobs = [(variant, dtype, capability) for dtype in dtypes
            for variant in representative_launches(dtype) for capability in capabilities]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(pool.map(_compile_job, *zip(*jobs, strict=True)))


def _compile_job(variant: str, dtype: torch.dtype, capability: int) -> KernelReport:
    """One compilation, in a worker process (launches are rebuilt there: kernels do not pickle)."""
    return compile_report(representative_launches(dtype)[variant], capability, variant, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    reports = all_reports()
    if parser.parse_args().json:
        print(json.dumps([asdict(r) for r in reports], indent=1))
        return
    print(f"{'kernel':30} {'variant':38} {'dtype':9} {'sm':>3} {'smem KB':>8} {'regs':>5} {'spill B':>8} {'TC':>4}")
    for r in reports:
        tc = "-" if not r.uses_dot else "fma" if r.ieee_fp32 else "yes" if r.tensor_cores else "NO"
        print(f"{r.kernel:30} {r.variant:38} {r.dtype:9} {r.capability:>3} {r.shared_bytes / 1024:>8.1f} "
              f"{r.registers:>5} {r.spill_bytes:>8} {tc:>4}")


if __name__ == "__main__":
    main()
