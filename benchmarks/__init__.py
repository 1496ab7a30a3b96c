"""Benchmarks of fdpo against naive PyTorch, torch.compile and the peers (Liger-Kernel, cut-cross-entropy).

`python -m benchmarks` (see `--help`) measures time, peak memory and the matmul floor ratio of every
implementation on identical, checked inputs and writes JSON and plots to benchmarks/results/;
`python -m benchmarks.static` reports the compiled kernels' resources for sm_80 and sm_90 without a
GPU; `python -m benchmarks.study` trains every divergence on the bundled task and measures the
alignment-versus-diversity trade-off; `pytest benchmarks/` is the pytest-benchmark suite. Modules:
`workloads` (inputs, implementations, the float64 checks), `measure` (time, memory, machine),
`static`, `study`.
"""
