"""Forward of the per-token statistics of one or two LM heads, without the logits.

For every scored token r, with policy logits z = capped(scale (h_r W^T + b)) / T and, when a
reference head is given, reference logits z_ref computed the same way from the reference hidden
states and head (with its own scale):
    lse, logprob = z[label] - lse                       always
    entropy      = log s - E_p[z - m]                   ENTROPY   (docs/math.md 7; m, s of the LSE: never cancels)
    ref_lse, ref_logprob                                HAS_REF
    kl           = E_pref[z_ref - z] + (m - m_ref) + log(s / s_ref)   KL   (KL(ref || policy), docs/math.md 6:
                   lse - ref_lse from the maxima and sums, never from the two rounded LSEs)
    logprob_plus / logprob_minus of z+- = (1 +- eps) z -+ eps z_ref   PERTURB (docs/math.md 5)
    mean_logits  = sum_v z / V                          MEAN_LOGITS (docs/math.md 13, constants)
    is_top1      = z[label] >= m and > max_{v<label} z  TOP1
    log_sum_sq_probs = log q - 2 log s, q = sum e^(2(z-m))   SQUARES
Each vocabulary tile costs one `tl.dot` chain per head; everything else is an online, rescaled
fp32 accumulation over tiles (docs/math.md 8). Only [BLOCK_N, BLOCK_V] tiles of logits ever exist.
Masked logits (-inf bias entries) follow 0 log 0 = 0 (docs/math.md 8): the KL is +inf where the
policy alone masks an entry the reference gives probability, and z+ = (1 + eps) z - eps z_ref reads
a masked z_ref as FLOAT32_MIN (finite: -inf - -inf would be NaN).
"""

import torch
import triton
import triton.language as tl

from fdpo.heads import LOGPROBS_ONLY, HeadInput, LMHead, ScoredTokens, StatsRequest

from .launch import BATCH_SIZED, Launch, bf16_products, input_precision, meta_operands, tiles_for
from .tiles import (
    FLOAT32_MIN,
    entropy_from,
    hidden_row_offsets,
    label_logit,
    logit_tile,
    lse_difference,
    max_before_label,
    online_expectation_update,
    online_lse_update,
    online_softmax_update,
)
from .validate import (
    check_head_inputs,
    check_ref_head,
    head_args,
    head_flags,
    head_operands,
    head_scale,
    heads_compute_dtype,
)


# Grid: row tiles; each program sweeps the whole vocabulary (no vocabulary split: the combine of
# expectations across splits would need every accumulator written out, and two heads already double
# the work per tile). Per tile: the policy tile z and, with a reference, z_ref, each one tl.dot chain
# over D into an fp32 accumulator; then up to four online accumulations that share their running
# maxima: softmax(z) (LSE, E_p[z - m] for the entropy), softmax(z_ref) (LSE, E_pref[z_ref - z] for the KL)
# and the LSEs of the two mixtures z+- for the perturbed log-probs. Label logits of both heads are
# picked up on the way; the mixtures' label logits are the same mixtures of them.
@triton.jit(do_not_specialize=BATCH_SIZED)
def _head_stats_fwd_kernel(
    h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows_ptr, labels_ptr,
    lp_ptr, lse_ptr, ent_ptr, ref_lp_ptr, ref_lse_ptr, kl_ptr, lp_plus_ptr, lp_minus_ptr,
    mean_ptr, top1_ptr, sq_ptr,
    R, V, D, T, ref_D, ref_T,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
    softcap, inv_temp, scale, ref_softcap, ref_inv_temp, ref_scale, eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, REF_COMPUTE_DTYPE: tl.constexpr,
    HAS_REF: tl.constexpr, ENTROPY: tl.constexpr, KL: tl.constexpr, PERTURB: tl.constexpr,
    MEAN_LOGITS: tl.constexpr, TOP1: tl.constexpr, SQUARES: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < R
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0)
    labels = tl.load(labels_ptr + offs, mask=row_mask, other=-1)
    h_offs = hidden_row_offsets(rows, T, stride_hb, stride_ht)
    rh_offs = hidden_row_offsets(rows, ref_T, stride_ref_hb, stride_ref_ht)

    # Running max, sum of exp and weighted sum of each softmax, and the label logits: all fp32 [BLOCK_N].
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    m_ref = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    m_plus = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    m_minus = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_ref = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_plus = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_minus = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u_ent = tl.zeros((BLOCK_N,), dtype=tl.float32)
    q_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_kl = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    before = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    z_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zr_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = logit_tile(h_ptr, h_offs, row_mask, w_ptr, cols, col_mask, b_ptr, D,
                       stride_hd, stride_wv, stride_wd, softcap, inv_temp,
                       HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE, scale)
        z_masked = tl.where(col_mask[None, :], z, float("-inf"))
        if ENTROPY or SQUARES:
            m, s, u_ent, q_sq = online_softmax_update(m, s, u_ent, q_sq, z_masked, z, ENTROPY, SQUARES)
        else:
            m, s = online_lse_update(m, s, z_masked)
        z_label += label_logit(z, cols, labels)
        if MEAN_LOGITS:
            z_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
        if TOP1:
            before = max_before_label(before, z_masked, cols, labels)
        if HAS_REF:
            zr = logit_tile(ref_h_ptr, rh_offs, row_mask, ref_w_ptr, cols, col_mask, ref_b_ptr, ref_D,
                            stride_ref_hd, stride_ref_wv, stride_ref_wd, ref_softcap, ref_inv_temp,
                            REF_HAS_BIAS, REF_HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION,
                            REF_COMPUTE_DTYPE, ref_scale)
            zr_masked = tl.where(col_mask[None, :], zr, float("-inf"))
            if KL:
                m_ref, s_ref, t_kl = online_expectation_update(m_ref, s_ref, t_kl, zr_masked, zr - z)
            else:
                m_ref, s_ref = online_lse_update(m_ref, s_ref, zr_masked)
            zr_label += label_logit(zr, cols, labels)
            if PERTURB:
                # z+ takes a masked reference logit (-inf) as the most negative float32: an entry masked in
                # both heads stays masked (-inf - -inf would be NaN), one the reference alone masks is about
                # eps 3.4e38 instead of +inf (docs/math.md 8).
                zr_finite = tl.maximum(zr, FLOAT32_MIN, propagate_nan=tl.PropagateNan.ALL)
                m_plus, s_plus = online_lse_update(m_plus, s_plus, tl.where(col_mask[None, :],
                                                                            (1.0 + eps) * z - eps * zr_finite,
                                                                            float("-inf")))
                m_minus, s_minus = online_lse_update(m_minus, s_minus, tl.where(col_mask[None, :], (1.0 - eps) * z + eps * zr,
                                                            float("-inf")))

    lse = m + tl.log(s)
    tl.store(lse_ptr + offs, lse, mask=row_mask)
    tl.store(lp_ptr + offs, z_label - lse, mask=row_mask)
    if ENTROPY:
        tl.store(ent_ptr + offs, entropy_from(s, u_ent), mask=row_mask)
    if MEAN_LOGITS:
        tl.store(mean_ptr + offs, z_sum / V, mask=row_mask)
    if TOP1:
        # The label's logit and the maximum are the same fp32 values: exact ties are ties.
        tl.store(top1_ptr + offs, ((z_label >= m) & (z_label > before)).to(tl.int8), mask=row_mask)
    if SQUARES:
        tl.store(sq_ptr + offs, tl.log(q_sq) - 2.0 * tl.log(s), mask=row_mask)
    if HAS_REF:
        ref_lse = m_ref + tl.log(s_ref)
        tl.store(ref_lse_ptr + offs, ref_lse, mask=row_mask)
        tl.store(ref_lp_ptr + offs, zr_label - ref_lse, mask=row_mask)
        if KL:
            tl.store(kl_ptr + offs, t_kl / s_ref + lse_difference(m, s, m_ref, s_ref), mask=row_mask)
        if PERTURB:
            # A row where the reference alone masks an entry has z+ = +inf there on paper: every other
            # label's lp+ is -inf. Its stand-in z+ (about eps 3.4e38) is the row's max, far above any logit.
            lp_plus = (1.0 + eps) * z_label - eps * zr_label - (m_plus + tl.log(s_plus))
            lp_plus = tl.where((eps > 0.0) & (m_plus >= eps * (-0.5 * FLOAT32_MIN)), float("-inf"), lp_plus)
            tl.store(lp_plus_ptr + offs, lp_plus, mask=row_mask)
            tl.store(lp_minus_ptr + offs, (1.0 - eps) * z_label + eps * zr_label - (m_minus + tl.log(s_minus)), mask=row_mask)


def head_stats_forward_launch(
    policy: HeadInput,
    tokens: ScoredTokens,
    ref: HeadInput | None = None,
    request: StatsRequest = LOGPROBS_ONLY,
) -> tuple[Launch, dict[str, torch.Tensor]]:
    """Build (without running) the launch of `head_stats_forward` and allocate its outputs."""
    check_head_inputs(policy, tokens, scaled_mixed=True)
    perturb = request.eps is not None
    if (request.kl or perturb) and ref is None:
        raise ValueError("kl=True and eps need the reference head (ref_hidden and ref_weight)")
    if ref is not None:
        check_ref_head(ref, policy, tokens, scaled_mixed=True)
    if perturb and not (isinstance(request.eps, (int, float)) and 0.0 < request.eps < 1.0):
        raise ValueError(f"eps must be a number in (0, 1), got {request.eps!r}")
    has_ref = ref is not None
    wanted = {"logprob": True, "lse": True, "entropy": request.entropy, "ref_logprob": has_ref,
              "ref_lse": has_ref, "kl": request.kl, "logprob_plus": perturb, "logprob_minus": perturb,
              "mean_logits": request.mean_logits, "log_sum_sq_probs": request.log_sum_sq_probs}
    rows = tokens.rows
    hidden = policy.hidden
    outputs = {name: torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
               for name, want in wanted.items() if want}
    # The kernel stores 0 / 1 bytes: int8 for it, returned as a torch.bool view.
    top1 = torch.empty(rows.numel(), dtype=torch.int8, device=hidden.device) if request.top1 else None
    if top1 is not None:
        outputs["is_top1"] = top1.view(torch.bool)
    # A reference tile, or the entropy's extra fp32 tile (z - m beside z and its exponentials), does
    # not fit in the registers beside 128 rows at 8 warps (244 B of spills, bf16 sm_80): both take
    # the two-head tiles, half the rows per program, as do the docs/math.md 13 statistics (their
    # masked tiles beside z). Tiles follow the widest products of the two heads.
    dtype = heads_compute_dtype(policy, ref)
    tiles = tiles_for("two_heads" if has_ref or request.entropy or request.constants else "forward", dtype,
                      *head_operands(policy, ref))
    launch = Launch(
        _head_stats_fwd_kernel,
        grid=(triton.cdiv(rows.numel(), tiles.block_n),),
        args=dict(
            **head_args(policy, ""), **head_args(ref, "ref_"), **head_scale(policy, ""), **head_scale(ref, "ref_"),
            rows_ptr=rows, labels_ptr=tokens.labels, top1_ptr=top1,
            **{f"{short}_ptr": outputs.get(name) for short, name in (
                ("lp", "logprob"), ("lse", "lse"), ("ent", "entropy"), ("ref_lp", "ref_logprob"),
                ("ref_lse", "ref_lse"), ("kl", "kl"), ("lp_plus", "logprob_plus"), ("lp_minus", "logprob_minus"),
                ("mean", "mean_logits"), ("sq", "log_sum_sq_probs"))},
            R=rows.numel(), V=policy.weight.shape[0], eps=float(request.eps or 0.0),
        ),
        constexprs=dict(
            **head_flags(policy, ""), **head_flags(ref, "REF_"),
            HAS_REF=has_ref, ENTROPY=request.entropy, KL=request.kl, PERTURB=perturb,
            MEAN_LOGITS=request.mean_logits, TOP1=request.top1, SQUARES=request.log_sum_sq_probs,
            BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
            INPUT_PRECISION=input_precision(dtype),
        ),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return launch, outputs


def head_stats_forward(
    policy: HeadInput,
    tokens: ScoredTokens,
    ref: HeadInput | None = None,
    request: StatsRequest = LOGPROBS_ONLY,
) -> dict[str, torch.Tensor]:
    """Per-token statistics of the policy head (and a reference head) in one pass over the vocabulary.

    Args:
        policy: hidden [B, T, D] float16/bfloat16/float32 (any strides) with its head: weight [V, D]
            on the same device, any float dtype, bias [V] or None, scale, softcap, temperature; the
            products in the head's compute dtype (`fdpo.heads.head_compute_dtype`, docs/math.md 13).
        tokens: rows int64 [R], flat indices into the B*T tokens to score; labels int32 [R] in [0, V).
        ref: the reference, needed by kl and eps: hidden [B', T', D'] holding the same B*T tokens
            (rows index both), any strides, with a head of the same vocabulary (its own dtypes and
            compute dtype). Its label log-prob and LSE are computed whenever it is given.
        request: entropy (the policy entropy H = LSE - E_p[z] >= 0, computed as log s - E_p[z - m]),
            kl (KL(ref || policy) = sum_v p_ref (log p_ref - log p)), eps (the label log-probs of
            (1 + eps) z - eps z_ref and (1 - eps) z + eps z_ref, eps in (0, 1)), mean_logits, top1,
            log_sum_sq_probs (docs/math.md 13).

    Returns:
        dict of float32 [R] tensors: "logprob", "lse", and as requested "entropy", "ref_logprob",
        "ref_lse", "kl", "logprob_plus", "logprob_minus", "mean_logits", "log_sum_sq_probs", and
        "is_top1" (torch.bool [R]).
    """
    launch, outputs = head_stats_forward_launch(policy, tokens, ref, request)
    if tokens.rows.numel():
        launch()
    return outputs


def aot_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """The launch variants of this module on meta operands, for `fdpo.kernels.aot`.

    Every statistic at once (two heads with bias, scales and soft-capping: the longest path), the
    policy-only entropy, TRL's policy statistics and, with fp32, those of an fp32 head on bf16
    hidden states (fp32 products), and TRL's statistics and every statistic of fp32 operands with
    bf16 products (autocast).
    """
    op = meta_operands(dtype)
    head = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7, scale=0.5))
    ref = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7, scale=2.0), "ref_")
    tokens = ScoredTokens(op["rows"], op["labels"])
    everything_request = StatsRequest(entropy=True, kl=True, eps=0.01, mean_logits=True, top1=True,
                                      log_sum_sq_probs=True)
    everything, _ = head_stats_forward_launch(head, tokens, ref, everything_request)
    entropy, _ = head_stats_forward_launch(head, tokens, request=StatsRequest(entropy=True))
    trl = StatsRequest(entropy=True, mean_logits=True, top1=True, log_sum_sq_probs=True)
    launches = {"two heads: everything": everything, "policy entropy": entropy,
                "TRL statistics": head_stats_forward_launch(head, tokens, request=trl)[0]}
    if dtype == torch.float32:
        mixed = HeadInput(meta_operands(torch.bfloat16)["hidden"], head.head)
        launches["TRL statistics, bf16 hidden states"] = head_stats_forward_launch(mixed, tokens, request=trl)[0]
        launches["TRL statistics, bf16 products"] = head_stats_forward_launch(bf16_products(head), tokens,
                                                                              request=trl)[0]
        launches["two heads: everything, bf16 products"] = head_stats_forward_launch(
            bf16_products(head), tokens, bf16_products(ref), everything_request)[0]
    return launches
