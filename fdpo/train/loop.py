"""The training loop: AdamW, warmup + decay, accumulation, clipping, evaluation, checkpoints.

`Trainer(config).train()` runs a whole job and returns its final summary. One process, or one per
device under `torchrun` with DDP or FSDP2 (`fully_shard` on each decoder layer and on the root):
every process takes its share of each global batch, and the loss is computed inside the wrapped
module's forward, so FSDP has gathered the LM-head weight when the fused kernels read it.

Checkpoints are directories `checkpoints/step-NNNNNNN` written under a temporary name and renamed
(a crash while writing leaves the previous ones intact); they hold the model, optimizer,
scheduler, random states, data position, step and epsilon-DPO's beta, so a resumed run continues
exactly as the uninterrupted one would have.
"""

import contextlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm import tqdm

import fdpo

from .adapter import CausalLM, find_decoder, unwrap
from .config import BUILTIN_MODEL, TrainConfig
from .data import PreferenceBatch, PreferenceLoader, eval_batches, load_preference_data
from .reference import CachedReference, FrozenReference, frozen_copy
from .tasks import bundled_data, task_reward
from .tokenizer import VOCAB_SIZE, byte_tokenizer


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss); the message names the step."""


def tiny_llama(seed: int = 0, vocab_size: int = VOCAB_SIZE) -> nn.Module:
    """The built-in model: a 2-layer Llama of width 64 with random weights (about 0.1 M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=257, eos_token_id=258, pad_token_id=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_model_and_tokenizer(config: TrainConfig) -> tuple[nn.Module, object]:
    """The policy model and its tokenizer: the built-in tiny Llama, or `from_pretrained(config.model)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.model == BUILTIN_MODEL:
        model = tiny_llama(config.seed)
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer) if config.tokenizer else byte_tokenizer()
    else:
        model = AutoModelForCausalLM.from_pretrained(config.model, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward (transformers 5's name, or 4.x's)."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def build_loss(config: TrainConfig) -> nn.Module:
    """The loss module that `config.method` selects, with its hyper-parameters.

    dpo: `fdpo.PreferenceLoss` (any divergence and loss shape); tdpo: `fdpo.TDPOLoss`;
    epsilon_dpo: `fdpo.EpsilonDPOLoss` over a `fdpo.EpsilonDPO` controller (its `controller`
    attribute), whose beta starts at config.beta and moves by config.epsilon.
    """
    nll_weight = config.resolved_nll_weight()
    if config.method == "tdpo":
        if nll_weight:
            raise ValueError("nll_weight applies to method 'dpo' and 'epsilon_dpo', not 'tdpo'")
        return fdpo.TDPOLoss(beta=config.beta, alpha=config.alpha, variant=config.tdpo_variant,
                             divergence=config.divergence, backend=config.backend)
    shape = {"divergence": config.divergence, "alpha": config.alpha, "loss": config.loss,
             "label_smoothing": config.label_smoothing, "nll_weight": nll_weight, "backend": config.backend}
    if config.method == "epsilon_dpo":
        return fdpo.EpsilonDPOLoss(fdpo.EpsilonDPO(beta=config.beta, eps=config.epsilon), **shape)
    return fdpo.PreferenceLoss(beta=config.beta, **shape)


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup, then cosine/linear decay to 0 or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def expected_calibration_error(margins: torch.Tensor, bins: int = 10) -> float:
    """ECE of the implicit preference classifier P(chosen wins) = sigmoid(margin), margins float [P].

    The classifier predicts the side it gives more than 1/2; its confidence max(p, 1 - p) falls in
    one of `bins` equal-width bins over [1/2, 1]; ECE = sum over bins of (pairs in bin / P) *
    |accuracy in bin - mean confidence in bin|, where a pair is right when the chosen side is
    predicted (a tie, margin 0, counts as half right).
    """
    p = torch.sigmoid(margins.double())
    confidence = torch.maximum(p, 1 - p)
    correct = (margins > 0).double() + 0.5 * (margins == 0).double()
    index = ((confidence - 0.5) * 2 * bins).long().clamp(0, bins - 1)
    error = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            gap = correct[chosen].mean().item() - confidence[chosen].mean().item()
            error += chosen.double().mean().item() * abs(gap)
    return error


class PreferenceModel(nn.Module):
    """The policy and its loss as one module: forward(batch tensors, reference inputs) -> loss output.

    Computing the loss inside this forward is what lets DDP and FSDP2 wrap the whole step: the
    LM head (part of the policy) is read only here, while FSDP holds it unsharded.
    """

    def __init__(self, policy: CausalLM, loss_fn: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.loss_fn = loss_fn

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                statistics: bool = False, **reference) -> fdpo.PreferenceLossOutput:
        """Loss of the batch (layout of `fdpo.train.data.PreferenceBatch`); `reference` holds ref_logprobs
        or ref_hidden / ref_head.

        statistics=True adds, over the chosen responses, extras "entropy_sum" (policy entropy summed
        over their tokens), "kl_sum" (KL(reference || policy) summed over their tokens, when the
        reference's hidden states are given) and "token_count".
        """
        hidden = self.policy.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if cu_seqlens is not None:
            hidden = hidden[0]
        dtype = self.policy.head_dtype(hidden)
        hidden, head = hidden.to(dtype), self.policy.head(dtype)
        out = self.loss_fn(hidden, labels, head, cu_seqlens=cu_seqlens, **reference)
        if statistics:
            out.extras.update(self._statistics(hidden, labels, head, cu_seqlens, out.margins.numel(), reference))
        return out

    @torch.no_grad()
    def _statistics(self, hidden: torch.Tensor, labels: torch.Tensor, head: fdpo.FusedLMHead,
                    cu_seqlens: torch.Tensor | None, num_pairs: int, reference: dict) -> dict[str, torch.Tensor]:
        end = int(cu_seqlens[num_pairs]) if cu_seqlens is not None else num_pairs
        hidden, labels = hidden[:end], labels[:end]
        two_heads = {}
        if "ref_hidden" in reference:
            ref_head = reference["ref_head"]
            two_heads = {"ref_hidden": reference["ref_hidden"][:end], "kl": True,
                         "ref_head": fdpo.LMHead(ref_head.weight, ref_head.bias, ref_head.softcap, head.temperature)}
        # Entropy and KL from one fused pass over the vocabulary, through the policy head's module call.
        per_token = head(hidden, labels, entropy=True, **two_heads)
        stats = {"entropy_sum": per_token["entropy"].sum(),
                 "token_count": (labels != head.ignore_index).sum().float()}
        if "kl" in per_token:
            stats["kl_sum"] = per_token["kl"].sum()
        return stats


def batch_inputs(batch: PreferenceBatch) -> dict:
    return {"input_ids": batch.input_ids, "labels": batch.labels, "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids, "cu_seqlens": batch.cu_seqlens}


def rng_state() -> dict:
    # numpy's legacy global generator is what user code seeds with np.random.seed: restore it too.
    state = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint of the highest step under output_dir/checkpoints, or None."""
    complete = [p for p in sorted((Path(output_dir) / "checkpoints").glob("step-*")) if (p / "state.pt").is_file()]
    return complete[-1] if complete else None


class Trainer:
    """One training job (see the module docstring). `train()` returns the final summary dict."""

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None, tokenizer=None) -> None:
        config.validate()
        self.config = config
        self.rank, self.world_size = self._setup_distributed()
        self.device = self._device()
        self.output_dir = config.resolved_output_dir()
        self.metrics_path = self.output_dir / "metrics.jsonl"
        torch.manual_seed(config.seed)
        if model is None:
            model, loaded = load_model_and_tokenizer(config)
            tokenizer = tokenizer or loaded
        if tokenizer is None:
            raise ValueError("a model passed to Trainer needs its tokenizer too")
        self.tokenizer = tokenizer
        self.hf_model = model.to(self.device)
        if config.gradient_checkpointing:
            enable_activation_checkpointing(unwrap(model))
        self._load_data()
        reference = FrozenReference(CausalLM(frozen_copy(model), backend=config.backend))
        if config.reference == "cache":
            cache_dir = Path(config.cache_dir) if config.cache_dir else self.output_dir / "reference_cache"
            options = {"batch_size": config.eval_batch_size, "pad_token_id": tokenizer.pad_token_id,
                       "packed": config.packed, "write": self.rank == 0}
            self.reference = CachedReference.build(reference, self.train_examples, cache_dir, **options)
            self.eval_reference = (CachedReference.build(reference, self.eval_examples, cache_dir, **options)
                                   if self.eval_examples else None)
            del reference
        else:
            self.reference = self.eval_reference = reference
        self.loss_fn = build_loss(config)
        self.module = self._wrap(PreferenceModel(CausalLM(model, backend=config.backend), self.loss_fn))
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, warmup_steps=config.warmup_steps, max_steps=config.max_steps, schedule=config.schedule))
        self.loader = PreferenceLoader(self.train_examples, config.batch_size, pad_token_id=tokenizer.pad_token_id,
                                       packed=config.packed, seed=config.seed, rank=self.rank,
                                       world_size=self.world_size)
        self.step = 0
        self.history: list[dict] = []

    def _setup_distributed(self) -> tuple[int, int]:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _device(self) -> torch.device:
        if self.config.device != "auto":
            return torch.device(self.config.device)
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def _load_data(self) -> None:
        config, tokenizer = self.config, self.tokenizer
        lengths = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length}
        train = config.data or bundled_data("train")
        evaluation = config.eval_data or (bundled_data("eval") if config.data is None else None)
        self.train_examples = load_preference_data(train, tokenizer, **lengths)
        self.eval_examples = load_preference_data(evaluation, tokenizer, split="test", **lengths) if evaluation else []
        self.eval_prompts = []
        if evaluation is not None and config.data is None and config.eval_data is None:
            with open(evaluation, encoding="utf-8") as f:
                self.eval_prompts = [json.loads(line)["prompt"] for line in f][:config.sample_prompts]

    def _wrap(self, module: PreferenceModel) -> nn.Module:
        if self.world_size == 1:
            return module
        if self.config.engine == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        from torch.distributed.fsdp import fully_shard

        layer_types = tuple(getattr(unwrap(self.hf_model), "_no_split_modules", None) or ())
        for layer in find_decoder(self.hf_model).modules():
            if type(layer).__name__ in layer_types:
                fully_shard(layer)
        fully_shard(module)
        return module

    def _autocast(self):
        if self.config.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _no_sync(self, last: bool):
        if isinstance(self.module, nn.parallel.DistributedDataParallel) and not last:
            return self.module.no_sync()
        if hasattr(self.module, "set_requires_gradient_sync"):
            self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(values)
            values /= self.world_size
        return values

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.rank == 0:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its metrics (averaged over ranks)."""
        config = self.config
        totals = torch.zeros(5, dtype=torch.float64)
        for micro in range(config.grad_accum):
            batch = self.loader.next_batch().to(self.device)
            reference = self.reference.loss_inputs(batch)
            last = micro == config.grad_accum - 1
            with self._no_sync(last):
                with self._autocast():
                    out = self.module(**batch_inputs(batch), **reference)
                finite = torch.isfinite(out.loss.detach()).float().cpu()
                if self.world_size > 1:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if not finite.item():
                    raise TrainingError(f"the loss is not finite ({out.loss.item()}) at step {self.step + 1} "
                                        f"(micro-batch {micro + 1} of {config.grad_accum}); stopped before the "
                                        f"update, no checkpoint written for this step (last good: "
                                        f"{latest_checkpoint(self.output_dir)})")
                (out.loss / config.grad_accum).backward()
            totals += torch.tensor([out.loss.item(), out.accuracy.item(), out.margins.mean().item(),
                                    out.chosen_rewards.mean().item(), out.rejected_rewards.mean().item()],
                                   dtype=torch.float64)
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        means = self._mean_over_ranks(totals / config.grad_accum).tolist()
        metrics = {"step": self.step, "split": "train", "loss": means[0], "accuracy": means[1], "margin": means[2],
                   "chosen_reward": means[3], "rejected_reward": means[4], "grad_norm": float(norm),
                   "lr": self.scheduler.get_last_lr()[0]}
        controller = getattr(self.loss_fn, "controller", None)
        if controller is not None:
            metrics["beta"] = controller.update()
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss, reward accuracy, margin, KL to the reference, entropy and calibration on the held-out pairs.

        loss: the training objective (preference loss, plus the NLL term when weighted), mean over pairs.

        kl: mean over chosen responses of the summed per-token KL(reference || policy) with a frozen
        reference; with cached reference sums, kl_estimate: the mean of policy - reference log-prob
        sums of the chosen responses instead. entropy: the policy's mean per-token entropy (nats)
        over the chosen responses.
        """
        self.module.eval()
        loss_sum, margins, estimate = 0.0, [], []
        totals = {"entropy_sum": 0.0, "kl_sum": 0.0, "token_count": 0.0}
        for batch in eval_batches(self.eval_examples, self.config.eval_batch_size,
                                  pad_token_id=self.tokenizer.pad_token_id, packed=self.config.packed):
            batch = batch.to(self.device)
            reference = self.eval_reference.loss_inputs(batch)
            with self._autocast():
                out = self.module(**batch_inputs(batch), statistics=True, **reference)
            for name in totals:
                totals[name] += out.extras[name].item() if name in out.extras else 0.0
            loss_sum += out.loss.item() * batch.num_pairs
            margins.append(out.margins.float().cpu())
            if "ref_logprobs" in reference:
                estimate.append((out.policy_chosen - reference["ref_logprobs"][0]).float().cpu())
        self.module.train()
        margins_all = torch.cat(margins)
        metrics = {"step": self.step, "split": "eval", "loss": loss_sum / len(self.eval_examples),
                   "accuracy": (margins_all > 0).float().mean().item(), "margin": margins_all.mean().item(),
                   "entropy": totals["entropy_sum"] / max(totals["token_count"], 1.0),
                   "ece": expected_calibration_error(margins_all)}
        if estimate:
            metrics["kl_estimate"] = torch.cat(estimate).mean().item()
        else:
            metrics["kl"] = totals["kl_sum"] / len(self.eval_examples)
        return metrics

    @torch.no_grad()
    def sample_rewards(self) -> float | None:
        """Mean task reward of greedy answers to the held-out prompts (built-in task, one process)."""
        if not self.eval_prompts or self.world_size > 1:
            return None
        model = unwrap(self.hf_model)
        model.eval()
        rewards = []
        for prompt in self.eval_prompts:
            bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
            ids = [*bos, *self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            output = model.generate(torch.tensor([ids], device=self.device), max_new_tokens=16, do_sample=False,
                                    eos_token_id=self.tokenizer.eos_token_id,
                                    pad_token_id=self.tokenizer.pad_token_id)
            completion = self.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
            rewards.append(task_reward(prompt, completion))
        model.train()
        return sum(rewards) / len(rewards)

    def state(self) -> dict:
        """Everything a checkpoint holds (collective under FSDP: every rank must call it)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        controller = getattr(self.loss_fn, "controller", None)
        return {"model": get_model_state_dict(self.module, options=options),
                "optimizer": get_optimizer_state_dict(self.module, self.optimizer, options=options),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "data": self.loader.state_dict(),
                "step": self.step, "controller": controller.state_dict() if controller is not None else None,
                "config": self.config.to_dict()}

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-NNNNNNN atomically (temporary directory, then rename); prune old ones."""
        state = self.state()
        root = self.output_dir / "checkpoints"
        final = root / f"step-{self.step:07d}"
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            temporary = root / f".tmp-{final.name}-{os.getpid()}"
            temporary.mkdir()
            torch.save(state, temporary / "state.pt")
            (temporary / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            if final.exists():
                old = root / f".tmp-old-{final.name}-{os.getpid()}"
                os.replace(final, old)
                os.replace(temporary, final)
                shutil.rmtree(old)
            else:
                os.replace(temporary, final)
            kept = sorted(p for p in root.glob("step-*") if (p / "state.pt").is_file())
            for old in kept[:-self.config.keep_checkpoints]:
                shutil.rmtree(old)
        if self.world_size > 1:
            dist.barrier()
        return final

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore model, optimizer, scheduler, random states, data position, step and controller."""
        path = Path(path)
        if not (path / "state.pt").is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a checkpoint directory (it has no state.pt)")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.module, state["model"], options=options)
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["data"])
        controller = getattr(self.loss_fn, "controller", None)
        if controller is not None and state["controller"] is not None:
            controller.load_state_dict(state["controller"])
        self.step = state["step"]
        set_rng_state(state["rng"])

    def save_final(self) -> Path:
        """`save_pretrained` of the policy (and tokenizer) into output_dir/final."""
        final = self.output_dir / "final"
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.module, options=options) if self.world_size > 1 else None
        if self.rank == 0:
            model = self.hf_model
            if full is not None:
                prefix = "policy.model."
                model.save_pretrained(final, state_dict={k[len(prefix):]: v for k, v in full.items()})
            else:
                model.save_pretrained(final)
            self.tokenizer.save_pretrained(final)
        return final

    def train(self) -> dict:
        """Run to max_steps (resuming if asked); returns the summary (also printed by the CLI)."""
        config = self.config
        if config.resume:
            path = latest_checkpoint(self.output_dir) if config.resume == "latest" else Path(config.resume)
            if path is None:
                raise FileNotFoundError(f"resume='latest' but {self.output_dir / 'checkpoints'} has no checkpoint")
            self.load_checkpoint(path)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        start = time.perf_counter()
        first_eval = self.evaluate() if self.eval_examples else None
        if first_eval:
            self._log(first_eval)
        first_reward = self._log_samples()
        first_train = None
        bar = tqdm(total=config.max_steps, initial=self.step, disable=not config.progress or self.rank != 0,
                   desc="train", dynamic_ncols=True)
        last_eval = first_eval
        while self.step < config.max_steps:
            metrics = self.train_step()
            first_train = first_train or metrics
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                self._log({**metrics, "time": time.perf_counter() - start})
            if self.eval_examples and config.eval_every and self.step % config.eval_every == 0 \
                    and self.step < config.max_steps:
                last_eval = self.evaluate()
                self._log(last_eval)
            if config.save_every and self.step % config.save_every == 0 and self.step < config.max_steps:
                self.save_checkpoint()
        bar.close()
        if self.eval_examples:
            last_eval = self.evaluate()
            self._log(last_eval)
        checkpoint = self.save_checkpoint()
        final = self.save_final()
        last_train = next((r for r in reversed(self.history) if r["split"] == "train"), None)
        summary = {"steps": self.step, "seconds": time.perf_counter() - start, "output_dir": str(self.output_dir),
                   "checkpoint": str(checkpoint), "model": str(final), "first_train": first_train,
                   "last_train": last_train, "first_eval": first_eval, "last_eval": last_eval}
        reward = self._log_samples()
        if reward is not None:
            summary["task_reward"] = (first_reward, reward)
        return summary

    def _log_samples(self) -> float | None:
        reward = self.sample_rewards()
        if reward is not None:
            self._log({"step": self.step, "split": "samples", "task_reward": reward, "prompts": len(self.eval_prompts)})
        return reward
