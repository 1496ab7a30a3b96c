"""TRL's fused head on fdpo (`fdpo.integrations.trl.add_fused_lm_head`) under FSDP2 in 2 processes.

`tests/trl_fsdp_worker.py` runs under `torchrun --nproc-per-node 2` on CPU with gloo: the tiny
Llama with `fully_shard` on its decoder layers and root, its LM head sharded across the 2
processes, either in the root's FSDP group (the root's forward gathers it) or in its own group
(fdpo gathers the DTensor, `fdpo.integrations.trl.fsdp.full_parameter`, whose backward
reduce-scatters the head's gradient averaged over the processes as FSDP does for the parameters it
gathers). Each process runs one fused forward (backend "torch") on its half of the batch
(`RANK_ROWS`) and backward of the returned loss; FSDP averages the other gradients over the
processes. This module computes the same from the same weights in one process without FSDP or
fdpo: float64 logits materialized, log_softmax at the labels, the loss of each process's rows
averaged over the processes, and its autograd gradients. Compared: every process's per-token
log-probs and the full gradients of the LM head and of the token embeddings (relative to the
largest element: measured up to 9e-8 for the log-probs and 5e-7 for the gradients; tolerance
1e-5). The workers also report that fdpo's fused backend ran in every process and whether the
head weight it read was a DTensor, so that the comparison cannot pass on another code path.
"""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("trl")

from trl_fsdp_worker import LAYOUTS, RANK_ROWS, batch, tiny_llama

TOLERANCE = 1e-5
WORKER = Path(__file__).with_name("trl_fsdp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> dict:
    """The worker's results per layout (see `trl_fsdp_worker`)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("trl_fsdp") / "results.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(WORKER), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"the workers failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return torch.load(out)


def reference(layout: str) -> dict:
    """Per-process log-probs [rows, 7] and the gradients of the mean over processes of their losses, in float64."""
    model = tiny_llama().double()
    input_ids, labels = batch()
    log_probs, losses = [], []
    for rows in RANK_ROWS[layout]:
        logits = model(input_ids[rows]).logits[:, :-1]
        targets = labels[rows][:, 1:]
        mask = targets != -100
        scored = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
        log_probs.append(scored.detach())
        losses.append(-scored.sum() / mask.sum())
    torch.stack(losses).mean().backward()
    return {"log_probs": log_probs, "lm_head": model.lm_head.weight.grad,
            "embed_tokens": model.model.embed_tokens.weight.grad}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsdp2_fused_head_matches_float64(workers, layout):
    got, want = workers[layout], reference(layout)
    assert [r["calls"] for r in got["per_rank"]] == [1, 1]
    assert [r["dtensor"] for r in got["per_rank"]] == [[layout == "head"]] * 2
    for rank, (mine, log_probs) in enumerate(zip(got["per_rank"], want["log_probs"], strict=True)):
        assert mine["log_probs"].dtype == torch.float32 and mine["log_probs"].shape == log_probs.shape
        assert relative_error(mine["log_probs"], log_probs) < TOLERANCE, (layout, rank)
    for name in ("lm_head", "embed_tokens"):
        assert relative_error(got[name], want[name]) < TOLERANCE, (layout, name)
