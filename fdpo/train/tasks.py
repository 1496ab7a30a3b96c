"""The bundled preference task: sorting digits, with a rule that scores any completion.

A prompt asks to sort a few digits ("sort: 7 2 5\n"); the chosen response is the digits in
ascending order ("2 5 7"); the rejected one is wrong: another ordering of the same digits, or the
sorted digits with one of them changed. A tiny model learns to prefer the right answer within a
minute on a CPU, and `task_reward` checks any generated completion, so studies can sample from a
trained policy and score it.

`python -m fdpo.train.tasks` regenerates the bundled files fdpo/data/sort_{train,eval}.jsonl
(deterministic: the same seed gives the same bytes); the eval prompts never occur in training.
"""

import itertools
import json
import random
from collections import Counter
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SPLITS = {"train": 2000, "eval": 256}
PREFIX = "sort:"


def bundled_data(split: str = "train") -> Path:
    """Path of the bundled JSONL file of `split` ("train" or "eval")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    return DATA_DIR / f"sort_{split}.jsonl"


def prompt_digits(prompt: str) -> list[str]:
    """The digits a task prompt asks to sort ("sort: 7 2 5\\n" -> ["7", "2", "5"])."""
    text = prompt.strip()
    if not text.startswith(PREFIX):
        raise ValueError(f"a sort-task prompt starts with {PREFIX!r}, got {prompt!r}")
    digits = text[len(PREFIX):].split()
    if not digits or not all(len(d) == 1 and d.isdigit() for d in digits):
        raise ValueError(f"a sort-task prompt lists single digits separated by spaces, got {prompt!r}")
    return digits


def task_reward(prompt: str, completion: str) -> float:
    """Score of `completion` as an answer to `prompt`, in [0, 1]; 1.0 exactly for the right answer.

    The answer is the first line of the completion, split on whitespace into items. With n the
    larger of the item count and the digit count of the prompt, half the score is the overlap of
    the items with the prompt's digits (multiset intersection over n), half the number of adjacent
    pairs of digit items in non-decreasing order over the n - 1 pairs a right answer has. Only the
    sorted digits themselves get both halves in full; text without digits scores 0.
    """
    expected = sorted(prompt_digits(prompt))
    items = completion.split("\n")[0].split()
    if items == expected:
        return 1.0
    if not items:
        return 0.0
    n = max(len(items), len(expected))
    overlap = sum((Counter(items) & Counter(expected)).values()) / n
    ordered = sum(a <= b for a, b in itertools.pairwise(items) if len(a) == len(b) == 1 and (a + b).isdigit())
    return 0.5 * overlap + 0.5 * (ordered / (n - 1) if n > 1 else 0.0)


def make_pair(rng: random.Random) -> dict[str, str]:
    """One preference record {"prompt", "chosen", "rejected"} with 3 to 6 digits."""
    digits = [str(rng.randrange(10)) for _ in range(rng.randint(3, 6))]
    while len(set(digits)) == 1:
        digits = [str(rng.randrange(10)) for _ in range(len(digits))]
    ordered = sorted(digits)
    if rng.random() < 0.75:
        wrong = ordered
        while wrong == ordered:
            wrong = rng.sample(digits, len(digits))
    else:
        wrong = list(ordered)
        position = rng.randrange(len(wrong))
        wrong[position] = rng.choice([d for d in "0123456789" if d != wrong[position]])
        wrong.sort()
    return {"prompt": f"{PREFIX} {' '.join(digits)}\n", "chosen": " ".join(ordered), "rejected": " ".join(wrong)}


def generate(seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """The records of every split; eval prompts are distinct from all training prompts."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for split, size in SPLITS.items():
        records = []
        while len(records) < size:
            record = make_pair(rng)
            if record["prompt"] not in seen:
                seen.add(record["prompt"])
                records.append(record)
        splits[split] = records
    return splits


def main() -> None:
    for split, records in generate().items():
        path = bundled_data(split)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        print(f"wrote {len(records)} pairs to {path}")


if __name__ == "__main__":
    main()
