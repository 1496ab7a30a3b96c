"""TRL's DPOTrainer on fdpo's kernels: a tiny random-weight Llama learns the bundled sort task on CPU.

    python examples/trl_dpo.py                              # DPO (TRL's sigmoid loss) on fdpo's fused head
    python examples/trl_dpo.py --loss-type tdpo             # fdpo's loss types: bpo, tdpo, epsilon_dpo
    python examples/trl_dpo.py --f-divergence js_divergence --loss-type bpo

It prints the held-out preference loss and reward accuracy before and after training (a few
seconds per 10 steps on 2 CPU cores). With a real model, the two lines of interest are the same:
`fdpo_trl.DPOConfig(...)` and `fdpo_trl.DPOTrainer(model=..., args=..., ...)`; or, with TRL's own
classes, `fdpo_trl.install()` before building the trainer.
"""

import argparse
import itertools
import json
import tempfile

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

import fdpo.integrations.trl as fdpo_trl
from fdpo.train.tasks import bundled_data
from fdpo.train.tokenizer import VOCAB_SIZE, byte_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss-type", default="sigmoid",
                        help="TRL's loss types (sigmoid, ipo, hinge, ...) or fdpo's: bpo, tdpo, epsilon_dpo")
    parser.add_argument("--f-divergence", default="reverse_kl",
                        choices=["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=256, help="training pairs read from the bundled task")
    parser.add_argument("--backend", default="auto", help="fdpo's backend: auto, triton, torch or reference")
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    return parser.parse_args(argv)


def read_pairs(split: str, count: int) -> Dataset:
    """The first `count` {"prompt", "chosen", "rejected"} records of the bundled sort task."""
    with open(bundled_data(split), encoding="utf-8") as lines:
        records = [json.loads(line) for line in itertools.islice(lines, count)]
    return Dataset.from_list(records)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, pad_token_id=256, bos_token_id=257, eos_token_id=258))


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and return the held-out metrics before ("before/...") and after ("after/...") training."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="fdpo-trl-dpo-")
    config = fdpo_trl.DPOConfig(
        output_dir=output_dir, loss_type=args.loss_type, f_divergence_type=args.f_divergence, beta=0.1,
        fdpo_backend=args.backend, per_device_train_batch_size=16, per_device_eval_batch_size=32,
        max_steps=args.max_steps, learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=10,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
    trainer = fdpo_trl.DPOTrainer(model=tiny_llama(), ref_model=tiny_llama(), args=config,
                                  train_dataset=read_pairs("train", args.pairs),
                                  eval_dataset=read_pairs("eval", 64), processing_class=byte_tokenizer())
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    summary = {f"{when}/{name}": metrics[f"eval_{name}"] for when, metrics in (("before", before), ("after", after))
               for name in ("loss", "rewards/accuracies")}
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
