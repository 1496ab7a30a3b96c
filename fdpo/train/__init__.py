"""The thin trainer: preference fine-tuning of any transformers causal LM through the fused head.

    python -m fdpo.train                     # built-in run: tiny Llama learns the bundled sort task
    python -m fdpo.train --model NAME --data pairs.jsonl --output-dir runs/x --max-steps 1000

Pieces (each usable alone): `CausalLM` (model -> hidden states -> fused log-probs, no logits),
`load_preference_data` / `PreferenceLoader` (JSONL or `datasets` records, padded or packed
batches), `FrozenReference` / `CachedReference`, `Trainer` and `TrainConfig`, `byte_tokenizer`,
and the bundled task's rule `task_reward(prompt, completion)`.
"""

from .adapter import CausalLM
from .config import TrainConfig, parse_args
from .data import PreferenceBatch, PreferenceExample, PreferenceLoader, collate, load_preference_data
from .loop import Trainer, TrainingError
from .metrics import expected_calibration_error
from .models import tiny_llama
from .reference import CachedReference, FrozenReference
from .tasks import bundled_data, task_reward
from .tokenizer import byte_tokenizer

__all__ = [
    "CachedReference",
    "CausalLM",
    "FrozenReference",
    "PreferenceBatch",
    "PreferenceExample",
    "PreferenceLoader",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "bundled_data",
    "byte_tokenizer",
    "collate",
    "expected_calibration_error",
    "load_preference_data",
    "parse_args",
    "task_reward",
    "tiny_llama",
]
