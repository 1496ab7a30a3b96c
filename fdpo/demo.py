"""Fused vs naive label log-probs on this machine: `python -m fdpo.demo`.

Computes per-token log-probs and their gradients for random hidden states and LM head, once with
the fused backend (no [tokens x vocabulary] logits) and once with naive PyTorch, checks that they
agree and prints time and peak memory of each.
"""

import argparse
import time

import torch

from . import token_logprobs
from .profiling import AllocationTracker


def run(backend: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    hidden.grad = weight.grad = None
    start = time.perf_counter()
    with AllocationTracker() as tracker:
        logprobs = token_logprobs(hidden, weight, labels, backend=backend)
        logprobs.sum().backward()
    return time.perf_counter() - start, tracker.stats, logprobs.detach(), hidden.grad, weight.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--backend", default="auto", help="fused backend to compare: auto | torch | triton")
    args = parser.parse_args()
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden) / args.hidden**0.5).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,))
    labels[::7] = -100
    print(f"N={args.tokens} tokens, V={args.vocab}, D={args.hidden}, float32, {torch.get_num_threads()} threads")
    results = {name: run(name, hidden, weight, labels) for name in (args.backend, "reference")}
    fused, naive = results[args.backend], results["reference"]
    for got, want, what in zip(fused[2:], naive[2:], ("log-probs", "dHidden", "dWeight"), strict=True):
        err = (got - want).abs().max().item()
        print(f"max |fused - naive| {what:9}: {err:.2e}")
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
            raise SystemExit(f"fused and naive {what} disagree")
    for name, (seconds, stats, *_) in results.items():
        print(f"{name:9} forward+backward {seconds:6.2f} s   peak {stats.peak_bytes / 2**20:8.1f} MiB   "
              f"largest tensor {stats.largest_numel:>11,} elements {stats.largest_shape}")
    print(f"logits would be {args.tokens * args.vocab:,} elements; the fused backend used "
          f"{naive[1].peak_bytes / max(fused[1].peak_bytes, 1):.1f}x less memory")


if __name__ == "__main__":
    main()
