"""fdpo: fused Triton kernels for preference fine-tuning without materialized logits."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

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
        # `fully_shard` the trainer uses. CI runs the pinned torch 2.13 (constraints.txt).
        "torch>=2.8",
        # The fused kernels (CUDA, or CPU under TRITON_INTERPRET=1) need triton.knobs (3.4); their
        # tests pass under 3.4 and the pinned 3.6. The pure-PyTorch backend works without Triton, so
        # it is only required where wheels exist. The ahead-of-time compile report needs 3.6.
        "triton>=3.4; platform_system == 'Linux'",
        "numpy>=1.24",
        "transformers>=4.45",
        "tqdm>=4.60",
    ],
    extras_require={
        # peft: the trainer's tests cover LoRA-wrapped models; matplotlib: the benchmark CLI smoke test
        # writes its plot.
        "test": ["pytest>=7.4", "pytest-benchmark>=4.0", "hypothesis>=6.90", "ruff>=0.5", "peft>=0.13",
                 "matplotlib>=3.7"],
        "bench": ["matplotlib>=3.7", "pytest-benchmark>=4.0"],
    },
)
