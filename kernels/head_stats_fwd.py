"""Forward of the per-token statistics of one or two LM heads, without the logits.

For every scored token r, with policy logits z = capped(h_r W^T + b) / T and, when a reference head
is given, reference logits z_ref computed the same way from the reference hidden states and head:
    lse, logprob = z[label] - lse                       always
    entropy      = log s - E_p[z - m]                   ENTROPY   (docs/math.md 7; m, s of the LSE: never cancels)
    ref_lse, ref_logprob                                HAS_REF
    kl           = E_pref[z_ref - z] - ref_lse + lse    KL        (KL(ref || policy), docs/math.md 6)
    logprob_plus / logprob_minus of z+- = (1 +- eps) z -+ eps z_ref   PERTURB (docs/math.md 5)
Each vocabulary tile costs one `tl.dot` chain per head; everything else is an online, rescaled
fp32 accumulation over tiles (docs/math.md 8). Only [BLOCK_N, BLOCK_V] tiles of logits ever exist.
"""

import torch
import triton
import triton.language as tl

from fdpo.heads import LOGPROBS_ONLY, HeadInput, LMHead, ScoredTokens, StatsRequest

from .launch import Launch, input_precision, meta_operands, tiles_for
from .tiles import (
    entropy_from,
    hidden_row_offsets,
    label_logit,
    logit_tile,
    online_entropy_update,
    online_expectation_update,
    online_lse_update,
)
from .validate import check_head_inputs, check_ref_head, head_args, head_flags


# Grid: row tiles; each program sweeps the whole vocabulary (no vocabulary split: the combine of
# expectations across splits would need every accumulator written out, and two heads already double
# the work per tile). Per tile: the policy tile z and, with a reference, z_ref, each one tl.dot chain
# over D into an fp32 accumulator; then up to four online accumulations that share their running
# maxima: softmax(z) (LSE, E_p[z - m] for the entropy), softmax(z_ref) (LSE, E_pref[z_ref - z] for the KL)
# and the LSEs of the two mixtures z+- for the perturbed log-probs. Label logits of both heads are
# picked up on the way; the mixtures' label logits are the same mixtures of them.
@triton.jit
def _head_stats_fwd_kernel(
    h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows_ptr, labels_ptr,
    lp_ptr, lse_ptr, ent_ptr, ref_lp_ptr, ref_lse_ptr, kl_ptr, lp_plus_ptr, lp_minus_ptr,
    R, V, D, T, ref_D, ref_T,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
    softcap, inv_temp, ref_softcap, ref_inv_temp, eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    HAS_REF: tl.constexpr, ENTROPY: tl.constexpr, KL: tl.constexpr, PERTURB: tl.constexpr,
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
    t_kl = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zr_label = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = logit_tile(h_ptr, h_offs, row_mask, w_ptr, cols, col_mask, b_ptr, D,
                       stride_hd, stride_wv, stride_wd, softcap, inv_temp,
                       HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION)
        z_masked = tl.where(col_mask[None, :], z, float("-inf"))
        if ENTROPY:
            m, s, u_ent = online_entropy_update(m, s, u_ent, z_masked, z)
        else:
            m, s = online_lse_update(m, s, z_masked)
        z_label += label_logit(z, cols, labels)
        if HAS_REF:
            zr = logit_tile(ref_h_ptr, rh_offs, row_mask, ref_w_ptr, cols, col_mask, ref_b_ptr, ref_D,
                            stride_ref_hd, stride_ref_wv, stride_ref_wd, ref_softcap, ref_inv_temp,
                            REF_HAS_BIAS, REF_HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION)
            zr_masked = tl.where(col_mask[None, :], zr, float("-inf"))
            if KL:
                m_ref, s_ref, t_kl = online_expectation_update(m_ref, s_ref, t_kl, zr_masked, zr - z)
            else:
                m_ref, s_ref = online_lse_update(m_ref, s_ref, zr_masked)
            zr_label += label_logit(zr, cols, labels)
            if PERTURB:
                m_plus, s_plus = online_lse_update(m_plus, s_plus, tl.where(col_mask[None, :], (1.0 + eps) * z - eps * zr,
                                                            float("-inf")))
                m_minus, s_minus = online_lse_update(m_minus, s_minus, tl.where(col_mask[None, :], (1.0 - eps) * z + eps * zr,
                                                            float("-inf")))

    lse = m + tl.log(s)
    tl.store(lse_ptr + offs, lse, mask=row_mask)
    tl.store(lp_ptr + offs, z_label - lse, mask=row_mask)
    if ENTROPY:
        tl.store(ent_ptr + offs, entropy_from(s, u_ent), mask=row_mask)
    if HAS_REF:
        ref_lse = m_ref + tl.log(s_ref)
        tl.store(ref_lse_ptr + offs, ref_lse, mask=row_mask)
        tl.store(ref_lp_ptr + offs, zr_label - ref_lse, mask=row_mask)
        if KL:
            tl.store(kl_ptr + offs, t_kl / s_ref - ref_lse + lse, mask=row_mask)
        if PERTURB:
            tl.store(lp_plus_ptr + offs, (1.0 + eps) * z_label - eps * zr_label - (m_plus + tl.log(s_plus)), mask=row_mask)
            tl.store(lp_minus_ptr + offs, (1.0 - eps) * z_label + eps * zr_label - (m_minus + tl.log(s_minus)), mask=row_mask)


def head_stats_forward_launch(
    policy: HeadInput,
    tokens: ScoredTokens,
    ref: HeadInput | None = None,
    request: StatsRequest = LOGPROBS_ONLY,
) -> tuple[Launch, dict[str, torch.Tensor]]:
    """Build (without running) the launch of `head_stats_forward` and allocate its outputs."""
    check_head_inputs(policy, tokens)
    perturb = request.eps is not None
    if (request.kl or perturb) and ref is None:
        raise ValueError("kl=True and eps need the reference head (ref_hidden and ref_weight)")
    if ref is not None:
        check_ref_head(ref, policy, tokens)
    if perturb and not (isinstance(request.eps, (int, float)) and 0.0 < request.eps < 1.0):
        raise ValueError(f"eps must be a number in (0, 1), got {request.eps!r}")
    has_ref = ref is not None
    wanted = {"logprob": True, "lse": True, "entropy": request.entropy, "ref_logprob": has_ref,
              "ref_lse": has_ref, "kl": request.kl, "logprob_plus": perturb, "logprob_minus": perturb}
    rows = tokens.rows
    hidden = policy.hidden
    outputs = {name: torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
               for name, want in wanted.items() if want}
    # A reference tile, or the entropy's extra fp32 tile (z - m beside z and its exponentials), does
    # not fit in the registers beside 128 rows at 8 warps (244 B of spills, bf16 sm_80): both take
    # the two-head tiles, half the rows per program.
    tiles = tiles_for("two_heads" if has_ref or request.entropy else "forward", hidden.dtype)
    launch = Launch(
        _head_stats_fwd_kernel,
        grid=(triton.cdiv(rows.numel(), tiles.block_n),),
        args=dict(
            **head_args(policy, ""), **head_args(ref, "ref_"),
            rows_ptr=rows, labels_ptr=tokens.labels,
            **{f"{short}_ptr": outputs.get(name) for short, name in (
                ("lp", "logprob"), ("lse", "lse"), ("ent", "entropy"), ("ref_lp", "ref_logprob"),
                ("ref_lse", "ref_lse"), ("kl", "kl"), ("lp_plus", "logprob_plus"), ("lp_minus", "logprob_minus"))},
            R=rows.numel(), V=policy.weight.shape[0], eps=float(request.eps or 0.0),
        ),
        constexprs=dict(
            **head_flags(policy, ""), **head_flags(ref, "REF_"),
            HAS_REF=has_ref, ENTROPY=request.entropy, KL=request.kl, PERTURB=perturb,
            BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
            INPUT_PRECISION=input_precision(hidden.dtype),
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
            of the same dtype and device, bias [V] or None, softcap, temperature.
        tokens: rows int64 [R], flat indices into the B*T tokens to score; labels int32 [R] in [0, V).
        ref: the reference, needed by kl and eps: hidden [B', T', D'] holding the same B*T tokens
            (rows index both), any strides, with a head of the same vocabulary and dtype. Its label
            log-prob and LSE are computed whenever it is given.
        request: entropy (the policy entropy H = LSE - E_p[z] >= 0, computed as log s - E_p[z - m]),
            kl (KL(ref || policy) = sum_v p_ref (log p_ref - log p)), eps (the label log-probs of
            (1 + eps) z - eps z_ref and (1 - eps) z + eps z_ref, eps in (0, 1)).

    Returns:
        dict of float32 [R] tensors: "logprob", "lse", and as requested "entropy", "ref_logprob",
        "ref_lse", "kl", "logprob_plus", "logprob_minus".
    """
    launch, outputs = head_stats_forward_launch(policy, tokens, ref, request)
    if tokens.rows.numel():
        launch()
    return outputs


def aot_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """The launch variants of this module on meta operands, for `fdpo.kernels.aot`.

    Every statistic at once (two heads with bias and soft-capping: the longest path), and the
    policy-only entropy.
    """
    op = meta_operands(dtype)
    head = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7))
    ref = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7), "ref_")
    tokens = ScoredTokens(op["rows"], op["labels"])
    everything, _ = head_stats_forward_launch(head, tokens, ref, StatsRequest(entropy=True, kl=True, eps=0.01))
    entropy, _ = head_stats_forward_launch(head, tokens, request=StatsRequest(entropy=True))
    return {"two heads: lp, entropy, KL, perturbed": everything, "policy entropy": entropy}
