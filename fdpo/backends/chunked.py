"""The `torch` backend: the kernels' algorithm in plain PyTorch, chunked over tokens and vocabulary.

Same contract as `fdpo.kernels.logprob_forward` / `logprob_backward`: an online log-sum-exp over
vocabulary chunks in the forward, and a backward that recomputes each logit chunk from the saved
LSE. Peak memory is O(chunk_rows x chunk_vocab), never O(tokens x vocabulary). Every chunk is
computed in float32 whatever the input dtype (inputs are upcast one chunk at a time), so the
results match the Triton kernels' fp32 accumulation.
"""

import torch

# Chunk sizes: 1024 x 4096 fp32 logits are 16 MB, large enough for BLAS to run at full speed.
CHUNK_ROWS = 1024
CHUNK_VOCAB = 4096


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """hidden[rows] as float32 [len(rows), D], for hidden [B, T, D] of any strides and flat rows."""
    T = hidden.shape[1]
    return hidden[rows // T, rows % T].float()


def logit_chunk(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int,
                softcap: float | None, temperature: float) -> torch.Tensor:
    """capped(h W[v0:v1]^T + b[v0:v1]) / temperature in float32, for float32 rows h [C, D]."""
    w = weight[v0:v1].float()
    z = h @ w.T if bias is None else torch.addmm(bias[v0:v1].float(), h, w.T)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def logprob_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    num_seqs: int = 0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logprob [R], lse [R], seq_sums [num_seqs] or None), float32; see fdpo.kernels.logprob_forward."""
    num_rows, vocab = rows.numel(), weight.shape[0]
    lse = torch.empty(num_rows, dtype=torch.float32, device=hidden.device)
    logprob = torch.empty_like(lse)
    for r0 in range(0, num_rows, CHUNK_ROWS):
        r1 = min(r0 + CHUNK_ROWS, num_rows)
        h = gather_rows(hidden, rows[r0:r1])
        lab = labels[r0:r1].long()
        m = torch.full((r1 - r0,), float("-inf"), device=hidden.device)
        s = torch.zeros(r1 - r0, device=hidden.device)
        z_label = torch.zeros(r1 - r0, device=hidden.device)
        for v0 in range(0, vocab, CHUNK_VOCAB):
            v1 = min(v0 + CHUNK_VOCAB, vocab)
            z = logit_chunk(h, weight, bias, v0, v1, softcap, temperature)
            m_new = torch.maximum(m, z.amax(dim=1))
            s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(dim=1)
            m = m_new
            inside = (lab >= v0) & (lab < v1)
            picked = z.gather(1, (lab - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            z_label += torch.where(inside, picked, 0.0)
        lse[r0:r1] = m + torch.log(s)
        logprob[r0:r1] = z_label - lse[r0:r1]
    seq_sums = None if seq_ids is None else segment_sums(logprob, seq_ids, num_seqs)
    return logprob, lse, seq_sums


def segment_sums(values: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Per-sequence sums of float32 `values` [R] whose nondecreasing `seq_ids` are in [0, num_seqs).

    A float64 prefix sum differenced at the segment ends: deterministic on every device, unlike
    scatter-add (atomics on CUDA). Sequences without rows get 0.
    """
    counts = torch.bincount(seq_ids.long(), minlength=num_seqs)
    prefix = torch.cat([values.new_zeros(1, dtype=torch.float64), values.double().cumsum(0)])
    ends = counts.cumsum(0)
    return (prefix[ends] - prefix[ends - counts]).float()


def logprob_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = False,
    deterministic: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d_hidden [R, D], d_weight [V, D], d_bias [V]) float32; see fdpo.kernels.logprob_backward.

    Chunks are visited in a fixed order, so the result is always deterministic.
    """
    del deterministic  # always deterministic
    num_rows, vocab, dim = rows.numel(), weight.shape[0], weight.shape[1]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    d_hidden = torch.zeros(num_rows, dim, **f32) if need_hidden else None
    d_weight = torch.zeros(vocab, dim, **f32) if need_weight else None
    d_bias = torch.zeros(vocab, **f32) if need_bias else None
    for r0 in range(0, num_rows, CHUNK_ROWS):
        r1 = min(r0 + CHUNK_ROWS, num_rows)
        h = gather_rows(hidden, rows[r0:r1])
        lab = labels[r0:r1].long()
        for v0 in range(0, vocab, CHUNK_VOCAB):
            v1 = min(v0 + CHUNK_VOCAB, vocab)
            z = logit_chunk(h, weight, bias, v0, v1, softcap, temperature)
            # dz = g (onehot - p) / T, then * (1 - tanh^2) through the soft cap (tanh = z T / c).
            dz = torch.exp(z - lse[r0:r1, None]).neg_()
            inside = (lab >= v0) & (lab < v1)
            dz[inside, lab[inside] - v0] += 1.0
            dz *= grad[r0:r1, None] / temperature
            if softcap is not None:
                dz *= 1.0 - (z * (temperature / softcap)).square()
            if need_hidden:
                d_hidden[r0:r1].addmm_(dz, weight[v0:v1].float())
            if need_weight:
                d_weight[v0:v1].addmm_(dz.T, h)
            if need_bias:
                d_bias[v0:v1] += dz.sum(dim=0)
    return d_hidden, d_weight, d_bias
