"""Several result files as one table and one figure: `python -m benchmarks.summary FILE [FILE ...]`.

Each (workload, V, D, N, implementation) is taken from the newest file that ran it (its
`created_utc`; records marked unavailable do not count), and its ratios are those of its own run:
against the naive call timed beside it in the same process, never against another file's naive.
A shape's naive cell is from the newest file that ran naive there.

Prints a Markdown table, a row per shape: naive's time / peak MiB above the inputs (largest single
allocation MiB, where the file has it), then for every other implementation time / naive and the
same two memory figures, or its status where it did not run to the end ("wrong", "out of memory",
"failed"). With `--png PATH`, also one figure: a column per (V, D), for each workload a row of
time / naive and a row of peak memory against N, a line per implementation.
"""

import argparse
import json
from pathlib import Path

from .workloads import IMPLEMENTATIONS, WORKLOADS

Key = tuple[str, int, int, int]  # (workload, vocab, hidden, tokens)


def newest_records(files: list[dict]) -> dict[Key, dict[str, dict]]:
    """{shape: {implementation: record}} over the loaded result files, newest file first per cell."""
    merged: dict[Key, dict[str, dict]] = {}
    for data in sorted(files, key=lambda d: d["created_utc"], reverse=True):
        for record in data["results"]:
            if record["status"] == "unavailable":
                continue
            key = (record["workload"], record["vocab"], record["hidden"], record["tokens"])
            merged.setdefault(key, {}).setdefault(record["implementation"], record)
    return merged


def _mib(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    value = nbytes / 2**20
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _memory(record: dict) -> str:
    largest = record.get("largest_bytes")
    return _mib(record["peak_bytes"]) + ("" if largest is None else f" ({_mib(largest)})")


def _cell(record: dict | None, naive: bool) -> str:
    if record is None:
        return "-"
    if record["status"] != "ok":
        return record["status"]
    time = f"{record['seconds']:.3g} s" if naive else f"{record['time_vs_naive']:.2f}x"
    return f"{time} / {_memory(record)}"


def _rank(name: str, known: tuple[str, ...]) -> tuple[int, str]:
    return known.index(name) if name in known else len(known), name


def _order(names: set[str], known: tuple[str, ...]) -> list[str]:
    return sorted(names, key=lambda name: _rank(name, known))


def markdown(merged: dict[Key, dict[str, dict]]) -> str:
    """The table described in the module docstring."""
    others = _order({name for cells in merged.values() for name in cells} - {"naive"}, IMPLEMENTATIONS)
    lines = ["| workload | V | D | N | naive s / MiB (largest) | " + " | ".join(others) + " |",
             "|---|---:|---:|---:|" + "---:|" * (len(others) + 1)]
    for key in sorted(merged, key=lambda k: (_rank(k[0], WORKLOADS), k[1:])):
        cells = merged[key]
        row = [str(part) for part in key] + [_cell(cells.get("naive"), True)]
        row += [_cell(cells.get(name), False) for name in others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def figure(merged: dict[Key, dict[str, dict]], path: Path, title: str) -> Path:
    """The figure described in the module docstring, written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    columns = sorted({(v, d) for _, v, d, _ in merged})
    workloads = _order({w for w, *_ in merged}, WORKLOADS)
    names = _order({name for cells in merged.values() for name in cells}, IMPLEMENTATIONS)
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per implementation everywhere
    fig, axes = plt.subplots(2 * len(workloads), len(columns), figsize=(4.2 * len(columns), 3.0 * 2 * len(workloads)),
                             squeeze=False, layout="constrained")
    for row, workload in enumerate(workloads):
        for col, (vocab, dim) in enumerate(columns):
            shapes = sorted(k for k in merged if k[:3] == (workload, vocab, dim))
            for offset, (field, scale, label) in enumerate((("time_vs_naive", 1.0, "time / naive"),
                                                            ("peak_bytes", 2**-20, "peak MiB above inputs"))):
                ax = axes[2 * row + offset][col]
                for name in names:
                    points = [(k[3], merged[k][name][field] * scale) for k in shapes
                              if name in merged[k] and merged[k][name]["status"] == "ok"]
                    if points:
                        ax.plot(*zip(*points, strict=True), marker="o", label=name, color=colors[name])
                if not ax.lines:
                    ax.axis("off")
                    continue
                ax.set(xscale="log", yscale="log" if offset else "linear", xlabel="tokens N", ylabel=label,
                       title=f"{workload}, V={vocab}, D={dim}")
                ax.set_xticks(sorted({k[3] for k in shapes}), minor=False)
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6))
    fig.suptitle(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="result JSON files of `python -m benchmarks`")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, help="only these workloads (default: all)")
    parser.add_argument("--png", type=Path, help="also write the figure here")
    parser.add_argument("--title", default="measured, each cell from the newest run of it",
                        help="the figure's title")
    args = parser.parse_args(argv)
    files = []
    for path in args.files:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "results" not in data or "created_utc" not in data:
            parser.error(f"{path} is not a result file of python -m benchmarks (no results / created_utc)")
        files.append(data)
    merged = {key: cells for key, cells in newest_records(files).items()
              if args.workloads is None or key[0] in args.workloads}
    if not merged:
        parser.error("the files hold no measured record of these workloads (all unavailable, or none)")
    text = markdown(merged)
    print(text)
    if args.png is not None:
        figure(merged, args.png, args.title)
    return text


if __name__ == "__main__":
    main()
