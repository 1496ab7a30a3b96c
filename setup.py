"""fdpo: fused Triton kernels for preference fine-tuning without materialized logits."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# The benchmark's peers, at the versions whose CPU paths benchmarks/ calls: TRL's ChunkedLogProbFunction
# (trl.kernels, 1.16), Liger's LigerFusedLinearDPOLoss(compiled=..., average_log_prob=...) and
# cut-cross-entropy's impl="torch_compile". They pin no torch version of their own.
PEERS = ["trl>=1.16", "liger-kernel>=0.8.5", "cut-cross-entropy>=25.1.1"]

setup(
    name="fdpo",
    version="0.1.0",
    description=(
        "Fused Triton kernels for DPO-family preference losses (f-DPO, BPO, IPO, TDPO, epsilon-DPO) "
        "that never materialize the [tokens x vocabulary] logits"
    ),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # `kernels/` is installed as the subpackage `fdpo.kernels`: a top-level `kernels` package
    # would collide with the `kernels` distribution on PyPI.
    packages=[*find_packages(include=["fdpo", "fdpo.*"]), "fdpo.kernels"],
    package_dir={"fdpo": "fdpo", "fdpo.kernels": "kernels"},
    package_data={"fdpo": ["data/*.jsonl"]},
    install_requires=[
        # torch 2.8 is the release built against Triton 3.4 (below); it also has the public FSDP2
        # `fully_shard` the trainer uses, and torch.mm / torch.addmm(..., out_dtype=torch.float32),
        # the 16-bit GEMMs with fp32 accumulation of the split head backward and of the torch
        # backend on CUDA (`fdpo.gemm` checks for them on the device and upcasts to fp32 where they
        # are missing). CI runs the pinned torch 2.13 (constraints.txt).
        "torch>=2.8",
        # The fused kernels (CUDA, or CPU under TRITON_INTERPRET=1) need triton.knobs (3.4); their
        # tests pass under 3.4 and the pinned 3.6. The pure-PyTorch backend works without Triton, so
        # it is only required where wheels exist. The ahead-of-time compile report needs 3.6.
        "triton>=3.4; platform_system == 'Linux'",
        "numpy>=1.24",
        # 4.56: from_pretrained's `dtype` keyword (it was `torch_dtype` before), which the trainer
        # passes to load a model in float32.
        "transformers>=4.56",
        "tqdm>=4.60",
    ],
    extras_require={
        # peft: the trainer's tests cover LoRA-wrapped models; matplotlib: the benchmark CLI smoke test
        # writes its plot; the peers: tests/test_peers.py checks them against float64 on CPU.
        "test": ["pytest>=7.4", "pytest-benchmark>=4.0", "ruff>=0.5", "peft>=0.13",
                 "matplotlib>=3.7", *PEERS],
        "bench": ["matplotlib>=3.7", "pytest-benchmark>=4.0", *PEERS],
        # fdpo.integrations.trl: the TRL versions its tests run against (its TESTED_TRL).
        "trl": ["trl>=1.16,<1.17"],
    },
)
