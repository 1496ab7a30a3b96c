"""The trainer's settings: one dataclass, filled from defaults, a JSON/YAML file, then flags.

`parse_args(argv)` reads `--config FILE` (keys are the field names, dashes or underscores) and
the flags; a flag given on the command line wins over the file, the file over the defaults.
"""

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..divergences import TOKEN_DIVERGENCES

METHODS = ("dpo", "tdpo", "epsilon_dpo")
SCHEDULES = ("cosine", "linear", "constant")
REFERENCES = ("copy", "cache")
ENGINES = ("ddp", "fsdp")
BUILTIN_MODEL = "tiny-llama"
BUILTIN_MAX_LENGTH = 64  # the sort task's pairs fit in 40 tokens
UNSET_MODEL_MAX_LENGTH = 10**9  # transformers' model_max_length when a tokenizer sets none is 1e30


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything a run needs; the defaults are the built-in run (tiny Llama on the sort task)."""

    model: str = _opt(BUILTIN_MODEL, f"'{BUILTIN_MODEL}' (random weights, byte tokenizer) or a transformers "
                      "model name or directory for AutoModelForCausalLM")
    tokenizer: str | None = _opt(None, "tokenizer name or directory (default: the model's)")
    data: str | None = _opt(None, "training pairs: a .jsonl file, a `datasets` name, a `save_to_disk` directory, "
                            "or a directory whose data files are named by split (default: the bundled sort task)")
    eval_data: str | None = _opt(None, "held-out pairs, same formats (default: the bundled task's eval split when "
                                 "--data is not given, else none)")
    output_dir: str | None = _opt(None, "where metrics.jsonl, checkpoints and the final model go "
                                  "(default: runs/<timestamp>)")
    max_steps: int = _opt(300, "optimizer steps")
    batch_size: int = _opt(16, "pairs per micro-batch, over all processes")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_steps: int = _opt(20, "linear warmup steps")
    schedule: str = _opt("cosine", "learning-rate decay after warmup", choices=SCHEDULES)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: none)")
    max_length: int | None = _opt(None, "most tokens of prompt + response; longer responses are cut at the end, "
                                  "which the run counts (default: 64 for the built-in model, else the model's context: "
                                  "its config's max_position_embeddings, or the tokenizer's model_max_length when the "
                                  "config has none)")
    max_prompt_length: int | None = _opt(None, "prompts longer than this keep their last tokens")
    packed: bool = _opt(False, "pack the sequences of a batch back to back instead of padding")
    method: str = _opt("dpo", "dpo: the f-DPO family (fdpo.PreferenceLoss); tdpo; epsilon_dpo", choices=METHODS)
    divergence: str = _opt("reverse_kl", "reverse_kl | forward_kl | js | alpha")
    alpha: float = _opt(0.5, "alpha of the alpha divergence, or TDPO2's alpha")
    beta: float = _opt(0.1, "beta of the loss (epsilon-DPO's initial beta)")
    loss: str = _opt("sigmoid", "loss shape: sigmoid | robust | hinge | ipo | bpo")
    label_smoothing: float = _opt(0.0, "label smoothing of the sigmoid and robust shapes")
    nll_weight: float | None = _opt(None, "weight of an RPO-style NLL term on the chosen responses (dpo, "
                                    "epsilon_dpo; default: 1 for the built-in model, whose random weights must learn "
                                    "to write answers, which the preference loss alone does not teach; else 0)")
    epsilon: float = _opt(0.01, "epsilon-DPO's step size of beta")
    tdpo_variant: str = _opt("tdpo2", "tdpo1 | tdpo2")
    token_divergence: str = _opt("forward_kl", "TDPO's per-token divergence summed into its KL term; forward_kl = "
                                 "KL(reference || policy) is the paper's, the others extend it",
                                 choices=TOKEN_DIVERGENCES)
    token_alpha: float = _opt(0.5, "alpha of TDPO's token divergence 'alpha'")
    token_beta: float = _opt(0.5, "mixing weight of TDPO's token divergence 'js'")
    reference: str = _opt("copy", "copy: a frozen copy of the policy; cache: its log-prob sums, computed once "
                          "and stored (dpo only)", choices=REFERENCES)
    cache_dir: str | None = _opt(None, "where cached reference log-probs go (default: <output-dir>/reference_cache)")
    eval_every: int = _opt(50, "evaluate every this many steps (0: only at the start and the end)")
    eval_batch_size: int = _opt(64, "pairs per evaluation batch")
    log_every: int = _opt(10, "append training metrics every this many steps")
    save_every: int = _opt(100, "checkpoint every this many steps (0: only at the end)")
    keep_checkpoints: int = _opt(2, "checkpoints kept (older ones are deleted)")
    resume: str | None = _opt(None, "a checkpoint directory, or 'latest' in --output-dir; the settings that define "
                              "the state (method, loss, model, data, beta, ...) must match the checkpoint's")
    overwrite: bool = _opt(False, "clear --output-dir's checkpoints, metrics and final model first (a new run "
                           "refuses a directory holding another run's)")
    seed: int = _opt(0, "seed of the model init, the data order and everything random")
    bf16: bool = _opt(True, "bf16 autocast of the policy's and the reference's compute (on GPU only); the weights "
                      "and AdamW's moments stay float32 (a model stored in bf16 or fp16 is loaded in float32)")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward to save memory")
    backend: str = _opt("auto", "fused backend: auto | triton | torch | reference")
    backward_buffer_bytes: int | None = _opt(
        None, "triton backend: the most bytes of the split LM-head backward's scratch buffer (dz of a chunk of "
        "tokens over the vocabulary; 0: the fused backward, no scratch; default: 1 GiB, used where the cost model "
        "predicts the split backward faster on a GPU it knows: at V = 128k in bf16 it holds 4096 tokens, enough for "
        "tensor-core-efficient GEMMs, and is small next to the model). Does not change the math")
    engine: str = _opt("ddp", "data-parallel engine under torchrun: ddp or fsdp (FSDP2 fully_shard)", choices=ENGINES)
    device: str = _opt("auto", "auto (cuda if available), cpu, cuda, ...")
    sample_prompts: int = _opt(32, "held-out prompts to answer greedily and score with the task's rule at the end "
                               "(built-in task only; 0: none)")
    progress: bool = _opt(True, "show a progress bar")
    threads: int | None = _opt(None, "torch CPU threads (default: 1 for the built-in model, which is too small to gain "
                               "from more and slows down when idle threads spin on a busy machine; else torch's)")

    def validate(self) -> None:
        """Raise ValueError naming the first setting outside its allowed values.

        Every setting is checked here, before the trainer touches the output directory: a run that
        cannot start never clears the run it would overwrite.
        """
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
            if f.type in (bool, "bool") and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be true or false (a JSON / YAML boolean, not a string or a number), "
                                 f"got {getattr(self, f.name)!r}")
        positive = ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "log_every", "keep_checkpoints")
        if self.max_length is not None and not (_integer(self.max_length) and self.max_length >= 2):
            raise ValueError(f"max_length must be None or an integer >= 2, got {self.max_length!r}")
        for name in positive:
            value = getattr(self, name)
            if not (_integer(value) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads >= 1):
            raise ValueError(f"threads must be None or an integer >= 1, got {self.threads!r}")
        budget = self.backward_buffer_bytes
        if budget is not None and not (_integer(budget) and budget >= 0):
            raise ValueError(f"backward_buffer_bytes must be None or an integer >= 0 (bytes), got {budget!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "sample_prompts"):
            value = getattr(self, name)
            if not (_integer(value) and value >= 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        prompt = self.max_prompt_length
        if prompt is not None and not (_integer(prompt) and prompt >= 1):
            raise ValueError(f"max_prompt_length must be None or an integer >= 1, got {prompt!r}")
        if not (_integer(self.seed) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        for name in ("lr", "beta"):
            value = getattr(self, name)
            if not (_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name, meaning in (("max_grad_norm", " (0: no clipping)"), ("weight_decay", "")):
            value = getattr(self, name)
            if not (_number(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0{meaning}, got {value!r}")
        if self.nll_weight is not None and not (_number(self.nll_weight) and math.isfinite(self.nll_weight)
                                                 and self.nll_weight >= 0):
            raise ValueError(f"nll_weight must be None or a finite number >= 0, got {self.nll_weight!r}")
        if not (_number(self.label_smoothing) and 0 <= self.label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must be a number in [0, 0.5), got {self.label_smoothing!r}")
        if self.method == "tdpo":
            if not (_number(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0):
                raise ValueError(f"alpha must be a finite number > 0 (TDPO's KL weight), got {self.alpha!r}")
        elif not (_number(self.alpha) and 0 < self.alpha < 1):
            raise ValueError(f"alpha must be a number in the open interval (0, 1) (the alpha divergence's), got "
                             f"{self.alpha!r}")
        if not (_number(self.epsilon) and 0 < self.epsilon < 1):
            raise ValueError(f"epsilon must be a number in the open interval (0, 1) (epsilon-DPO's step of beta), "
                             f"got {self.epsilon!r}")
        for name in ("token_alpha", "token_beta"):
            value = getattr(self, name)
            if not (_number(value) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.reference == "cache" and self.method != "dpo":
            raise ValueError(f"reference='cache' stores per-sequence sums, which method={self.method!r} cannot use "
                             "(it needs the reference's full distributions): use reference='copy'")
        self._validate_device()
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: overwrite clears the run that resume continues")
        for name, reason in self.ignored_settings().items():
            raise ValueError(f"{name}={getattr(self, name)!r} has no effect here: {reason}; leave it at its default "
                             f"({DEFAULTS[name]!r})")

    def _validate_device(self) -> None:
        """Raise ValueError unless device is 'auto' or a torch device this machine has."""
        if self.device == "auto":
            return
        try:
            device = torch.device(self.device) if isinstance(self.device, str) else None
        except RuntimeError:
            device = None
        if device is None:
            raise ValueError(f"device must be 'auto' or a torch device such as 'cpu', 'cuda' or 'cuda:1', got "
                             f"{self.device!r}")
        if device.type == "cpu":
            return
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device={self.device!r} but CUDA is not available here (torch "
                                 f"{torch.__version__}): use device 'cpu' or 'auto'")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"device={self.device!r} but this machine has {torch.cuda.device_count()} CUDA "
                                 "device(s)")
            return
        backend = getattr(torch, device.type, None)
        if not (hasattr(backend, "is_available") and backend.is_available()):
            raise ValueError(f"device={self.device!r} is not available here: use device 'cpu' or 'auto'")

    def ignored_settings(self) -> dict[str, str]:
        """{setting: why} of the settings changed from their defaults that this configuration would not use."""
        ignored = {}
        if self.method != "tdpo" and self.tdpo_variant != DEFAULTS["tdpo_variant"]:
            ignored["tdpo_variant"] = "it applies to method 'tdpo' only"
        for name in ("token_divergence", "token_alpha", "token_beta"):
            if self.method != "tdpo" and getattr(self, name) != DEFAULTS[name]:
                ignored[name] = "it applies to method 'tdpo' only"
        if self.method == "tdpo" and self.token_divergence != "alpha" and self.token_alpha != DEFAULTS["token_alpha"]:
            ignored["token_alpha"] = "it applies to token divergence 'alpha'"
        if self.method == "tdpo" and self.token_divergence != "js" and self.token_beta != DEFAULTS["token_beta"]:
            ignored["token_beta"] = "it applies to token divergence 'js'"
        if self.method != "epsilon_dpo" and self.epsilon != DEFAULTS["epsilon"]:
            ignored["epsilon"] = "it applies to method 'epsilon_dpo' only"
        if self.method == "tdpo":
            if self.loss != DEFAULTS["loss"]:
                ignored["loss"] = "TDPO has its own loss; loss shapes apply to methods 'dpo' and 'epsilon_dpo'"
            if self.divergence != DEFAULTS["divergence"]:
                ignored["divergence"] = "TDPO is defined for the reverse-KL reward only"
            if self.nll_weight:
                ignored["nll_weight"] = "the NLL term applies to methods 'dpo' and 'epsilon_dpo'"
            if self.tdpo_variant == "tdpo1" and self.alpha != DEFAULTS["alpha"]:
                ignored["alpha"] = "TDPO1 weighs its KL term by 1; alpha applies to tdpo_variant 'tdpo2'"
        elif self.divergence != "alpha" and self.alpha != DEFAULTS["alpha"]:
            ignored["alpha"] = "it applies to divergence 'alpha' (and method 'tdpo' with tdpo_variant 'tdpo2')"
        if self.label_smoothing != DEFAULTS["label_smoothing"] and (self.method == "tdpo"
                                                                     or self.loss not in ("sigmoid", "robust")):
            ignored["label_smoothing"] = "it applies to the 'sigmoid' and 'robust' losses of 'dpo' and 'epsilon_dpo'"
        if self.cache_dir is not None and self.reference != "cache":
            ignored["cache_dir"] = "it applies to reference='cache' only"
        return ignored

    def resolved_nll_weight(self) -> float:
        """nll_weight, or its default: 1 for the built-in model with a sequence-level method, else 0."""
        if self.nll_weight is not None:
            return self.nll_weight
        return 1.0 if self.model == BUILTIN_MODEL and self.method != "tdpo" else 0.0

    def resolved_max_length(self, model=None, tokenizer=None) -> int:
        """max_length, or its default: 64 for the built-in model; else the model's context, its (text)
        config's max_position_embeddings, or the tokenizer's model_max_length where the config has none
        (a ValueError asking for max_length when neither tells it)."""
        if self.max_length is not None:
            return self.max_length
        if self.model == BUILTIN_MODEL:
            return BUILTIN_MAX_LENGTH
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        positions = getattr(text, "max_position_embeddings", None)
        if _integer(positions) and positions >= 2:
            return positions
        limit = getattr(tokenizer, "model_max_length", None)
        if _integer(limit) and 2 <= limit < UNSET_MODEL_MAX_LENGTH:
            return limit
        raise ValueError("max_length: neither the model's config (max_position_embeddings) nor the tokenizer "
                         "(model_max_length) gives the model's context; set max_length")

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def _integer(value) -> bool:
    """Whether value is an int (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    """Whether value is an int or a float (a bool is not); NaN compares false with every bound."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_config_file(path: str | Path) -> dict:
    """The settings in a JSON or YAML file (a mapping of field names to values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text)
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); YAML files need a "
                             ".yaml or .yml suffix") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config file holds a mapping of settings, got {type(values).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    settings = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"{path}: unknown setting {key!r}; known settings: {', '.join(sorted(known))}")
        settings[name] = value
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fdpo.train",
        description="Preference fine-tuning through the fused LM head. With no arguments: a tiny random-weight "
                    "Llama learns the bundled sort task on CPU.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False)
    parser.add_argument("--config", help="JSON or YAML file of settings (flags override it)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata["help"]
        if "default:" not in help:
            help = f"{help} (default: {f.default})"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
            continue
        kind = {int: int, float: float, int | None: int, float | None: float}.get(f.type, str)
        parser.add_argument(flag, type=kind, help=help, **({"choices": f.metadata["choices"]}
                                                            if "choices" in f.metadata else {}))
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The config from the defaults, then `--config FILE`, then the flags given."""
    namespace = vars(build_parser().parse_args(argv))
    settings = read_config_file(namespace.pop("config")) if "config" in namespace else {}
    settings.update(namespace)
    config = TrainConfig(**settings)
    config.validate()
    return config
