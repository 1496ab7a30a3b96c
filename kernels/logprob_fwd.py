"""Forward of the fused linear log-prob: label log-probs and LSE without the logits.

For every scored token r (a row of hidden states, picked through `rows`):
    z = capped(h_r W^T + b) / T,   lse_r = log sum_v exp(z_v),   logprob_r = z[label_r] - lse_r
and, optionally, seq_sum[seq_r] += logprob_r. Only [BLOCK_N, BLOCK_V] tiles of z ever exist.
"""

import torch
import triton
import triton.language as tl

from .launch import Launch, Tiles, input_precision, interpreting, meta_operands, tiles_for
from .tiles import hidden_row_offsets, label_logit, logit_tile, online_lse_update
from .validate import check_head_inputs


@triton.jit
def store_logprobs(offs, row_mask, lse, z_label, seq_ptr, lse_ptr, lp_ptr, seq_sum_ptr, HAS_SEQ: tl.constexpr):
    """Write lse and logprob = z[label] - lse of a block of rows; add logprob to its sequence's sum.

    The sequence sums use fp32 atomics (order-dependent rounding; the deterministic mode sums the
    per-token values outside the kernel instead).
    """
    lp = z_label - lse
    tl.store(lse_ptr + offs, lse, mask=row_mask)
    tl.store(lp_ptr + offs, lp, mask=row_mask)
    if HAS_SEQ:
        seq = tl.load(seq_ptr + offs, mask=row_mask, other=0)
        tl.atomic_add(seq_sum_ptr + seq, lp, mask=row_mask)


# Grid: (row tiles, vocabulary splits). Each program sweeps its split of the vocabulary one
# BLOCK_V tile at a time: one tl.dot chain over D per tile (fp32 accumulator), then the online
# LSE update and the label-logit pickup on the fp32 tile. With one split (FINALIZE) it writes the
# final lse/logprob/sequence sums itself; with several, it writes its partial LSE and (only the
# split holding the label) the label logit, and `_logprob_combine_kernel` finishes. Splitting
# the vocabulary keeps the GPU full when there are few row tiles.
@triton.jit
def _logprob_fwd_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, seq_ptr,
    lse_ptr, lp_ptr, seq_sum_ptr, part_lse_ptr, part_label_ptr,
    R, V, D, T, cols_per_split,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SEQ: tl.constexpr, FINALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    split = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < R
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0)
    labels = tl.load(labels_ptr + offs, mask=row_mask, other=-1)
    h_offs = hidden_row_offsets(rows, T, stride_hb, stride_ht)

    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = logit_tile(h_ptr, h_offs, row_mask, w_ptr, cols, col_mask, b_ptr, D,
                       stride_hd, stride_wv, stride_wd, softcap, inv_temp,
                       HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m, s = online_lse_update(m, s, z)
        z_label += label_logit(z, cols, labels)

    if FINALIZE:
        store_logprobs(offs, row_mask, m + tl.log(s), z_label, seq_ptr, lse_ptr, lp_ptr, seq_sum_ptr, HAS_SEQ)
    else:
        tl.store(part_lse_ptr + split.to(tl.int64) * R + offs, m + tl.log(s), mask=row_mask)
        owns_label = (labels >= v_begin) & (labels < v_end)
        tl.store(part_label_ptr + offs, z_label, mask=row_mask & owns_label)


# Grid: row tiles. Merges the per-split partial LSEs of each row (a log-sum-exp over splits, in
# fp32, in split order) and writes what `_logprob_fwd_kernel` writes when it runs unsplit.
@triton.jit
def _logprob_combine_kernel(
    part_lse_ptr, part_label_ptr, seq_ptr, lse_ptr, lp_ptr, seq_sum_ptr,
    R, num_splits,
    HAS_SEQ: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < R
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    part_ptrs = part_lse_ptr + offs
    for _ in range(num_splits):
        part = tl.load(part_ptrs, mask=row_mask, other=0.0)
        m_new = tl.maximum(m, part)
        s = s * tl.exp(m - m_new) + tl.exp(part - m_new)
        m = m_new
        part_ptrs += R
    z_label = tl.load(part_label_ptr + offs, mask=row_mask, other=0.0)
    store_logprobs(offs, row_mask, m + tl.log(s), z_label, seq_ptr, lse_ptr, lp_ptr, seq_sum_ptr, HAS_SEQ)


def _vocab_splits(num_rows: int, vocab: int, tiles: Tiles, device: torch.device) -> int:
    """Vocabulary splits so that at least two programs run per streaming multiprocessor."""
    if interpreting() or device.type != "cuda":
        return 1
    row_tiles = triton.cdiv(num_rows, tiles.block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, row_tiles), triton.cdiv(vocab, tiles.block_v)))


def logprob_forward_launches(
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
    num_splits: int | None = None,
) -> tuple[list[Launch], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Build (without running) the launches of `logprob_forward` and allocate their outputs."""
    check_head_inputs(hidden, weight, rows, labels, bias=bias, seq_ids=seq_ids, num_seqs=num_seqs,
                      softcap=softcap, temperature=temperature)
    num_rows, vocab = rows.numel(), weight.shape[0]
    tiles = tiles_for("forward", hidden.dtype)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse = torch.empty(num_rows, **f32)
    logprob = torch.empty(num_rows, **f32)
    seq_sums = torch.zeros(num_seqs, **f32) if seq_ids is not None else None

    splits = num_splits or _vocab_splits(num_rows, vocab, tiles, hidden.device)
    cols_per_split = triton.cdiv(triton.cdiv(vocab, splits), tiles.block_v) * tiles.block_v
    splits = triton.cdiv(vocab, cols_per_split)
    finalize = splits == 1
    part_lse = None if finalize else torch.empty(splits, num_rows, **f32)
    part_label = None if finalize else torch.zeros(num_rows, **f32)

    _, T, _ = hidden.shape
    main = Launch(
        _logprob_fwd_kernel,
        grid=(triton.cdiv(num_rows, tiles.block_n), splits),
        args=dict(
            h_ptr=hidden, w_ptr=weight, b_ptr=bias, rows_ptr=rows, labels_ptr=labels, seq_ptr=seq_ids,
            lse_ptr=lse, lp_ptr=logprob, seq_sum_ptr=seq_sums, part_lse_ptr=part_lse, part_label_ptr=part_label,
            R=num_rows, V=vocab, D=hidden.shape[2], T=T, cols_per_split=cols_per_split,
            stride_hb=hidden.stride(0), stride_ht=hidden.stride(1), stride_hd=hidden.stride(2),
            stride_wv=weight.stride(0), stride_wd=weight.stride(1),
            softcap=float(softcap or 1.0), inv_temp=1.0 / temperature,
        ),
        constexprs=dict(
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_SEQ=seq_ids is not None,
            FINALIZE=finalize, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
            INPUT_PRECISION=input_precision(hidden.dtype),
        ),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    launches = [main]
    if not finalize:
        block = 128
        launches.append(Launch(
            _logprob_combine_kernel,
            grid=(triton.cdiv(num_rows, block),),
            args=dict(part_lse_ptr=part_lse, part_label_ptr=part_label, seq_ptr=seq_ids, lse_ptr=lse,
                      lp_ptr=logprob, seq_sum_ptr=seq_sums, R=num_rows, num_splits=splits),
            constexprs=dict(HAS_SEQ=seq_ids is not None, BLOCK_N=block),
            num_warps=4,
            num_stages=1,
        ))
    return launches, (logprob, lse, seq_sums)


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
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Label log-probs of the tokens `rows` of `hidden` under the LM head, without the logits.

    Args:
        hidden: [B, T, D] float16/bfloat16/float32, any strides (e.g. `h[:, :-1]`).
        weight: [V, D] LM-head weight, same dtype and device. bias: [V] or None.
        rows: int64 [R] flat indices into the B*T tokens to score (the non-ignored ones).
        labels: int32 [R] label of each scored row, in [0, V).
        seq_ids: int32 [R] sequence of each row, in [0, num_seqs); None for no sequence sums.
        softcap: c for logits c * tanh(z / c), or None. temperature: logits are divided by it.
        num_splits: vocabulary splits (default: enough programs to fill the GPU; 1 when interpreted).

    Returns:
        (logprob [R], lse [R], seq_sums [num_seqs] or None), all float32.
    """
    launches, outputs = logprob_forward_launches(
        hidden, weight, rows, labels, bias=bias, seq_ids=seq_ids, num_seqs=num_seqs,
        softcap=softcap, temperature=temperature, num_splits=num_splits)
    if rows.numel():
        for launch in launches:
            launch()
    return outputs


def aot_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """Every launch variant of this module on meta operands, for `fdpo.kernels.aot`.

    Bias and soft-capping are on so that the longest code paths are compiled.
    """
    op = meta_operands(dtype)
    common = dict(bias=op["bias"], seq_ids=op["seq_ids"], num_seqs=op["hidden"].shape[0],
                  softcap=30.0, temperature=0.7)
    (unsplit,), _ = logprob_forward_launches(op["hidden"], op["weight"], op["rows"], op["labels"],
                                             num_splits=1, **common)
    (split, combine), _ = logprob_forward_launches(op["hidden"], op["weight"], op["rows"], op["labels"],
                                                   num_splits=4, **common)
    return {"one split, sequence sums": unsplit, "vocabulary split": split, "sequence sums": combine}
