"""Predicted times and scratch memory from the cost model (`fdpo.cost`), no GPU needed.

`python -m benchmarks.model --tokens 16384 --vocab 128256 --hidden 4096 --device h100` prints, as a
markdown table, the cost model's predicted forward, backward and total milliseconds, predicted
scratch MiB and predicted ratio to the 4-matmul floor of fdpo's backward strategies (fused atomics,
split-K) and of the peers (naive PyTorch, TRL's fused head, Liger-Kernel, cut-cross-entropy exact
and filtered, fdpo's torch backend), then the strategy `auto` would pick. A float32 head is predicted
at the float32 matmul precision `--fp32-precision` (default: torch's current setting, "highest"
unless changed): the FP32 units at "highest", the TF32 tensor cores at "high" or "medium". Every
number printed is a prediction from public peak figures and stated assumptions, not a measurement:
`python -m benchmarks` measures.
"""

import argparse

import torch

from fdpo import cost

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MIB = 1024**2


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=positive_int, required=True, help="scored tokens N")
    parser.add_argument("--vocab", type=positive_int, required=True, help="vocabulary size V")
    parser.add_argument("--hidden", type=positive_int, required=True, help="hidden size D")
    parser.add_argument("--device", default="h100",
                        help=f"one of {', '.join(sorted(cost.DEVICES))} or a CUDA device name "
                             "such as 'NVIDIA H100 80GB HBM3' (default: h100)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="head dtype (default: bfloat16)")
    parser.add_argument("--buffer-bytes", type=non_negative_int, default=cost.DEFAULT_BACKWARD_BUFFER_BYTES,
                        help="the split backward's dz buffer budget in bytes; 0 means the fused backward "
                             f"(default: {cost.DEFAULT_BACKWARD_BUFFER_BYTES}, "
                             f"{cost.DEFAULT_BACKWARD_BUFFER_BYTES // MIB} MiB)")
    parser.add_argument("--fp32-precision", choices=cost.FP32_PRECISIONS, default=None,
                        help="float32 matmul precision of a float32 head's predictions: 'highest' on the FP32 "
                             "units, 'high' or 'medium' on TF32 tensor cores (default: torch's current "
                             f"setting, {torch.get_float32_matmul_precision()!r})")
    return parser


def report(shape: cost.Shape, device: cost.DeviceSpec, buffer_bytes: int, fp32_precision: str | None = None) -> str:
    """The markdown report: title, the predicted floor, the predicted table and auto's choice, a
    float32 head's at the float32 matmul precision `fp32_precision` (torch's current setting when None)."""
    fp32_precision = cost.fp32_matmul_precision(fp32_precision)
    floor_s = cost.floor_seconds(shape, device, fp32_precision=fp32_precision)
    floor_tflop = cost.floor_flops(shape.tokens, shape.vocab, shape.hidden) / 1e12
    dtype = str(shape.dtype).removeprefix("torch.")
    if shape.dtype == torch.float32:
        units = "FP32 units" if fp32_precision == "highest" else "TF32 tensor cores"
        dtype += f" (float32 matmul precision {fp32_precision!r}: matmuls on the {units})"
    lines = [
        f"Predicted by the cost model (fdpo.cost), not measured: log-prob forward + backward, "
        f"N = {shape.tokens}, V = {shape.vocab}, D = {shape.hidden}, {dtype}, {device.name}",
        "",
        f"Predicted 4-matmul floor: {floor_s * 1e3:.1f} ms (4 cuBLAS [N, D] x [D, V] GEMMs of "
        f"{shape.matmul_flops() / 1e12:.2f} TFLOP each, {floor_tflop:.2f} TFLOP in all)",
        "",
        "| implementation | predicted fwd ms | predicted bwd ms | predicted total ms | predicted scratch MiB "
        "| predicted total / floor | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for p in cost.predict_all(shape, device, buffer_bytes, fp32_precision=fp32_precision):
        lines.append(f"| {p.name} | {p.forward_s * 1e3:.1f} | {p.backward_s * 1e3:.1f} | {p.total_s * 1e3:.1f} "
                     f"| {p.scratch_bytes / MIB:.1f} | {p.total_s / floor_s:.2f} | {p.note} |")
    choice = cost.choose_backward(shape.tokens, shape.vocab, shape.hidden, shape.dtype, device, buffer_bytes,
                                  fp32_precision=fp32_precision)
    rows = cost.split_rows(shape.vocab, shape.dtype, buffer_bytes)
    lines += ["", f"auto picks (from the predictions): {choice} (buffer {buffer_bytes} bytes = "
                  f"{buffer_bytes / MIB:.1f} MiB, {rows} rows of V; split needs at least "
                  f"{cost.MIN_SPLIT_ROWS} rows per chunk and fewer predicted ms than fused)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Parse `argv`, print the predicted report and return it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = cost.device_spec(args.device)
    except ValueError as err:
        parser.error(str(err))
    text = report(cost.Shape(args.tokens, args.vocab, args.hidden, DTYPES[args.dtype]), device, args.buffer_bytes,
                  args.fp32_precision)
    print(text)
    return text


if __name__ == "__main__":
    main()
