"""Forward of the head statistics without extras: label log-probs and LSE, without the logits.

For every scored token r (a row of hidden states, picked through `rows`):
    z = capped(scale (h_r W^T + b)) / T      (docs/math.md 13: scale before the cap),   lse_r = log sum_v exp(z_v),   logprob_r = z[label_r] - lse_r
and, optionally, seq_sum[seq_r] += logprob_r. Only [BLOCK_N, BLOCK_V] tiles of z ever exist.
"""

import torch
import triton
import triton.language as tl

from fdpo.heads import HeadInput, LMHead, ScoredTokens

from .launch import BATCH_SIZED, Launch, Tiles, bf16_products, input_precision, interpreting, meta_operands, tiles_for
from .tiles import hidden_row_offsets, label_logit, logit_tile, online_lse_update
from .validate import check_head_inputs, head_args, head_compute_dtype, head_flags, head_operands, head_scale


@triton.jit
def store_logprobs(offs, row_mask, lse, z_label, seq_ptr, lse_ptr, lp_ptr, seq_sum_ptr, HAS_SEQ: tl.constexpr):
    """Write lse and logprob = z[label] - lse of a block of rows; add logprob to its sequence's sum.

    The sequence sums are fp64 atomics (one per token, a few thousand per sequence: a float32 sum of
    T terms added one at a time drifts like sqrt(T) ulps of the sum, 6e-3 at 4096 tokens, where an
    fp64 one is exact to the final rounding to float32). Their order still varies from run to run;
    the deterministic mode sums the per-token values outside the kernel instead.
    """
    lp = z_label - lse
    tl.store(lse_ptr + offs, lse, mask=row_mask)
    tl.store(lp_ptr + offs, lp, mask=row_mask)
    if HAS_SEQ:
        seq = tl.load(seq_ptr + offs, mask=row_mask, other=0)
        tl.atomic_add(seq_sum_ptr + seq, lp.to(tl.float64), mask=row_mask)


# Grid: (row tiles, vocabulary splits). Each program sweeps its split of the vocabulary one
# BLOCK_V tile at a time: one tl.dot chain over D per tile (fp32 accumulator), then the online
# LSE update and the label-logit pickup on the fp32 tile. With one split (FINALIZE) it writes the
# final lse/logprob/sequence sums itself; with several, it writes its partial LSE and (only the
# split holding the label) the label logit, and `_head_logprob_combine_kernel` finishes. Splitting
# the vocabulary keeps the GPU full when there are few row tiles.
@triton.jit(do_not_specialize=BATCH_SIZED)
def _head_logprob_fwd_kernel(
    h_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, seq_ptr,
    lse_ptr, lp_ptr, seq_sum_ptr, part_lse_ptr, part_label_ptr,
    R, V, D, T, cols_per_split,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    softcap, inv_temp, scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SEQ: tl.constexpr, FINALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
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
                       HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE, scale)
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
# fp32, in split order) and writes what `_head_logprob_fwd_kernel` writes when it runs unsplit.
@triton.jit(do_not_specialize=BATCH_SIZED)
def _head_logprob_combine_kernel(
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
        # A split whose every logit is masked (-inf bias entries) has LSE_k = -inf and adds nothing.
        m, s = online_lse_update(m, s, part[:, None])
        part_ptrs += R
    z_label = tl.load(part_label_ptr + offs, mask=row_mask, other=0.0)
    store_logprobs(offs, row_mask, m + tl.log(s), z_label, seq_ptr, lse_ptr, lp_ptr, seq_sum_ptr, HAS_SEQ)


def _vocab_splits(num_rows: int, vocab: int, tiles: Tiles, device: torch.device) -> int:
    """Vocabulary splits so that at least two programs run per streaming multiprocessor."""
    if interpreting() or device.type != "cuda" or num_rows == 0:
        return 1
    row_tiles = triton.cdiv(num_rows, tiles.block_n)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, row_tiles), triton.cdiv(vocab, tiles.block_v)))


def head_logprob_forward_launches(
    policy: HeadInput,
    tokens: ScoredTokens,
    *,
    num_splits: int | None = None,
) -> tuple[list[Launch], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Build (without running) the launches of `head_logprob_forward` and allocate their outputs."""
    check_head_inputs(policy, tokens, scaled_mixed=True)
    hidden, weight, rows, seq_ids = policy.hidden, policy.weight, tokens.rows, tokens.seq_ids
    num_rows, vocab = rows.numel(), weight.shape[0]
    dtype = head_compute_dtype(policy)
    tiles = tiles_for("forward", dtype, *head_operands(policy))
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lse = torch.empty(num_rows, **f32)
    logprob = torch.empty(num_rows, **f32)
    # float64 accumulators (see store_logprobs), returned as float32 by head_logprob_forward
    seq_sums = torch.zeros(tokens.num_seqs, dtype=torch.float64, device=hidden.device) if seq_ids is not None \
        else None

    splits = num_splits or _vocab_splits(num_rows, vocab, tiles, hidden.device)
    cols_per_split = triton.cdiv(triton.cdiv(vocab, splits), tiles.block_v) * tiles.block_v
    splits = triton.cdiv(vocab, cols_per_split)
    finalize = splits == 1
    part_lse = None if finalize else torch.empty(splits, num_rows, **f32)
    part_label = None if finalize else torch.zeros(num_rows, **f32)

    main = Launch(
        _head_logprob_fwd_kernel,
        grid=(triton.cdiv(num_rows, tiles.block_n), splits),
        args=dict(
            **head_args(policy, ""), **head_scale(policy, ""), rows_ptr=rows, labels_ptr=tokens.labels,
            seq_ptr=seq_ids,
            lse_ptr=lse, lp_ptr=logprob, seq_sum_ptr=seq_sums, part_lse_ptr=part_lse, part_label_ptr=part_label,
            R=num_rows, V=vocab, cols_per_split=cols_per_split,
        ),
        constexprs=dict(
            **head_flags(policy, ""), HAS_SEQ=seq_ids is not None,
            FINALIZE=finalize, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
            INPUT_PRECISION=input_precision(dtype),
        ),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    launches = [main]
    if not finalize:
        block = 128
        launches.append(Launch(
            _head_logprob_combine_kernel,
            grid=(triton.cdiv(num_rows, block),),
            args=dict(part_lse_ptr=part_lse, part_label_ptr=part_label, seq_ptr=seq_ids, lse_ptr=lse,
                      lp_ptr=logprob, seq_sum_ptr=seq_sums, R=num_rows, num_splits=splits),
            constexprs=dict(HAS_SEQ=seq_ids is not None, BLOCK_N=block),
            num_warps=4,
            num_stages=1,
        ))
    return launches, (logprob, lse, seq_sums)


def head_logprob_forward(
    policy: HeadInput,
    tokens: ScoredTokens,
    *,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Label log-probs of the scored rows under the LM head, without the logits.

    Args:
        policy: hidden [B, T, D] float16/bfloat16/float32, any strides (e.g. `h[:, :-1]`), with its
            head: weight [V, D] on the same device, any float dtype, bias [V] or None, scale
            (multiplies the logits before the cap), softcap (logits c * tanh(z / c), or None),
            temperature (logits are divided by it), compute_dtype (the products' operands are rounded
            to `fdpo.heads.head_compute_dtype(policy)` tile by tile, accumulated in fp32).
        tokens: rows int64 [R], flat indices into the B*T tokens to score (the non-ignored ones);
            labels int32 [R] in [0, V); seq_ids int32 [R] in [0, num_seqs) for per-sequence sums
            (added with fp64 atomics), None for none.
        num_splits: vocabulary splits (default: enough programs to fill the GPU; 1 when interpreted).

    Returns:
        (logprob [R], lse [R], seq_sums [num_seqs] or None), all float32.
    """
    launches, (logprob, lse, seq_sums) = head_logprob_forward_launches(policy, tokens, num_splits=num_splits)
    if tokens.rows.numel():
        for launch in launches:
            launch()
    return logprob, lse, None if seq_sums is None else seq_sums.float()


def aot_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """Every launch variant of this module on meta operands, for `fdpo.kernels.aot`; with fp32, also
    an fp32 head on bf16 hidden states (fp32 products) and fp32 operands with bf16 products (autocast).

    Bias, scale and soft-capping are on so that the longest code paths are compiled.
    """
    op = meta_operands(dtype)
    head = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7, scale=0.5))
    tokens = ScoredTokens(op["rows"], op["labels"], op["seq_ids"], op["hidden"].shape[0])
    (unsplit,), _ = head_logprob_forward_launches(head, tokens, num_splits=1)
    (split, combine), _ = head_logprob_forward_launches(head, tokens, num_splits=4)
    launches = {"one split, sequence sums": unsplit, "vocabulary split": split, "sequence sums": combine}
    if dtype == torch.float32:
        mixed = HeadInput(meta_operands(torch.bfloat16)["hidden"], head.head)
        (launches["one split, bf16 hidden states"],), _ = head_logprob_forward_launches(mixed, tokens, num_splits=1)
        (launches["one split, bf16 products"],), _ = head_logprob_forward_launches(bf16_products(head), tokens,
                                                                                   num_splits=1)
    return launches
