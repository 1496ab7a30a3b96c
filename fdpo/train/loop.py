"""The training loop: AdamW, warmup + decay, accumulation, clipping, evaluation, checkpoints.

`Trainer(config).train()` runs a whole job and returns its final summary. One process, or one per
device under `torchrun` with DDP or FSDP2 (`fully_shard` on each decoder layer and on the root):
every process takes its share of each global batch, and the loss is computed inside the wrapped
module's forward, so FSDP has gathered the LM-head weight when the fused kernels read it.

A step whose loss, gradient norm or updated parameters are not finite stops the run before any
checkpoint of that step. Checkpoints (fdpo.train.checkpoint) hold the model, optimizer,
scheduler, random states, data position, step, epsilon-DPO's beta and the run's identity, so a
resumed run continues exactly as the uninterrupted one would have; the output directory's rules
(one run per directory, what a resume may change) are in fdpo.train.rundir.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

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

from .adapter import CausalLM, find_decoder, unwrap
from .checkpoint import (
    TEMPORARY_PREFIX,
    CheckpointError,
    checkpoint_dirs,
    checkpoint_step,
    first_line,
    install,
    latest_intact,
    load_checkpoint_state,
    non_finite_tensors,
    prune,
    rng_state,
    set_rng_state,
    write_checkpoint,
    writing,
)
from .config import TrainConfig
from .data import PreferenceLoader, adds_bos, eval_batches, examples_digest, load_preference_data
from .metrics import Progress, expected_calibration_error, progress_bars
from .models import enable_activation_checkpointing, load_model_and_tokenizer, model_config
from .objective import PreferenceModel, batch_inputs, build_loss
from .reference import CachedReference, FrozenReference, frozen_copy, weights_digest
from .rundir import (
    IDENTITY_FIELDS,
    METRICS_FILE,
    NOT_COMPARED,
    MetricsLog,
    RunDirectoryError,
    RunLock,
    clear_run,
    lock_output_dir,
    mismatched_fields,
    new_run,
    prepare_output_dir,
    read_run,
    write_run,
)
from .tasks import bundled_data, task_reward


class TrainingError(RuntimeError):
    """A run that cannot go on (a non-finite loss, gradient or parameter); the message names the step."""


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup, then cosine/linear decay to 0 or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor (this process's shards) is finite; one device sync."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(local(t).detach()).all() for t in tensors]).all())


def torchrun_worker() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Trainer:
    """One training job (see the module docstring). `train()` returns the final summary dict."""

    def __init__(self, config: TrainConfig, *, model: nn.Module | None = None, tokenizer=None) -> None:
        config.validate()
        self.config = config
        self.rank, self.world_size = self._setup_distributed()
        self.device = self._device()
        self.output_dir = config.resolved_output_dir()
        self.notes: list[str] = []
        self.lock: RunLock | None = None
        self._on_rank0(self._lock_output_dir)
        try:
            self._build(model, tokenizer)
        except BaseException:
            self.close()
            raise

    def _lock_output_dir(self) -> None:
        self.lock = lock_output_dir(self.output_dir, self.say)

    def close(self) -> None:
        """Release the output directory's lock (`train` does when it ends, however it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _build(self, model: nn.Module | None, tokenizer) -> None:
        """The rest of the construction, with the output directory locked."""
        config = self.config
        options = {"resume": bool(config.resume), "overwrite": config.overwrite}
        for note in self._on_rank0(lambda: prepare_output_dir(self.output_dir, **options)):
            self.say(note)
        self.metrics = MetricsLog(self.output_dir / METRICS_FILE, write=self.rank == 0)
        torch.manual_seed(config.seed)
        if model is None:
            model, loaded = load_model_and_tokenizer(config)
            tokenizer = tokenizer or loaded
        if tokenizer is None:
            raise ValueError("a model passed to Trainer needs its tokenizer too")
        if tokenizer.pad_token_id is None:
            # Padding is masked and never scored: eos pads where the tokenizer has no pad token (GPT-2's), as
            # for a model the trainer loads (the tokenizer object is changed, and saved so with the model).
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with; set "
                                 "tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.max_length = config.resolved_max_length(model, tokenizer)
        self.hf_model = model.to(self.device)
        if config.gradient_checkpointing:
            enable_activation_checkpointing(unwrap(model))
        self._load_data()
        self.loss_fn = build_loss(config)
        if config.overwrite:
            self._on_rank0(lambda: clear_run(self.output_dir))
        self.run = new_run(self.identity(model))
        reference = FrozenReference(CausalLM(frozen_copy(model), backend=config.backend))
        if config.reference == "cache":
            cache_dir = Path(config.cache_dir) if config.cache_dir else self.output_dir / "reference_cache"
            options = {"batch_size": config.eval_batch_size, "pad_token_id": tokenizer.pad_token_id,
                       "packed": config.packed, "write": self.rank == 0,
                       "weights": self.run["fields"]["model_weights"]}  # the copy's weights are the model's
            with self._autocast():
                self.reference = CachedReference.build(reference, self.train_examples, cache_dir, **options)
                self.eval_reference = (CachedReference.build(reference, self.eval_examples, cache_dir, **options)
                                       if self.eval_examples else None)
            del reference
        else:
            self.reference = self.eval_reference = reference
        policy = CausalLM(model, backend=config.backend, backward_buffer_bytes=config.backward_buffer_bytes)
        self.module = self._wrap(PreferenceModel(policy, self.loss_fn))
        self.module.train()
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(
            step, warmup_steps=config.warmup_steps, max_steps=config.max_steps, schedule=config.schedule))
        self.loader = PreferenceLoader(self.train_examples, config.batch_size, pad_token_id=tokenizer.pad_token_id,
                                       packed=config.packed, seed=config.seed, rank=self.rank,
                                       world_size=self.world_size)
        self.step = 0
        self.history: list[dict] = []
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self.elapsed_before = 0.0  # seconds the run trained before this call (from the checkpoint resumed)
        self.call_start: float | None = None
        if self.rank > 0:
            # Every process was seeded alike for the models' construction (FSDP keeps each process's own
            # shard of it); from here each draws its own random numbers (dropout masks), rank 0 as one
            # process does.
            torch.manual_seed(config.seed + self.rank)

    def identity(self, model: nn.Module) -> dict:
        """The settings that give this run's state its meaning (see fdpo.train.rundir.IDENTITY_FIELDS).

        The training data enter as the SHA-256 of their tokens (the path may change, the pairs may
        not), the model as its name, its configuration's entries that differ from their class's
        defaults (`models.model_config`: a rope base, dropout or norm epsilon edited in config.json
        is another function of the same weights), the SHA-256 of its parameter names, shapes and
        dtypes, and the SHA-256 of its initial weights (the reference: a model directory rewritten
        with other weights of the same layout is another run).
        """
        config = self.config
        fields = {name: getattr(config, name) for name in IDENTITY_FIELDS if hasattr(config, name)}
        fields["nll_weight"] = config.resolved_nll_weight()
        fields["max_length"] = self.max_length
        fields["data"] = examples_digest(self.train_examples).hexdigest()
        layout = hashlib.sha256(type(unwrap(model)).__name__.encode())
        for name, tensor in model.state_dict().items():
            layout.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        fields["model_config"] = model_config(model)
        fields["model_layout"] = layout.hexdigest()
        fields["model_weights"] = weights_digest(model)
        return fields

    def elapsed(self) -> float:
        """Wall-clock seconds of the run's calls, those before a resume included, evaluations, sampling and
        checkpoint writes too (the train records' `time`)."""
        now = time.perf_counter() - self.call_start if self.call_start is not None else 0.0
        return self.elapsed_before + now

    def say(self, message: str) -> None:
        """Tell the user something about the run (stderr, first process only); kept in the summary's notes."""
        self.notes.append(message)
        if self.rank == 0:
            print(f"fdpo.train: {message}", file=sys.stderr, flush=True)

    def _on_rank0(self, job):
        """job() on the first process, its result given to every process (a barrier too). What it raises is
        raised there as it is and, on every other process, as the same one-line RunDirectoryError or
        CheckpointError (any other exception: a RuntimeError naming it), so that all stop instead of
        waiting for the first or losing their connection to it."""
        result, error, failure = None, None, None
        if self.rank == 0:
            try:
                result = job()
            except BaseException as caught:  # told to every process, then raised here as it is (cause kept)
                failure = caught
                if isinstance(caught, (RunDirectoryError, CheckpointError)):
                    error = (type(caught).__name__, str(caught))
                else:
                    error = ("RuntimeError", f"the first process failed: {type(caught).__name__}: {first_line(caught)}")
        if self.world_size > 1:
            box = [result, error]
            dist.broadcast_object_list(box, src=0)
            result, error = box
        if failure is not None:
            raise failure
        if error is not None:
            kind, message = error
            raise {"CheckpointError": CheckpointError, "RunDirectoryError": RunDirectoryError}.get(kind, RuntimeError)(
                message)
        return result

    def _every_rank(self, value):
        """[process 0's value, process 1's, ...] on every process (a collective: every process calls it)."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def _all_reduce(self, values: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """`values` reduced over the processes with `op`, on their own device (a collective). NCCL reduces
        CUDA tensors only: a CPU tensor goes through this process's GPU and back."""
        if self.world_size == 1:
            return values
        staged = values.to(self.device) if dist.get_backend() == "nccl" else values
        dist.all_reduce(staged, op=op)
        return staged.to(values.device)

    def _any_rank(self, flag: bool) -> bool:
        """Whether `flag` holds on any process."""
        return bool(self._all_reduce(torch.tensor([float(flag)]), op=dist.ReduceOp.MAX).item())

    def _setup_distributed(self) -> tuple[int, int]:
        if torchrun_worker() and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _device(self) -> torch.device:
        """This process's device: config.device ("cuda" alone: the local rank's GPU), else the local rank's
        GPU, else the CPU. A GPU is made the process's current device: NCCL's object collectives
        (broadcast_object_list, all_gather_object) stage their bytes on the current device, cuda:0 in
        every process until set, and NCCL refuses two processes on one GPU."""
        device = torch.device(self.config.device if self.config.device != "auto" else
                              "cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            if device.index is None:  # "cuda": the local rank's GPU
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return device

    def _load_data(self) -> None:
        config, tokenizer = self.config, self.tokenizer
        lengths = {"max_length": self.max_length, "max_prompt_length": config.max_prompt_length}
        train = config.data or bundled_data("train")
        evaluation = config.eval_data or (bundled_data("eval") if config.data is None else None)
        self.train_examples = load_preference_data(train, tokenizer, **lengths)
        self.eval_examples = load_preference_data(evaluation, tokenizer, split="test", **lengths) if evaluation else []
        for name, examples in (("training", self.train_examples), ("held-out", self.eval_examples)):
            chosen, rejected = (sum(example.truncated[side] for example in examples) for side in (0, 1))
            one_side = sum(example.truncated[0] != example.truncated[1] for example in examples)
            if chosen or rejected:
                self.say(f"{chosen} chosen and {rejected} rejected responses of the {len(examples)} {name} pairs were "
                         f"cut to max_length={self.max_length} tokens (their eos with them), {one_side} pairs on one "
                         "side only: the loss compares a cut answer with a whole one there; raise --max-length or "
                         "shorten the data")
            same = sum(example.chosen == example.rejected for example in examples)
            if same:
                self.say(f"{same} of {len(examples)} {name} pairs have identical chosen and rejected tokens (after "
                         f"truncation to max_length={self.max_length}): they carry no preference; raise "
                         "--max-length or fix the data")
        self._note_repeats()
        self.eval_prompts = []
        if evaluation is not None and config.data is None and config.eval_data is None:
            with open(evaluation, encoding="utf-8") as f:
                self.eval_prompts = [json.loads(line)["prompt"] for line in f][:config.sample_prompts]

    def _note_repeats(self) -> None:
        """Say how many training pairs repeat an earlier one and how many held-out pairs are training pairs
        (the same prompt, chosen and rejected tokens: a PreferenceExample's equality)."""
        seen = set(self.train_examples)
        repeated = len(self.train_examples) - len(seen)
        if repeated:
            self.say(f"{repeated} of {len(self.train_examples)} training pairs repeat an earlier training pair (the "
                     "same tokens): they weigh more than once per epoch")
        shared = sum(example in seen for example in self.eval_examples)
        if shared:
            self.say(f"{shared} of {len(self.eval_examples)} held-out pairs are also training pairs (the same "
                     "tokens): the held-out metrics measure them as seen, not as new pairs")

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
        return self._all_reduce(values) / self.world_size

    def _log(self, record: dict) -> None:
        self.history.append(record)
        self.metrics.append(record)

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; returns its metrics (averaged over ranks)."""
        config = self.config
        totals = torch.zeros(6, dtype=torch.float64, device=self.device)
        for micro in range(config.grad_accum):
            batch = self.loader.next_batch().to(self.device)
            last = micro == config.grad_accum - 1
            with self._no_sync(last):
                with self._autocast():
                    reference = self.reference.loss_inputs(batch)
                    out = self.module(**batch_inputs(batch), **reference)
                finite = self._all_reduce(torch.isfinite(out.loss.detach()).float().reshape(1), op=dist.ReduceOp.MIN)
                if not finite.item():
                    raise TrainingError(f"the loss is not finite ({out.loss.item()}) at step {self.step + 1} "
                                        f"(micro-batch {micro + 1} of {config.grad_accum}); stopped before the "
                                        f"update, no checkpoint written for this step ({self._last_good()})")
                (out.loss / config.grad_accum).backward()
            clamped = out.extras["clamped"].mean() if "clamped" in out.extras else out.loss.new_zeros(())
            # summed on the device: no host read between this micro-batch's backward and the next forward
            totals += torch.stack([t.detach().double() for t in (out.loss, out.accuracy, out.margins.mean(),
                                                                 out.chosen_rewards.mean(),
                                                                 out.rejected_rewards.mean(), clamped)])
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if not torch.isfinite(norm):
            raise TrainingError(f"the gradient norm is not finite ({float(norm)}) at step {self.step + 1}; stopped "
                                f"before the update, no checkpoint written for this step ({self._last_good()})")
        lr = self.optimizer.param_groups[0]["lr"]  # this update's rate: the scheduler's step below sets the next
        self.optimizer.step()
        if self._any_rank(not all_finite(self.params)):
            raise TrainingError(f"the parameters are not finite after the update of step {self.step + 1} (finite "
                                "loss and gradient norm: lower --lr); stopped, no checkpoint written for this step "
                                f"({self._last_good()})")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        means = self._mean_over_ranks(totals / config.grad_accum).tolist()
        metrics = {"step": self.step, "split": "train", "loss": means[0], "accuracy": means[1], "margin": means[2],
                   "chosen_reward": means[3], "rejected_reward": means[4], "grad_norm": float(norm),
                   "lr": lr}
        if config.method != "tdpo":
            metrics["clamped"] = means[5]  # the fraction of pairs where a clamp of the pair loss is active
        controller = getattr(self.loss_fn, "controller", None)
        if controller is not None:
            # beta: the controller's beta that scored this step (the per-pair betas are beta / (1 + eps s));
            # next_beta: what this step's update makes it, for the next step
            metrics["beta"] = controller.beta
            metrics["next_beta"] = controller.update()
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss, reward accuracy, margin, KL to the reference, entropy and calibration on the held-out pairs.

        loss: the training objective (preference loss, plus the NLL term when weighted), mean over pairs.

        kl: mean over chosen responses of the summed per-token KL(reference || policy) with a frozen
        reference; with cached reference sums (no reference model to take a KL with),
        chosen_logratio: the mean of policy - reference log-prob sums of the chosen responses instead
        (the chosen implicit reward over beta, not a KL: these responses are not the policy's samples).
        entropy: the policy's mean per-token entropy (nats) over the chosen responses. The module's
        training mode is restored afterwards.
        """
        training = self.module.training
        self.module.eval()
        loss_sum, margins, logratios = 0.0, [], []
        totals = {"entropy_sum": 0.0, "kl_sum": 0.0, "token_count": 0.0}
        for batch in eval_batches(self.eval_examples, self.config.eval_batch_size,
                                  pad_token_id=self.tokenizer.pad_token_id, packed=self.config.packed):
            batch = batch.to(self.device)
            with self._autocast():
                reference = self.eval_reference.loss_inputs(batch)
                out = self.module(**batch_inputs(batch), statistics=True, **reference)
            for name in totals:
                totals[name] += out.extras[name].item() if name in out.extras else 0.0
            loss_sum += out.loss.item() * batch.num_pairs
            margins.append(out.margins.float().cpu())
            if "ref_logprobs" in reference:
                logratios.append((out.policy_chosen - reference["ref_logprobs"][0]).float().cpu())
        self.module.train(training)
        margins_all = torch.cat(margins)
        metrics = {"step": self.step, "split": "eval", "loss": loss_sum / len(self.eval_examples),
                   "accuracy": (margins_all > 0).sum().item() / margins_all.numel(),
                   "margin": margins_all.mean().item(),
                   "entropy": totals["entropy_sum"] / max(totals["token_count"], 1.0),
                   "ece": expected_calibration_error(margins_all)}
        if logratios:
            metrics["chosen_logratio"] = torch.cat(logratios).mean().item()
        else:
            metrics["kl"] = totals["kl_sum"] / len(self.eval_examples)
        return metrics

    @torch.no_grad()
    def sample_rewards(self) -> float | None:
        """Mean task reward of greedy answers to the held-out prompts (built-in task, one process)."""
        if not self.eval_prompts or self.world_size > 1:
            return None
        model = unwrap(self.hf_model)
        training = model.training
        model.eval()
        rewards = []
        bos = [self.tokenizer.bos_token_id] if adds_bos(self.tokenizer) else []  # as the data's prompts
        for prompt in self.eval_prompts:
            ids = [*bos, *self.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
            output = model.generate(torch.tensor([ids], device=self.device), max_new_tokens=16, do_sample=False,
                                    eos_token_id=self.tokenizer.eos_token_id,
                                    pad_token_id=self.tokenizer.pad_token_id)
            completion = self.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
            rewards.append(task_reward(prompt, completion))
        model.train(training)
        return sum(rewards) / len(rewards)

    def state(self) -> dict:
        """Everything a checkpoint holds (collective under FSDP: every rank must call it).

        Tensors and plain containers only, so that it loads with weights_only=True.
        """
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        controller = getattr(self.loss_fn, "controller", None)
        return {"model": get_model_state_dict(self.module, options=options),
                "optimizer": get_optimizer_state_dict(self.module, self.optimizer, options=options),
                "scheduler": self.scheduler.state_dict(), "rng": self._every_rank(rng_state(self.device)),
                "world_size": self.world_size, "data": self.loader.state_dict(), "step": self.step,
                "controller": controller.state_dict() if controller is not None else None,
                "config": self.config.to_dict(), "run": self.run, "metrics_lines": self.metrics.lines,
                "elapsed": self.elapsed()}

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-NNNNNNN (see fdpo.train.checkpoint) and prune old ones.

        A state holding a non-finite tensor is never written: TrainingError names the step and the tensors.
        """
        state = self.state()
        bad = non_finite_tensors({"model": state["model"], "optimizer": state["optimizer"]}) if self.rank == 0 else []
        if self._any_rank(bool(bad)):
            named = f" ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else ""
            raise TrainingError(f"the state of step {self.step} holds non-finite tensors{named}; its checkpoint is "
                                f"not written ({self._last_good()})")
        root = self.output_dir / "checkpoints"
        path = root / f"step-{self.step:07d}"
        def write() -> None:
            write_run(self.output_dir, self.run)
            write_checkpoint(root, path.name, state, self.config.to_dict())
            prune(root, self.config.keep_checkpoints, written=path)

        self._on_rank0(write)  # every process returns once the checkpoint is on disk, or raises its error
        self.last_checkpoint = path
        return path

    def load_checkpoint(self, path: str | Path) -> dict:
        """Verify, load and restore the checkpoint at `path`; returns its state (see `restore`)."""
        state = load_checkpoint_state(path)
        self.restore(state)
        self.last_checkpoint = Path(path)
        return state

    def restore(self, state: dict) -> None:
        """Restore model, optimizer, scheduler, random states, data position, step, controller and elapsed time.

        The optimizer's moments and step counts come from the state, its hyper-parameters from this
        run's config: a resume with another lr or weight_decay trains with them, and the learning
        rate of the next step follows this config's schedule.
        """
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.module, state["model"], options=options)
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"], options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        config = self.config
        factor = lr_factor(self.scheduler.last_epoch, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                           schedule=config.schedule)
        for group in self.optimizer.param_groups:
            group.update(initial_lr=config.lr, lr=config.lr * factor, weight_decay=config.weight_decay)
        self.scheduler.base_lrs = [config.lr] * len(self.optimizer.param_groups)
        self.loader.load_state_dict(state["data"])
        controller = getattr(self.loss_fn, "controller", None)
        if controller is not None and state["controller"] is not None:
            controller.load_state_dict(state["controller"])
        self.step = state["step"]
        self.elapsed_before = float(state.get("elapsed", 0.0))
        # One random state per process ([rank]); a checkpoint written before they were all kept holds
        # rank 0's alone. A process the checkpoint's run did not have gets a stream of its own, not a
        # copy of another process's.
        states = [state["rng"]] if isinstance(state["rng"], dict) else state["rng"]
        set_rng_state(states[min(self.rank, len(states) - 1)], self.device)
        if self.rank >= len(states):
            torch.manual_seed(config.seed + self.rank + 1_000_003 * self.step)

    def resume(self) -> Path:
        """Continue the run of config.resume ('latest' or a checkpoint directory); returns the checkpoint used.

        'latest' takes the newest checkpoint that passes verification, reporting each newer one that
        does not. A checkpoint given by path, wherever it lies, is refused while checkpoints/ holds
        a newer step (resuming it would mix two histories). The checkpoint's identity settings must
        equal this run's (RunDirectoryError names the fields that differ); other changed settings are
        applied (see `restore`) and reported. metrics.jsonl is cut back to the records written before
        the checkpoint. A damaged run.json does not block the resume of one of the directory's own
        checkpoints: each holds the run's record, which is written to run.json again.
        """
        config, root = self.config, self.output_dir / "checkpoints"
        if config.resume == "latest":
            found = latest_intact(root, self.say)
            if found is None:
                raise RunDirectoryError(f"resume='latest' but {root} holds no intact checkpoint; start a new run "
                                        "with --overwrite or another --output-dir")
            path, state = found
        else:
            path = Path(config.resume)
            state = load_checkpoint_state(path)
            name = f"step-{state['step']:07d}"
            newer = [p.name for p in checkpoint_dirs(root) if checkpoint_step(p) > state["step"]]
            if newer:
                raise RunDirectoryError(f"{root} holds checkpoints newer than {name} ({', '.join(newer)}): "
                                        f"resuming {path} would mix two histories; move the newer ones away, resume "
                                        "'latest', or resume into another --output-dir")
        run = state["run"]
        try:
            owner = read_run(self.output_dir)
        except RunDirectoryError as error:
            if path.resolve().parent != root.resolve():
                raise RunDirectoryError(f"{error}; the checkpoints in {root} are intact: resume one of them "
                                        "(--resume latest), which writes run.json again from its run record, or "
                                        f"resume {path} into another --output-dir") from None
            owner = None  # a checkpoint of this directory: its run record is this directory's run
            self.say(f"{error}; the run's record is read from {path} and run.json written again")
        if owner is not None and owner["run_id"] != run["run_id"]:
            raise RunDirectoryError(f"{path} belongs to run {run['run_id']} but {self.output_dir} holds run "
                                    f"{owner['run_id']}: resume into that run's own --output-dir, or a new one")
        differ = mismatched_fields(run["fields"], self.run["fields"])
        if differ:
            listed = "; ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in differ.items())
            # The data's digest is of its tokens: it also changes with the tokenizer or with fdpo's own
            # tokenization rules, which no setting restores.
            data = (" (the data digest is of the training pairs' tokens: other data files, another tokenizer, or a "
                    "run tokenized by an earlier fdpo, whose tokenization differed, cannot be continued on these "
                    "data)") if "data" in differ else ""
            raise RunDirectoryError(f"cannot resume {path}: settings that define its state differ ({listed}){data}; "
                                    "resume with the checkpoint's settings, or start a new run (--overwrite or a new "
                                    "--output-dir)")
        if state["step"] > config.max_steps:
            raise RunDirectoryError(f"{path} is at step {state['step']}, past --max-steps {config.max_steps}: raise "
                                    "--max-steps to continue it (its final model is in final/ if it finished)")
        current = self.config.to_dict()
        changed = {name: (value, current.get(name)) for name, value in state["config"].items()
                   if name not in NOT_COMPARED and name not in IDENTITY_FIELDS and current.get(name) != value}
        if state.get("world_size", self.world_size) != self.world_size:
            changed["world_size"] = (state["world_size"], self.world_size)
        self.restore(state)
        self.history = self.metrics.restore(state["metrics_lines"])
        if "elapsed" not in state:  # a checkpoint written before it was kept: its last logged time
            self.elapsed_before = max((r["time"] for r in self.history if "time" in r), default=0.0)
        self.run = {**run, "resumes": [*run.get("resumes", []), {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "checkpoint": str(path), "step": self.step,
            "changed": {name: list(pair) for name, pair in changed.items()}}]}
        self.last_checkpoint = self.resumed_from = path
        note = "; ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items())
        self.say(f"resumed {path} at step {self.step}" + (f" with changed settings: {note}" if note else ""))
        return path

    def save_final(self) -> Path:
        """`save_pretrained` of the policy (and tokenizer) into output_dir/final.

        Written into a temporary directory and renamed (fdpo.train.checkpoint.install): a kill while
        writing leaves the previous final model whole, never a mix of two. A write that fails (a full
        disk) removes the temporary directory and raises CheckpointError naming `final`.
        """
        final = self.output_dir / "final"
        temporary = self.output_dir / f"{TEMPORARY_PREFIX}final-{os.getpid()}"
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_model_state_dict(self.module, options=options) if self.world_size > 1 else None
        def write() -> None:
            state_dict = None
            if full is not None:
                prefix = "policy.model."
                state_dict = {k[len(prefix):]: v for k, v in full.items()}
            from safetensors import SafetensorError

            with writing(final, temporary=temporary, errors=(SafetensorError,)):
                if temporary.exists():
                    shutil.rmtree(temporary)
                with progress_bars(sys.stderr.isatty()):
                    self.hf_model.save_pretrained(temporary, state_dict=state_dict)
                self.tokenizer.save_pretrained(temporary)
                install(temporary, final)

        self._on_rank0(write)  # every process returns once the final model is on disk, or raises its error
        return final

    def train(self) -> dict:
        """Run to max_steps (resuming if asked); returns the summary (also printed by the CLI).

        summary["steps"] counts the whole run's steps, summary["steps_this_call"] this call's. The output
        directory's lock is released when it returns or raises.
        """
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict:
        config = self.config
        if config.resume:
            self.resume()
        start_step = self.step
        if self.rank == 0:
            write_run(self.output_dir, self.run)
            with writing(self.output_dir / "config.json"):
                (self.output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        start = self.call_start = time.perf_counter()
        if self.resumed_from is None:
            first_eval = self.evaluate() if self.eval_examples else None
            if first_eval:
                self._log(first_eval)
            first_reward = self._log_samples()
        else:
            first_eval = self._first_record("eval")
            first_reward = (self._first_record("samples") or {}).get("task_reward")
        first_train = self._first_record("train")
        progress = Progress(config.max_steps, self.step, every=config.log_every,
                            enabled=config.progress and self.rank == 0)
        last_eval = self._last_record("eval") or first_eval
        while self.step < config.max_steps:
            metrics = self.train_step()
            first_train = first_train or metrics
            progress.update(self.step, metrics)
            if self.step % config.log_every == 0 or self.step in (1, config.max_steps):
                self._log({**metrics, "time": self.elapsed()})
            if self.eval_examples and config.eval_every and self.step % config.eval_every == 0 \
                    and self.step < config.max_steps:
                last_eval = self.evaluate()
                self._log(last_eval)
            if config.save_every and self.step % config.save_every == 0 and self.step < config.max_steps:
                self.save_checkpoint()
        progress.close()
        if self.eval_examples and (last_eval is None or last_eval["step"] != self.step):
            last_eval = self.evaluate()
            self._log(last_eval)
        # the final samples before the final checkpoint, so that its metrics_lines keep them when a
        # run resumes from it (with a higher --max-steps); a finished run resumed as it is has them
        last_samples = self._last_record("samples")
        if last_samples is not None and last_samples["step"] == self.step:
            reward = last_samples["task_reward"]
        else:
            reward = self._log_samples()
        checkpoint = self.save_checkpoint()
        final = self.save_final()
        last_train = self._last_record("train")
        summary = {"steps": self.step, "steps_this_call": self.step - start_step,
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "seconds": time.perf_counter() - start, "output_dir": str(self.output_dir),
                   "checkpoint": str(checkpoint), "model": str(final), "first_train": first_train,
                   "last_train": last_train, "first_eval": first_eval, "last_eval": last_eval, "notes": self.notes}
        if reward is not None:
            summary["task_reward"] = (first_reward, reward)
        return summary

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint written yet"
        return f"last good checkpoint: {self.last_checkpoint}"

    def _first_record(self, split: str) -> dict | None:
        return next((r for r in self.history if r["split"] == split), None)

    def _last_record(self, split: str) -> dict | None:
        return next((r for r in reversed(self.history) if r["split"] == split), None)

    def _log_samples(self) -> float | None:
        reward = self.sample_rewards()
        if reward is not None:
            self._log({"step": self.step, "split": "samples", "task_reward": reward, "prompts": len(self.eval_prompts)})
        return reward
