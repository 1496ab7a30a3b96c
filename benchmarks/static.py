"""Static kernel report, no GPU needed: `python -m benchmarks.static`.

Compiles every Triton kernel variant of fdpo for sm_80 (A100) and sm_90 (H100), in bfloat16 and
float32, with the block sizes the launchers use on a GPU (`fdpo.kernels.aot`), and prints per
kernel: shared memory, registers and spill bytes (`ptxas -v`), and whether the tensor-core
instruction of the architecture is in the PTX (`wgmma` on sm_90, `mma.sync` on sm_80). Writes the
same as JSON to benchmarks/results/static-<triton version>.json. Needs the real Triton compiler, so
run it without TRITON_INTERPRET.
"""

import argparse
import datetime
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from .measure import versions

RESULTS_DIR = Path(__file__).parent / "results"


def tensor_core_column(report: dict) -> str:
    """What the PTX shows for a kernel's tl.dot: the tensor-core instruction, or why there is none."""
    if not report["uses_dot"]:
        return "no dot"
    if report["ieee_fp32"]:
        return "fp32 FMA (ieee)"
    if report["tensor_cores"]:
        return "wgmma" if report["capability"] >= 90 else "mma.sync"
    return "MISSING"


def table(reports: list[dict]) -> str:
    """The reports as a Markdown table."""
    lines = ["| kernel | variant | dtype | sm | shared KiB | registers | spill bytes | tensor cores |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in reports:
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['dtype']} | {r['capability']} | "
                     f"{r['shared_bytes'] / 1024:.1f} | {r['registers']} | {r['spill_bytes']} | "
                     f"{tensor_core_column(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Compile, print the table, write the JSON; return the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR,
                        help="where the JSON goes (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("the static report compiles the kernels with the real Triton compiler: unset TRITON_INTERPRET")
    from fdpo.kernels.aot import all_reports

    reports = [asdict(r) for r in all_reports()]
    found = versions()
    report = {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "-m", "benchmarks.static", *(sys.argv[1:] if argv is None else argv)]),
        "versions": found,
        "kernels": reports,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"static-triton-{found['triton']}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(table(reports))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
