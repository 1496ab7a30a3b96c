"""Offline stand-ins for real tokenizers, trained in a second on the bundled sort task plus some English:
a GPT-2-style byte-level BPE (GPT2Tokenizer: no bos added, no pad token) and a Llama-2-style one
(LlamaTokenizer: Metaspace pre-tokenizer marking word starts with "▁", byte fallback, bos added)."""

import functools
import json
import warnings

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Tokenizer, LlamaTokenizer

from fdpo.train.tasks import bundled_data

ENGLISH = ("The quick brown fox jumps over the lazy dog. Question: What is the capital of France? Answer: Paris. "
           "User: hello there, how are you? Assistant: I am fine, thank you. The answer is yes. The answer is no. "
           "Hello world! hello, world. Sure! Here is the answer: 42. 2+2=4. ") * 50

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama-3's layout: the template writes the bos text itself and closes each turn with <|eot_id|>.
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
          "<|end_header_id|>\n\n{% endif %}")


def corpus() -> list[str]:
    lines = []
    for split in ("train", "eval"):
        with open(bundled_data(split), encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                lines += [record["prompt"] + record["chosen"], record["prompt"] + record["rejected"]]
    return [*lines, ENGLISH]


def _vocab_and_merges(backend: Tokenizer):
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


@functools.cache
def _gpt2_parts():
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _vocab_and_merges(backend)


@functools.cache
def _llama_parts():
    backend = Tokenizer(models.BPE(byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)])
    special = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    backend.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=900, special_tokens=special))
    return _vocab_and_merges(backend)


def gpt2_like() -> GPT2Tokenizer:
    """A fresh GPT-2-style tokenizer (bos = eos = "<|endoftext|>", never added; no pad token)."""
    vocab, merges = _gpt2_parts()
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def llama_like() -> LlamaTokenizer:
    """A fresh Llama-2-style tokenizer ("<s>" added before every text, eos "</s>")."""
    vocab, merges = _llama_parts()
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def trl_tokenized(tokenizer, rows: list[dict], output_dir) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) ids of the rows as TRL's DPOTrainer tokenizes them."""
    import types

    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    with warnings.catch_warnings():  # transformers' deprecation notes on TrainingArguments
        warnings.simplefilter("ignore", FutureWarning)
        args = DPOConfig(output_dir=str(output_dir), max_length=None, dataset_num_proc=None, use_cpu=True, bf16=False,
                         report_to="none")
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    dataset = DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, args, "pairs")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in dataset]
