"""One process of tests/test_trl_fsdp.py: TRL's fused head (fdpo's `add_fused_lm_head`) under FSDP2.

Run by `torchrun --nproc-per-node 2 tests/trl_fsdp_worker.py OUT` (CPU, gloo). For each layout in
`LAYOUTS` every process builds `tiny_llama()`, patches it with fdpo's `add_fused_lm_head` (backend
"torch"), applies `fully_shard` to the decoder layers, in the layout "head" to the LM head too, and
to the root, runs one fused forward on its rows of `batch()` (`RANK_ROWS`) and backward of the
loss the forward returns. Rank 0 saves with `torch.save` to OUT, per layout: every process's
`log_probs`, the full gradients (`full_tensor()`) of the LM head and of the token embeddings, and
per process the calls of fdpo's fused backend and whether the head weight fdpo read was a DTensor.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

import fdpo.integrations.trl as fdpo_trl
from fdpo.backends.fused import FusedBackend
from fdpo.integrations.trl import head as head_module
from fdpo.train.cli import exit_without_finalization

VOCAB = 259
# "root": the LM head in the root's FSDP group (as fdpo.train does), all-gathered by the root's
# forward hook before fdpo reads it. "head": the LM head in its own group, whose forward never runs
# (fdpo reads its weight, not its output), so fdpo reads the sharded DTensor and gathers it itself.
LAYOUTS = ("root", "head")
# The rows of `batch()` each of the 2 processes trains on: the two halves of the batch in both
# layouts, so that each process's gradient differs and only their average over the processes
# (FSDP's reduction, and the one fdpo's gather of a DTensor head gives its backward) is right.
RANK_ROWS = {"root": (slice(0, 2), slice(2, 4)), "head": (slice(0, 2), slice(2, 4))}


def tiny_llama() -> LlamaForCausalLM:
    """The tiny random float32 Llama of the TRL tests (hidden 32, 2 layers), the same on every process."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, pad_token_id=256, bos_token_id=257, eos_token_id=258))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [4, 8] and labels with -100 on each row's first 3 tokens (a prompt) and on row 1's last 2."""
    input_ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[:, :3] = -100
    labels[1, -2:] = -100
    return input_ids, labels


def run(layout: str, rank: int) -> dict:
    """This layout's fused forward and backward on this process's rows; the gathered results."""
    model = tiny_llama()
    fdpo_trl.add_fused_lm_head(model, backend="torch")
    for layer in model.model.layers:
        fully_shard(layer)
    if layout == "head":
        fully_shard(model.lm_head)
    fully_shard(model)
    assert isinstance(model.lm_head.weight, DTensor)
    seen = {"calls": 0, "dtensor": []}
    head_call, head_stats = head_module.head_call, FusedBackend.head_stats

    def recorded_head_call(model, *args, **kwargs):
        seen["dtensor"].append(isinstance(model.get_output_embeddings().weight, DTensor))
        return head_call(model, *args, **kwargs)

    def counted_head_stats(*args, **kwargs):
        seen["calls"] += 1
        return head_stats(*args, **kwargs)

    head_module.head_call, FusedBackend.head_stats = recorded_head_call, counted_head_stats
    try:
        input_ids, labels = batch()
        rows = RANK_ROWS[layout][rank]
        out = model(input_ids[rows], labels=labels[rows], fused_lm_head=True)
        out.loss.backward()
    finally:
        head_module.head_call, FusedBackend.head_stats = head_call, head_stats
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"log_probs": out.log_probs.detach(), **seen})
    return {"per_rank": per_rank, "lm_head": model.lm_head.weight.grad.full_tensor(),
            "embed_tokens": model.model.embed_tokens.weight.grad.full_tensor()}


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = {layout: run(layout, dist.get_rank()) for layout in LAYOUTS}
        if dist.get_rank() == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_without_finalization(0)
