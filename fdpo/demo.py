"""Fused vs naive on this machine: `python -m fdpo.demo [--workload logprobs|tdpo]`.

logprobs: per-token label log-probs and their gradients for random hidden states and LM head.
tdpo: the TDPO loss of random policy/reference hidden states (policy and reference heads, per-token
KL), forward and backward. Each runs once with the fused backend (no [tokens x vocabulary] logits)
and once with naive PyTorch; the demo checks that they agree and prints the time and the peak
memory of the tensors each created (fdpo.profiling.AllocationTracker).
"""

import argparse
import os
import time

import torch

from . import TDPOLoss, token_logprobs
from .profiling import AllocationTracker


def logprobs_step(backend: str, inputs: dict) -> list[torch.Tensor]:
    """token_logprobs forward + backward; returns (log-probs, dHidden, dWeight)."""
    logprobs = token_logprobs(inputs["hidden"], inputs["weight"], inputs["labels"], backend=backend)
    logprobs.sum().backward()
    return [logprobs.detach(), inputs["hidden"].grad, inputs["weight"].grad]


def tdpo_step(backend: str, inputs: dict) -> list[torch.Tensor]:
    """TDPO loss forward + backward; returns (loss, chosen KL sums, dHidden, dWeight)."""
    hidden, weight, labels = inputs["hidden"], inputs["weight"], inputs["labels"]
    out = TDPOLoss(backend=backend)(hidden.view(-1, inputs["seq"], hidden.shape[-1]), labels.view(-1, inputs["seq"]),
                                    weight, ref_hidden=inputs["ref_hidden"].view(-1, inputs["seq"], hidden.shape[-1]),
                                    ref_head=inputs["ref_weight"])
    out.loss.backward()
    return [out.loss.detach(), out.extras["kl_chosen"], hidden.grad, weight.grad]


WORKLOADS = {"logprobs": (logprobs_step, ("log-probs", "dHidden", "dWeight")),
             "tdpo": (tdpo_step, ("loss", "chosen KL", "dHidden", "dWeight"))}


def run(step, backend: str, inputs: dict):
    inputs["hidden"].grad = inputs["weight"].grad = None
    start = time.perf_counter()
    with AllocationTracker() as tracker:
        results = step(backend, inputs)
    return time.perf_counter() - start, tracker.stats, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="logprobs")
    parser.add_argument("--tokens", type=int, default=2048, help="N, tokens (tdpo: 8 sequences of N/8)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--backend", default="auto", help="fused backend to compare: auto | torch | triton")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, vocab, dim = args.tokens, args.vocab, args.hidden
    inputs = dict(hidden=torch.randn(n, dim, requires_grad=True),
                  weight=(torch.randn(vocab, dim) / dim**0.5).requires_grad_(),
                  labels=torch.randint(0, vocab, (n,)), seq=max(1, n // 8))
    inputs["labels"][::7] = -100
    inputs["ref_hidden"] = inputs["hidden"].detach() + 0.1 * torch.randn(n, dim)
    inputs["ref_weight"] = inputs["weight"].detach() + 0.01 * torch.randn(vocab, dim)
    if args.workload == "tdpo" and n % 16:
        raise SystemExit("--tokens must be a multiple of 16 for tdpo (8 sequences, chosen then rejected)")
    step, names = WORKLOADS[args.workload]
    print(f"{args.workload}: N={n} tokens, V={vocab}, D={dim}, float32, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    results = {name: run(step, name, inputs) for name in (args.backend, "reference")}
    fused, naive = results[args.backend], results["reference"]
    for got, want, what in zip(fused[2], naive[2], names, strict=True):
        err = (got - want).abs().max().item()
        print(f"max |fused - naive| {what:9}: {err:.2e}")
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise SystemExit(f"fused and naive {what} disagree")
    for name, (seconds, stats, _) in results.items():
        print(f"{name:9} forward+backward {seconds:6.2f} s   peak {stats.peak_bytes / 2**20:8.1f} MiB   "
              f"largest tensor {stats.largest_numel:>11,} elements {stats.largest_shape}")
    print(f"logits would be {n * vocab:,} elements; the fused backend used "
          f"{naive[1].peak_bytes / max(fused[1].peak_bytes, 1):.1f}x less memory")


if __name__ == "__main__":
    main()
