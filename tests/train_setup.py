"""Shared setup of the trainer's tests: small data files of the bundled task and a fast config."""

import json
from pathlib import Path

from fdpo.train import TrainConfig
from fdpo.train.tasks import generate


def write_data(root: Path, train: int = 64, evaluation: int = 16) -> dict[str, Path]:
    """JSONL files of the bundled task under root: {"train": path, "eval": path}."""
    splits = generate()
    paths = {}
    for split, size in (("train", train), ("eval", evaluation)):
        paths[split] = root / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in splits[split][:size]), encoding="utf-8")
    return paths


def small_config(paths: dict[str, Path], out: Path, **overrides) -> TrainConfig:
    """A few steps of 8 pairs on the torch backend, every step logged, no evaluation or checkpoint on the way."""
    settings = {"data": str(paths["train"]), "eval_data": str(paths["eval"]), "output_dir": str(out), "max_steps": 6,
                "batch_size": 8, "warmup_steps": 2, "log_every": 1, "eval_every": 0, "save_every": 0,
                "backend": "torch", "progress": False, "nll_weight": 0.0}
    return TrainConfig(**{**settings, **overrides})


def read_metrics(out: Path, split: str | None = "train") -> list[dict]:
    """The records of out/metrics.jsonl, of one split (all with split=None)."""
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if split is None or r["split"] == split]
