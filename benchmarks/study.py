"""Alignment versus diversity across divergences, on the bundled sort task, on a CPU in minutes.

    python -m benchmarks.study            # every method x 3 betas x 2 seeds (about 6 minutes on 2 cores)
    python -m benchmarks.study --quick    # every method, one beta, one seed (about a minute)

For each seed the trainer's tiny Llama is first warm-started by supervised fine-tuning on the
responses of the training pairs (chosen and rejected alike), which gives a reference policy that
writes well-formed answers, right or wrong, with some diversity. From that reference, every
configuration (f-DPO divergence, TDPO or epsilon-DPO, at each beta) is trained with
`fdpo.train.Trainer` on the preference loss alone, and the trained policy is evaluated on held-out prompts:

- reward: mean task reward (the bundled task's rule) of completions sampled at temperature 1;
- entropy: mean per-token entropy of the policy's next-token distribution along its own samples
  (`fdpo.token_entropy` on the final hidden states, completion tokens only);
- distinct-1 / distinct-2: distinct token n-grams over total n-grams among the samples of a
  prompt (stop token excluded), averaged over prompts;
- KL: sequence-level KL(policy || reference), the Monte-Carlo mean over the policy's samples of
  log pi(y) - log pi_ref(y) (`fdpo.sequence_logprobs` of both models);
- accuracy / ECE: reward accuracy and expected calibration error of the implicit reward on the
  held-out pairs (the trainer's evaluation).

The reference itself is evaluated the same way (its KL is 0 by definition). Results go to
<output>/study_full.json, or study_quick.json with --quick (every run, the means and standard
deviations per configuration, wall time, command line, versions, load average), and the matching
.png (reward against entropy and against KL, one point per run); the table is printed.
"""

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import fdpo
from fdpo.options import BACKENDS
from fdpo.train import CausalLM, PreferenceLoader, TrainConfig, Trainer, task_reward, tiny_llama
from fdpo.train.data import load_preference_data, pad_rows, shifted_sequence
from fdpo.train.models import builtin_tokenizer
from fdpo.train.tasks import bundled_data

from .measure import versions

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Every configuration the study knows: name -> the TrainConfig fields that select it.
METHODS: dict[str, dict] = {
    "reverse_kl": {"method": "dpo", "divergence": "reverse_kl"},
    "js": {"method": "dpo", "divergence": "js"},
    "forward_kl": {"method": "dpo", "divergence": "forward_kl"},
    "alpha_0.3": {"method": "dpo", "divergence": "alpha", "alpha": 0.3},
    "alpha_0.5": {"method": "dpo", "divergence": "alpha", "alpha": 0.5},
    "alpha_0.7": {"method": "dpo", "divergence": "alpha", "alpha": 0.7},
    "tdpo": {"method": "tdpo"},
    "epsilon_dpo": {"method": "epsilon_dpo"},
}
REFERENCE = "reference"
BETAS = (0.1, 1.0, 3.0)
QUICK_BETA = 1.0
SEEDS = (0, 1)
METRICS = ("reward", "entropy", "distinct_1", "distinct_2", "kl", "accuracy", "ece")


@dataclass
class StudySettings:
    """What `run_study` trains and how it evaluates (the CLI's flags, see `build_parser`)."""

    methods: tuple[str, ...] = tuple(METHODS)
    betas: tuple[float, ...] = BETAS
    seeds: tuple[int, ...] = SEEDS
    max_steps: int = 150
    batch_size: int = 16
    lr: float = 1e-4
    warm_start_steps: int = 400
    warm_start_lr: float = 1e-3
    samples_per_prompt: int = 8
    eval_prompts: int = 128
    max_new_tokens: int = 16
    backend: str = "auto"
    quick: bool = False
    output: Path = field(default_factory=lambda: RESULTS_DIR)

    def validate(self) -> None:
        """Raise ValueError naming the first setting outside its allowed values."""
        unknown = [m for m in self.methods if m not in METHODS]
        if not self.methods or unknown:
            raise ValueError(f"methods must be a non-empty selection of {', '.join(METHODS)}; unknown: {unknown}")
        if not self.betas or not all(math.isfinite(b) and b > 0 for b in self.betas):
            raise ValueError(f"betas must be a non-empty list of finite numbers > 0, got {list(self.betas)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        for name in ("max_steps", "batch_size", "samples_per_prompt", "eval_prompts", "max_new_tokens"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.warm_start_steps < 0:
            raise ValueError(f"warm_start_steps must be an integer >= 0, got {self.warm_start_steps!r}")
        for name in ("lr", "warm_start_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


def distinct_n(sequences: Sequence[Sequence], n: int) -> float:
    """Distinct-n of a set of sequences: distinct n-grams over all n-grams (0.0 when there are none).

    sequences: token sequences (any hashable items); an n-gram is n consecutive items of one sequence.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    grams = [tuple(seq[i:i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def sample_completions(model: nn.Module, prompts: Sequence[Sequence[int]], *, samples_per_prompt: int,
                       max_new_tokens: int, stop_ids: Sequence[int], generator: torch.Generator
                       ) -> list[list[tuple[int, ...]]]:
    """Completions sampled at temperature 1 from the full next-token distribution (no top-k or top-p).

    model: a transformers causal LM; prompts: token ids (bos included). Each completion stops after
    the first token in `stop_ids` (kept as its last token) or after `max_new_tokens` tokens.
    Prompts of equal length are sampled together. Returns, for each prompt, `samples_per_prompt`
    tuples of completion token ids.
    """
    if samples_per_prompt < 1 or max_new_tokens < 1:
        raise ValueError(f"samples_per_prompt and max_new_tokens must be >= 1, got {samples_per_prompt} and "
                         f"{max_new_tokens}")
    device = next(model.parameters()).device
    stop = torch.tensor(list(stop_ids), device=device)
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(index)
    completions: list[list[tuple[int, ...]]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    for indices in by_length.values():
        ids = torch.tensor([list(prompts[i]) for i in indices], device=device).repeat_interleave(samples_per_prompt, 0)
        width = ids.shape[1]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
            ids = torch.cat([ids, token[:, None]], dim=1)
            done |= torch.isin(token, stop)
            if done.all():
                break
        for row, new in enumerate(ids[:, width:].tolist()):
            end = next((i + 1 for i, t in enumerate(new) if t in stop_ids), len(new))
            completions[indices[row // samples_per_prompt]].append(tuple(new[:end]))
    model.train(was_training)
    return completions


def completion_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, pad_token_id: int,
                     ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + completion rows for scoring, padded on the right.

    Returns input_ids int64 [S, T], attention_mask int64 [S, T] and labels int64 [S, T]: the next
    token on completion tokens, ignore_index on the prompt and padding.
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need one prompt per completion and at least one, got {len(prompts)} prompts and "
                         f"{len(completions)} completions")
    if not all(prompts) or not all(completions):
        raise ValueError("every prompt and every completion needs at least one token")
    rows = [shifted_sequence(prompt, completion, ignore_index)
            for prompt, completion in zip(prompts, completions, strict=True)]
    return pad_rows(rows, pad_token_id=pad_token_id, ignore_index=ignore_index)


@torch.no_grad()
def completion_statistics(policy: CausalLM, reference: CausalLM, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sequence statistics of scored completions under the policy and the reference, without logits.

    input_ids, attention_mask, labels: int64 [S, T] (as `completion_batch` makes them). Returns
    float32 [S] tensors: "logprob" and "ref_logprob" (sums of label log-probs, `fdpo.sequence_logprobs`),
    "entropy" (sum over scored tokens of the policy's next-token entropy, `fdpo.token_entropy`) and
    "tokens" (scored tokens).
    """
    sums = {}
    for name, lm in (("logprob", policy), ("ref_logprob", reference)):
        hidden = lm.hidden_states(input_ids, attention_mask=attention_mask)
        head = lm.head(hidden.dtype)
        options = {"bias": head.bias, "softcap": head.softcap, "temperature": head.temperature,
                   "ignore_index": head.ignore_index, "backend": head.backend, "compute_dtype": head.compute_dtype}
        sums[name] = fdpo.sequence_logprobs(hidden, head.weight, labels, **options)
        if lm is policy:
            sums["entropy"] = fdpo.token_entropy(hidden, head.weight, labels, **options).sum(dim=-1)
    sums["tokens"] = (labels != policy.ignore_index).sum(dim=-1).float()
    return sums


def evaluate_samples(policy: nn.Module, reference: nn.Module, tokenizer, prompts: Sequence[str], *,
                     samples_per_prompt: int, max_new_tokens: int, seed: int, backend: str = "auto"
                     ) -> dict[str, float]:
    """Reward, entropy, distinct-1/2 and KL(policy || reference) of the policy's samples (see module docs).

    policy, reference: transformers causal LMs over `tokenizer`'s vocabulary; prompts: task
    prompts. Sampling is seeded by `seed`, so two policies are compared on the same random numbers.
    backend: the fused backend of the statistics.
    """
    prompt_ids = [[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts]
    stop_ids = [tokenizer.eos_token_id, *tokenizer("\n", add_special_tokens=False)["input_ids"]]
    generator = torch.Generator().manual_seed(seed)
    samples = sample_completions(policy, prompt_ids, samples_per_prompt=samples_per_prompt,
                                 max_new_tokens=max_new_tokens, stop_ids=stop_ids, generator=generator)
    rewards, rows_prompt, rows_completion, distinct = [], [], [], {1: [], 2: []}
    for prompt, ids, completions in zip(prompts, prompt_ids, samples, strict=True):
        for completion in completions:
            rewards.append(task_reward(prompt, tokenizer.decode(completion, skip_special_tokens=True)))
            rows_prompt.append(ids)
            rows_completion.append(completion)
        answers = [c[:-1] if c[-1] in stop_ids else c for c in completions]
        for n in distinct:
            distinct[n].append(distinct_n(answers, n))
    input_ids, mask, labels = completion_batch(rows_prompt, rows_completion, pad_token_id=tokenizer.pad_token_id)
    stats = completion_statistics(CausalLM(policy, backend=backend), CausalLM(reference, backend=backend),
                                  input_ids, mask, labels)
    return {"reward": sum(rewards) / len(rewards),
            "entropy": (stats["entropy"].sum() / stats["tokens"].sum()).item(),
            "distinct_1": sum(distinct[1]) / len(distinct[1]),
            "distinct_2": sum(distinct[2]) / len(distinct[2]),
            "kl": (stats["logprob"] - stats["ref_logprob"]).mean().item(),
            "length": stats["tokens"].mean().item()}


def warm_start(seed: int, tokenizer, *, steps: int, batch_size: int, lr: float, backend: str = "auto") -> nn.Module:
    """The reference policy of a seed: the trainer's tiny Llama after `steps` of supervised fine-tuning.

    The loss is the mean negative log-likelihood of the response tokens of both the chosen and the
    rejected responses of the bundled training pairs (fused log-probs, no logits), so the reference
    answers in the task's format without preferring the sorted answer. steps=0: the random init.
    """
    model = tiny_llama(seed)
    if steps == 0:
        return model
    examples = load_preference_data(bundled_data("train"), tokenizer, max_length=TrainConfig().resolved_max_length())
    loader = PreferenceLoader(examples, batch_size, pad_token_id=tokenizer.pad_token_id, seed=seed)
    lm = CausalLM(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    torch.manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = loader.next_batch()
        logprobs = lm(batch.input_ids, batch.labels, attention_mask=batch.attention_mask)
        loss = -logprobs.sum() / batch.num_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def train_config(method: str, beta: float, seed: int, settings: StudySettings, output_dir: str) -> TrainConfig:
    """The trainer's settings of one run: the method's selectors, the study's schedule, no sampling or saving.

    The preference loss alone (nll_weight 0): the reference is already warm-started, and an NLL term
    (which the trainer adds to dpo and epsilon_dpo, not tdpo, for the random-init built-in model)
    would blur the comparison between the divergences.
    """
    return TrainConfig(output_dir=output_dir, max_steps=settings.max_steps, batch_size=settings.batch_size,
                       lr=settings.lr, beta=beta, seed=seed, nll_weight=0.0, eval_every=0, save_every=0,
                       log_every=settings.max_steps, sample_prompts=0, progress=False, device="cpu",
                       backend=settings.backend, **METHODS[method])


def train_and_evaluate(method: str, beta: float, seed: int, reference: nn.Module, tokenizer, prompts: Sequence[str],
                       settings: StudySettings) -> dict:
    """Train one configuration from `reference` with `fdpo.train.Trainer`, then evaluate it; one run record."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fdpo-study-") as directory:
        trainer = Trainer(train_config(method, beta, seed, settings, directory), model=copy.deepcopy(reference),
                          tokenizer=tokenizer)
        summary = trainer.train()
    trained = time.perf_counter()
    metrics = evaluate_samples(trainer.hf_model, reference, tokenizer, prompts,
                               samples_per_prompt=settings.samples_per_prompt,
                               max_new_tokens=settings.max_new_tokens, seed=seed, backend=settings.backend)
    held_out = summary["last_eval"]
    metrics.update(accuracy=held_out["accuracy"], ece=held_out["ece"], margin=held_out["margin"],
                   eval_loss=held_out["loss"], token_kl_chosen=held_out["kl"])
    record = {"method": method, "beta": beta, "seed": seed, "config": METHODS[method], "metrics": metrics,
              "train_seconds": trained - start, "eval_seconds": time.perf_counter() - trained}
    if "beta" in (summary["last_train"] or {}):
        record["final_beta"] = summary["last_train"]["next_beta"]
    return record


def reference_record(seed: int, reference: nn.Module, tokenizer, prompts: Sequence[str],
                     settings: StudySettings) -> dict:
    """The untrained reference evaluated like a trained policy (KL 0; no implicit reward, so no accuracy/ECE)."""
    start = time.perf_counter()
    metrics = evaluate_samples(reference, reference, tokenizer, prompts, samples_per_prompt=settings.samples_per_prompt,
                               max_new_tokens=settings.max_new_tokens, seed=seed, backend=settings.backend)
    metrics.update(accuracy=None, ece=None)
    return {"method": REFERENCE, "beta": None, "seed": seed, "config": {}, "metrics": metrics,
            "train_seconds": 0.0, "eval_seconds": time.perf_counter() - start}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(runs: Sequence[dict]) -> list[dict]:
    """Mean and sample standard deviation (None for a single seed) of every metric per (method, beta)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["beta"]), []).append(run)
    rows = []
    for (method, beta), members in groups.items():
        row = {"method": method, "beta": beta, "seeds": [r["seed"] for r in members]}
        for name in members[0]["metrics"]:
            values = [r["metrics"][name] for r in members if r["metrics"][name] is not None]
            row[name], row[f"{name}_std"] = _mean_std(values)
        rows.append(row)
    return rows


def findings(summary: Sequence[dict]) -> dict[str, dict]:
    """Per beta, the f-DPO divergences ranked by mean reward (high first) and by mean entropy (low first).

    The f-DPO paper's qualitative claim is that reverse KL tops the first ranking and the second
    (highest reward, least diversity); the flags say whether it does here.
    """
    divergences = [m for m, spec in METHODS.items() if spec["method"] == "dpo"]
    out = {}
    for beta in sorted({row["beta"] for row in summary if row["beta"] is not None}):
        rows = [r for r in summary if r["beta"] == beta and r["method"] in divergences]
        if len(rows) < 2 or not any(r["method"] == "reverse_kl" for r in rows):
            continue
        by_reward = [r["method"] for r in sorted(rows, key=lambda r: -r["reward"])]
        by_entropy = [r["method"] for r in sorted(rows, key=lambda r: r["entropy"])]
        out[str(beta)] = {"by_reward": by_reward, "by_entropy": by_entropy,
                          "reverse_kl_highest_reward": by_reward[0] == "reverse_kl",
                          "reverse_kl_lowest_entropy": by_entropy[0] == "reverse_kl"}
    return out


def format_table(summary: Sequence[dict]) -> str:
    """The per-configuration means (± std over seeds) as a Markdown table."""
    def cell(row: dict, name: str) -> str:
        mean, std = row[name], row.get(f"{name}_std")
        if mean is None:
            return "–"
        return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"

    columns = (("reward", "reward"), ("entropy", "entropy"), ("distinct_2", "distinct-2"), ("kl", "KL"),
               ("accuracy", "accuracy"), ("ece", "ECE"))
    lines = ["| method | beta | seeds | " + " | ".join(title for _, title in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for row in summary:
        beta = "–" if row["beta"] is None else f"{row['beta']:g}"
        lines.append(f"| {row['method']} | {beta} | {len(row['seeds'])} | "
                     + " | ".join(cell(row, name) for name, _ in columns) + " |")
    return "\n".join(lines)


def plot(runs: Sequence[dict], path: Path) -> None:
    """Two panels, reward against entropy and reward against KL: one point per run, colour = method, marker = beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    palette = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]   # no grey: betas' legend uses it
    colours = {name: palette[i % len(palette)] for i, name in enumerate(METHODS)}
    colours[REFERENCE] = "black"
    betas = sorted({r["beta"] for r in runs if r["beta"] is not None})
    markers = dict(zip(betas, "os^Dvp<>h", strict=False))
    figure, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for axis, x, label in ((axes[0], "entropy", "predictive entropy of own samples (nats / token)"),
                           (axes[1], "kl", "sequence KL(policy || reference) on own samples (nats)")):
        for run in runs:
            marker = "*" if run["beta"] is None else markers.get(run["beta"], "x")
            axis.scatter(run["metrics"][x], run["metrics"]["reward"], color=colours[run["method"]], marker=marker,
                         s=110 if marker == "*" else 45, edgecolors="none", alpha=0.85)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("task reward of samples (temperature 1)")
    present = [m for m in [*METHODS, REFERENCE] if any(r["method"] == m for r in runs)]
    handles = [Line2D([], [], color=colours[m], marker="*" if m == REFERENCE else "o", linestyle="", label=m)
               for m in present]
    handles += [Line2D([], [], color="grey", marker=markers[b], linestyle="", label=f"beta {b:g}") for b in betas]
    axes[1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    figure.suptitle("Alignment vs diversity on the bundled sort task (one point per run)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies under it (results name no machine's layout)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_study(settings: StudySettings, *, command: str = "", log=print) -> dict:
    """Warm-start a reference per seed, train and evaluate every configuration; write JSON and PNG.

    Returns the results dict (also written to settings.output / study_{quick,full}.json).
    """
    settings.validate()
    start, load_start = time.perf_counter(), os.getloadavg()
    tokenizer = builtin_tokenizer()
    with bundled_data("eval").open(encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    if settings.eval_prompts > len(prompts):
        raise ValueError(f"eval_prompts must be at most {len(prompts)} (the prompts of the bundled eval split), got "
                         f"{settings.eval_prompts}")
    prompts = prompts[:settings.eval_prompts]
    runs = []
    for seed in settings.seeds:
        reference = warm_start(seed, tokenizer, steps=settings.warm_start_steps, batch_size=settings.batch_size,
                               lr=settings.warm_start_lr, backend=settings.backend)
        runs.append(reference_record(seed, reference, tokenizer, prompts, settings))
        for method in settings.methods:
            for beta in settings.betas:
                run = train_and_evaluate(method, beta, seed, reference, tokenizer, prompts, settings)
                runs.append(run)
                m = run["metrics"]
                log(f"seed {seed} {method:<12} beta {beta:<5g} reward {m['reward']:.3f} entropy {m['entropy']:.3f} "
                    f"distinct-2 {m['distinct_2']:.3f} KL {m['kl']:.2f} accuracy {m['accuracy']:.3f} "
                    f"ECE {m['ece']:.3f} ({run['train_seconds'] + run['eval_seconds']:.1f} s)")
    summary = summarize(runs)
    name = "study_quick" if settings.quick else "study_full"
    results = {"study": "alignment versus diversity across divergences (bundled sort task)",
               "command": command, "settings": {**asdict(settings), "output": shown_path(settings.output)},
               "metrics": {"reward": "mean task reward of temperature-1 samples on held-out prompts",
                           "entropy": "mean per-token entropy (nats) of the policy along its own samples",
                           "distinct_1": "distinct unigrams / unigrams among a prompt's samples, mean over prompts",
                           "distinct_2": "distinct bigrams / bigrams among a prompt's samples, mean over prompts",
                           "kl": "mean over own samples of log pi(y) - log pi_ref(y): KL(policy || reference)",
                           "length": "mean completion tokens (stop token included)",
                           "accuracy": "reward accuracy of the implicit reward on the held-out pairs",
                           "ece": "expected calibration error of sigmoid(margin) on the held-out pairs"},
               "runs": runs, "summary": summary, "findings": findings(summary),
               "wall_seconds": time.perf_counter() - start,
               "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
               "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads()},
               "versions": versions()}
    settings.output.mkdir(parents=True, exist_ok=True)
    (settings.output / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    plot(runs, settings.output / f"{name}.png")
    return results


def build_parser() -> argparse.ArgumentParser:
    defaults = StudySettings()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.study",
        description="Alignment versus diversity across divergences: train the trainer's tiny Llama on the bundled "
                    "sort task once per configuration (method x beta x seed) and evaluate each policy's samples on "
                    "held-out prompts (task reward, entropy, distinct-n, KL to the reference, reward accuracy, ECE). "
                    "Writes study_full.json / study_full.png (study_quick.* with --quick) and prints the table.")
    parser.add_argument("--quick", action="store_true",
                        help=f"one beta ({QUICK_BETA}) and one seed ({SEEDS[0]}), every method, unless --betas or "
                             "--seeds say otherwise (about a minute on 2 cores)")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), metavar="METHOD",
                        help=f"configurations to train, among {', '.join(METHODS)} (default: all)")
    parser.add_argument("--betas", nargs="+", type=float, metavar="BETA",
                        help=f"betas of every method (default: {' '.join(map(str, BETAS))})")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                        help=f"seeds: model init, warm start, data order and sampling (default: "
                             f"{' '.join(map(str, SEEDS))})")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps,
                        help="preference optimization steps of each run (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="pairs per step, warm start included (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help="peak learning rate of the preference runs (default: %(default)s)")
    parser.add_argument("--warm-start-steps", type=int, default=defaults.warm_start_steps,
                        help="supervised steps that make the reference from the random init (0: the random init "
                             "is the reference; default: %(default)s)")
    parser.add_argument("--warm-start-lr", type=float, default=defaults.warm_start_lr,
                        help="learning rate of the warm start (default: %(default)s)")
    parser.add_argument("--samples-per-prompt", type=int, default=defaults.samples_per_prompt,
                        help="completions sampled per held-out prompt at temperature 1 (default: %(default)s)")
    parser.add_argument("--eval-prompts", type=int, default=defaults.eval_prompts,
                        help="held-out prompts sampled (the first of the bundled eval split; default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help="longest completion, in tokens (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default=defaults.backend,
                        help="fused backend of training and evaluation (default: %(default)s: torch on a CPU, "
                             "triton on a GPU or under TRITON_INTERPRET=1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; one is fastest for this tiny model and keeps shared cores usable "
                             "(default: %(default)s)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR,
                        help="directory of the JSON and PNG results (default: benchmarks/results)")
    return parser


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    """The study's settings from parsed flags (--quick picks one beta and one seed unless they are given)."""
    betas = args.betas or ([QUICK_BETA] if args.quick else list(BETAS))
    seeds = args.seeds if args.seeds is not None else ([SEEDS[0]] if args.quick else list(SEEDS))
    settings = StudySettings(
        methods=tuple(dict.fromkeys(args.methods or METHODS)), betas=tuple(betas), seeds=tuple(seeds),
        max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, warm_start_steps=args.warm_start_steps,
        warm_start_lr=args.warm_start_lr, samples_per_prompt=args.samples_per_prompt,
        eval_prompts=args.eval_prompts, max_new_tokens=args.max_new_tokens, backend=args.backend, quick=args.quick,
        output=args.output)
    settings.validate()
    return settings


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m benchmarks.study`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.study " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        results = run_study(settings, command=command.strip())
    except ValueError as error:
        parser.error(str(error))
    print(format_table(results["summary"]))
    name = "study_quick" if settings.quick else "study_full"
    print(f"{len(results['runs'])} runs in {results['wall_seconds']:.0f} s (load average "
          f"{results['load_average']['start'][0]:.2f} -> {results['load_average']['end'][0]:.2f}); results "
          f"{settings.output / name}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
