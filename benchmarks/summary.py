"""Several result files as one table and one figure: `python -m benchmarks.summary FILE [FILE ...]`.

Each (workload, device, dtype, V, D, N, P, implementation) is taken from the newest file that ran it (its
`created_utc`; records that did not run, "unavailable" or "skipped", do not count), and its ratios are
those of its own run: against the naive call timed beside it in the same process, never against another
file's naive. A shape's naive cell is from the newest file that ran naive there. The device is the
file's device name, P the preference pairs of its run (none for logprobs).

Prints a Markdown table, a row per shape: naive's time / peak MiB above the inputs (largest single
allocation MiB, where the file has it), then for every other implementation time / naive (its own time
where naive did not finish in that run) and the same two memory figures, or its status where it did not
run to the end ("wrong", "out of memory", "failed"). With `--png PATH`, also one figure: a column per
(device, dtype, V, D, P), for each workload a row of time / naive and a row of peak memory against N, a
line per implementation.
"""

import argparse
import json
from pathlib import Path
from typing import NamedTuple

from .workloads import IMPLEMENTATIONS, WORKLOADS

# Statuses of records that did not run: they hold no measurement and hide none.
NOT_RUN = ("unavailable", "skipped")


class Key(NamedTuple):
    """A shape of the table: a row, and a point of the figure."""

    workload: str
    device: str
    dtype: str
    vocab: int
    hidden: int
    pairs: int  # 0 for logprobs (no pairs) and where the file does not say
    tokens: int


def record_key(data: dict, record: dict) -> Key:
    """The shape of `record` of the result file `data`."""
    pairs = record.get("pairs", data.get("settings", {}).get("pairs"))
    return Key(record["workload"], data.get("device", {}).get("name", "-"), record.get("dtype", "-"),
               record["vocab"], record["hidden"], 0 if record["workload"] == "logprobs" or pairs is None else pairs,
               record["tokens"])


def newest_records(files: list[dict]) -> dict[Key, dict[str, dict]]:
    """{shape: {implementation: record}} over the loaded result files, newest file first per cell."""
    merged: dict[Key, dict[str, dict]] = {}
    for data in sorted(files, key=lambda d: d["created_utc"], reverse=True):
        for record in data["results"]:
            if record["status"] in NOT_RUN:
                continue
            merged.setdefault(record_key(data, record), {}).setdefault(record["implementation"], record)
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
    if naive:
        time = f"{record['seconds']:.3g} s"
    elif record["time_vs_naive"] is None:
        time = f"{record['seconds']:.3g} s (no naive)"
    else:
        time = f"{record['time_vs_naive']:.2f}x"
    return f"{time} / {_memory(record)}"


def _rank(name: str, known: tuple[str, ...]) -> tuple[int, str]:
    return known.index(name) if name in known else len(known), name


def _order(names: set[str], known: tuple[str, ...]) -> list[str]:
    return sorted(names, key=lambda name: _rank(name, known))


def markdown(merged: dict[Key, dict[str, dict]]) -> str:
    """The table described in the module docstring."""
    others = _order({name for cells in merged.values() for name in cells} - {"naive"}, IMPLEMENTATIONS)
    lines = ["| workload | device | dtype | V | D | N | P | naive s / MiB (largest) | " + " | ".join(others) + " |",
             "|---|---|---|---:|---:|---:|---:|" + "---:|" * (len(others) + 1)]
    for key in sorted(merged, key=lambda k: (_rank(k.workload, WORKLOADS), k[1:])):
        cells = merged[key]
        row = [key.workload, key.device, key.dtype, str(key.vocab), str(key.hidden), str(key.tokens),
               str(key.pairs or "-"), _cell(cells.get("naive"), True)]
        row += [_cell(cells.get(name), False) for name in others]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _title(workload: str, device: str | None, dtype: str | None, vocab: int, dim: int, pairs: int) -> str:
    where = "" if device is None else f", {device} {dtype}"
    return f"{workload}{where}, V={vocab}, D={dim}" + (f", P={pairs}" if pairs else "")


def figure(merged: dict[Key, dict[str, dict]], path: Path, title: str) -> Path:
    """The figure described in the module docstring, written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    # A column per (device, dtype, V, D); a pair of rows per (workload, pairs). Panel titles name the
    # device and dtype only where the figure holds several.
    columns = sorted({(key.device, key.dtype, key.vocab, key.hidden) for key in merged})
    several = len({column[:2] for column in columns}) > 1
    rows = sorted({(key.workload, key.pairs) for key in merged}, key=lambda wp: (_rank(wp[0], WORKLOADS), wp[1]))
    names = _order({name for cells in merged.values() for name in cells}, IMPLEMENTATIONS)
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}  # one colour per implementation everywhere
    fig, axes = plt.subplots(2 * len(rows), len(columns), figsize=(4.2 * len(columns), 3.0 * 2 * len(rows)),
                             squeeze=False, layout="constrained")
    for row, (workload, pairs) in enumerate(rows):
        for col, column in enumerate(columns):
            shapes = sorted(k for k in merged if (k.workload, k.pairs) == (workload, pairs) and k[1:5] == column)
            for offset, (field, scale, label) in enumerate((("time_vs_naive", 1.0, "time / naive"),
                                                            ("peak_bytes", 2**-20, "peak MiB above inputs"))):
                ax = axes[2 * row + offset][col]
                for name in names:
                    points = [(k.tokens, merged[k][name][field] * scale) for k in shapes
                              if name in merged[k] and merged[k][name]["status"] == "ok"
                              and merged[k][name][field] is not None]
                    if points:
                        ax.plot(*zip(*points, strict=True), marker="o", label=name, color=colors[name])
                if not ax.lines:
                    ax.axis("off")
                    continue
                ax.set(xscale="log", yscale="log" if offset else "linear", xlabel="tokens N", ylabel=label)
                device, dtype, vocab, dim = column
                ax.set_title(_title(workload, device if several else None, dtype, vocab, dim, pairs), fontsize="small")
                ax.set_xticks(sorted({k.tokens for k in shapes}), minor=False)
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
              if args.workloads is None or key.workload in args.workloads}
    if not merged:
        parser.error("the files hold no measured record of these workloads (all unavailable, or none)")
    text = markdown(merged)
    print(text)
    if args.png is not None:
        figure(merged, args.png, args.title)
    return text


if __name__ == "__main__":
    main()
