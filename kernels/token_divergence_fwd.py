"""Forward of the token-level divergences between a policy head and a reference head (docs/math.md 12).

For every scored row, with p = softmax(z) (policy) and q = softmax(z_ref) (reference), both over
the whole vocabulary and never materialized:
    pass 1  L = LSE(z), L_ref = LSE(z_ref), online (docs/math.md 8), and for the KLs the online
            expectation E_q[z_ref - z] (forward KL) or E_p[z - z_ref] (reverse KL); with WITH_ENTROPY
            also the policy's entropy accumulator u against the policy's running max (docs/math.md 7);
    pass 2  (js, alpha, tv only) every tile pair again, normalized by the known LSEs, summed into
            D and the per-row scalar the backward needs (KL(p || m) for js, E_p[sign(p - q)] for tv).
Outputs per row, float32: divergence (clamped at 0), lse, ref_lse, aux (D itself for reverse KL
and alpha), and with WITH_ENTROPY the policy's entropy (clamped at 0). Masked logits (-inf bias
entries) follow 0 log 0 = 0 (docs/math.md 8, 12): the forward KL is +inf where the policy alone
masks an entry, the reverse KL where the reference alone does; every other value is finite. The tile helpers here
(`divergence_tile_terms`, `divergence_tile_grad`) are the formulas of `fdpo.backends.divergence`,
shared with the backward kernels.
"""

import math

import torch
import triton
import triton.language as tl

from fdpo.divergences import DivergenceSpec
from fdpo.heads import HeadInput, LMHead, ScoredTokens

from .launch import (
    BATCH_SIZED,
    Launch,
    Tiles,
    bf16_products,
    input_precision,
    interpreting,
    meta_operands,
    staged,
    tiles_for,
    widened,
)
from .tiles import (
    entropy_from,
    head_pair_tiles,
    lse_difference,
    online_expectation_update,
    online_lse_update,
    online_moments_update,
    weighted,
)
from .validate import (
    check_head_inputs,
    check_ref_head,
    head_args,
    head_flags,
    head_operands,
    heads_compute_dtype,
)

# GPU tiles of the divergence kernels by (kind, input itemsize), chosen with `python -m fdpo.kernels.aot`
# for sm_80 and sm_90 (registers and spills; tests/test_aot.py's spill limit). The forward keeps two
# fp32 logit tiles and their exponentials live, plus the second pass's mixture terms: the two-head
# tiles of the head statistics, with 16 warps for fp32 (whose FMA dots spilled up to 72 B at 8).
# The backward recomputes both tiles beside dz: 16 warps halve each thread's share of the three
# [64, 128] fp32 tiles (52 B of spills at 8 warps, bf16 sm_80); a mixed-dtype policy's backward
# (operand tiles converted to fp32 in registers) spilled 184 B there, none at 64 x 64 and 8 warps.
# The 16-bit backward takes block_d 32: with the soft cap's tanh accurate for small arguments
# (`tiles.tanh`), its ordered dW variant spilled 48 B at block_d 64 on sm_80 (16 B at 32).
# The split backward's dz kernel does the forward's work per tile and takes its tiles.
_GPU_TILES = {
    ("forward", 2): Tiles(block_n=64, block_v=128, block_d=64, num_warps=8, num_stages=3),
    ("forward", 4): Tiles(block_n=64, block_v=64, block_d=32, num_warps=16, num_stages=2),
    ("backward", 2): Tiles(block_n=64, block_v=128, block_d=32, num_warps=16, num_stages=2),
    ("backward", 4): Tiles(block_n=64, block_v=128, block_d=16, num_warps=16, num_stages=2),
    ("mixed_backward", 4): Tiles(block_n=64, block_v=64, block_d=16, num_warps=8, num_stages=2),
}


def divergence_tiles(kind: str, policy: HeadInput, ref: HeadInput) -> Tiles:
    """Tiles of the divergence kernels: kind "forward" (also the split backward's dz kernel) or
    "backward", for products formed in the heads' `heads_compute_dtype`; the "mixed_backward" tiles for the
    backward of a policy head whose float32 products read a 16-bit tensor (`launch.widened`); block_d
    shrunk for operands wider than the products (`launch.staged`). The interpreter's shared tiles
    under TRITON_INTERPRET=1."""
    dtype = heads_compute_dtype(policy, ref)
    if interpreting():
        return tiles_for("forward", dtype)
    if kind == "backward" and widened(policy):
        return _GPU_TILES[("mixed_backward", 4)]
    return staged(_GPU_TILES[(kind, dtype.itemsize)], dtype, *head_operands(policy, ref))


# The kernels' DIVERGENCE constexpr: the index of the name in fdpo.divergences.TOKEN_DIVERGENCES.
FORWARD_KL: tl.constexpr = tl.constexpr(0)
REVERSE_KL: tl.constexpr = tl.constexpr(1)
JS: tl.constexpr = tl.constexpr(2)
ALPHA: tl.constexpr = tl.constexpr(3)

# Compiled for a GPU, tl.minimum / tl.maximum return the other operand of a NaN (PTX min.f32 /
# max.f32) unless asked to propagate it; the interpreter's numpy propagates it either way. Every
# elementwise min / max of these kernels whose operand can be NaN (a NaN hidden state, weight or
# bias gives NaN logits, log-probs and LSEs) propagates it: a NaN input gives a NaN divergence and NaN
# gradients, never a finite wrong value. The online maxima (`tiles.online_lse_update`,
# `tiles.online_moments_update`) keep the GPU's NaN-dropping max: a NaN logit still reaches the
# running sum through exp(z - m') = NaN, so the row's LSE is NaN all the same (tests/test_aot.py
# allow-lists those sites, and only those).
NAN: tl.constexpr = tl.constexpr(tl.PropagateNan.ALL)


@triton.jit
def expm1(x):
    """e^x - 1 to full relative precision in fp32: the Taylor polynomial to x^9 for |x| < 1/2
    (truncation below 2e-9 relative), e^x - 1 beyond (no cancellation there). Portable: the
    interpreter and every GPU evaluate the same arithmetic."""
    r = 1.0 + x * (1.0 / 9.0)
    r = 1.0 + x * (1.0 / 8.0) * r
    r = 1.0 + x * (1.0 / 7.0) * r
    r = 1.0 + x * (1.0 / 6.0) * r
    r = 1.0 + x * (1.0 / 5.0) * r
    r = 1.0 + x * (1.0 / 4.0) * r
    r = 1.0 + x * (1.0 / 3.0) * r
    r = 1.0 + x * 0.5 * r
    return tl.where(tl.abs(x) < 0.5, x * r, tl.exp(x) - 1.0)


@triton.jit
def weighted_expm1(log_w, x):
    """w expm1(x), w = exp(log_w), for log_w + x <= 0 (docs/math.md 12): w expm1(x) for x <= 1,
    exp(log_w + x) - w above, so nothing overflows where x is large; 0 where log_w = -inf whatever x
    (a masked entry: 0 log 0 = 0, docs/math.md 8). NaN stays NaN."""
    w = tl.exp(log_w)
    small = expm1(tl.minimum(x, 1.0, propagate_nan=NAN))
    value = tl.where(x <= 1.0, w * small, tl.exp(log_w + tl.maximum(x, 1.0, propagate_nan=NAN)) - w)
    return tl.where(log_w == float("-inf"), 0.0, value)


@triton.jit
def log_mixture(logp, logq, log_keep, log_mix):
    """log m, m = (1 - beta) p + beta q, with log_keep = log(1 - beta) and log_mix = log(beta): max + log1p(e^-|diff|).
    NaN stays NaN."""
    a = logp + log_keep
    b = logq + log_mix
    hi = tl.maximum(a, b, propagate_nan=NAN)
    return hi + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def log_probs(z, lse):
    """log softmax of a tile from its row LSEs, at most 0: true for every real entry (up to rounding),
    and it keeps the garbage of masked lanes (z = 0 against a very negative LSE) from overflowing exp.
    NaN stays NaN (a NaN logit or LSE must not become log p = 0, p = 1)."""
    return tl.minimum(z - lse[:, None], 0.0, propagate_nan=NAN)


@triton.jit
def nan_sign(logp, logq):
    """sign(p - q) from the log-probs: 1, -1, or 0 where they are equal (both -inf included), and NaN
    where either is NaN (a plain comparison would give 0: a finite TV gradient of a NaN input)."""
    return tl.where(logp > logq, 1.0, tl.where(logp < logq, -1.0, tl.where(logp == logq, 0.0, float("nan"))))


@triton.jit
def divergence_tile_terms(logp, logq, param, rest, log_keep, log_mix, DIVERGENCE: tl.constexpr):
    """Per-entry (value, aux) terms of the second-pass divergences (docs/math.md 12), fp32 tiles.

    js: beta q log(q / m) + (1 - beta) p log(p / m) and p log(p / m); alpha: the expm1 form over
    q (alpha <= 1/2) or p, divided by -alpha (1 - alpha), aux 0; tv: |p - q| / 2 and p sign(p - q).
    Entries masked in either head (log p or log q = -inf) follow 0 log 0 = 0 (`tiles.weighted`,
    `weighted_expm1`): every term is finite.
    """
    p = tl.exp(logp)
    q = tl.exp(logq)
    if DIVERGENCE == JS:
        log_m = log_mixture(logp, logq, log_keep, log_mix)
        kl_pm = weighted(p, logp - log_m)
        terms = param * weighted(q, logq - log_m) + rest * kl_pm
        aux = kl_pm
    elif DIVERGENCE == ALPHA:
        d = logp - logq
        over_q = param <= 0.5
        terms = weighted_expm1(tl.where(over_q, logq, logp), tl.where(over_q, param * d, -rest * d))
        terms = terms / (-param * rest)
        aux = tl.zeros_like(terms)
    else:
        terms = 0.5 * tl.abs(p - q)
        aux = p * nan_sign(logp, logq)
    return terms, aux


@triton.jit
def divergence_tile_grad(logp, logq, value, aux, param, rest, log_keep, log_mix, DIVERGENCE: tl.constexpr):
    """dD/dz of the policy logits for a tile (docs/math.md 12), from logp, logq and the rows' D, aux [BLOCK_N].

    forward_kl p - q; reverse_kl p (d - D); js (1 - beta) p (log p - log m - KL(p || m));
    alpha -(p expm1(-(1 - alpha) d) / (1 - alpha) + alpha D p); tv p (sign(p - q) - E_p[sign]) / 2.
    0 at an entry the policy masks (p = 0; `tiles.weighted`), except the forward KL's -q, which only a
    row of D = +inf has (the caller zeroes those rows, docs/math.md 12).
    """
    p = tl.exp(logp)
    if DIVERGENCE == FORWARD_KL:
        dz = p - tl.exp(logq)
    elif DIVERGENCE == REVERSE_KL:
        dz = weighted(p, logp - logq - value[:, None])
    elif DIVERGENCE == JS:
        dz = rest * weighted(p, logp - log_mixture(logp, logq, log_keep, log_mix) - aux[:, None])
    elif DIVERGENCE == ALPHA:
        dz = -(weighted_expm1(logp, -rest * (logp - logq)) / rest + param * value[:, None] * p)
    else:
        dz = 0.5 * p * (nan_sign(logp, logq) - aux[:, None])
    return dz


# Grid: row tiles; each program sweeps the vocabulary once (KLs) or twice (js, alpha, tv), with
# no vocabulary split (pass 2 needs the final LSEs of pass 1, so a split would need a grid-wide
# barrier). Per tile: the policy and the reference logit tiles, one tl.dot chain over D each into
# fp32 accumulators, then elementwise fp32 work. Both heads' tiles and their exponentials are
# live at once: `divergence_tiles("forward")`, half the rows of the one-head forward's tiles.
@triton.jit(do_not_specialize=BATCH_SIZED)
def _token_divergence_fwd_kernel(
    h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows_ptr,
    div_ptr, lse_ptr, ref_lse_ptr, aux_ptr, ent_ptr,
    R, V, D, T, ref_D, ref_T,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
    softcap, inv_temp, ref_softcap, ref_inv_temp, param, rest, log_keep, log_mix,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, REF_COMPUTE_DTYPE: tl.constexpr,
    DIVERGENCE: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs < R
    rows = tl.load(rows_ptr + offs, mask=row_mask, other=0)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    m_ref = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s_ref = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_kl = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u_ent = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z, zr = head_pair_tiles(h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows, row_mask,
                                cols, col_mask, D, T, ref_D, ref_T,
                                stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
                                stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
                                softcap, inv_temp, ref_softcap, ref_inv_temp,
                                HAS_BIAS, HAS_SOFTCAP, REF_HAS_BIAS, REF_HAS_SOFTCAP,
                                BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE, REF_COMPUTE_DTYPE)
        z_masked = tl.where(col_mask[None, :], z, float("-inf"))
        zr_masked = tl.where(col_mask[None, :], zr, float("-inf"))
        if WITH_ENTROPY:
            # The policy's entropy, and for the reverse KL its expectation, against one running max.
            m, s, t_kl, u_ent, _ = online_moments_update(m, s, t_kl, u_ent, u_ent, z_masked, z - zr, z,
                                                         DIVERGENCE == REVERSE_KL, True, False)
        elif DIVERGENCE == REVERSE_KL:
            m, s, t_kl = online_expectation_update(m, s, t_kl, z_masked, z - zr)
        else:
            m, s = online_lse_update(m, s, z_masked)
        if DIVERGENCE == FORWARD_KL:
            m_ref, s_ref, t_kl = online_expectation_update(m_ref, s_ref, t_kl, zr_masked, zr - z)
        else:
            m_ref, s_ref = online_lse_update(m_ref, s_ref, zr_masked)
    lse = m + tl.log(s)
    ref_lse = m_ref + tl.log(s_ref)

    aux = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if DIVERGENCE == FORWARD_KL:
        value = t_kl / s_ref + lse_difference(m, s, m_ref, s_ref)
    elif DIVERGENCE == REVERSE_KL:
        value = t_kl / s + lse_difference(m_ref, s_ref, m, s)
    else:
        value = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            z, zr = head_pair_tiles(h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows, row_mask,
                                    cols, col_mask, D, T, ref_D, ref_T,
                                    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
                                    stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
                                    softcap, inv_temp, ref_softcap, ref_inv_temp,
                                    HAS_BIAS, HAS_SOFTCAP, REF_HAS_BIAS, REF_HAS_SOFTCAP,
                                    BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE, REF_COMPUTE_DTYPE)
            terms, aux_terms = divergence_tile_terms(log_probs(z, lse), log_probs(zr, ref_lse), param, rest,
                                                     log_keep, log_mix, DIVERGENCE)
            value += tl.sum(tl.where(col_mask[None, :], terms, 0.0), axis=1)
            aux += tl.sum(tl.where(col_mask[None, :], aux_terms, 0.0), axis=1)
    value = tl.maximum(value, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if DIVERGENCE == REVERSE_KL or DIVERGENCE == ALPHA:
        aux = value
    tl.store(div_ptr + offs, value, mask=row_mask)
    tl.store(lse_ptr + offs, lse, mask=row_mask)
    tl.store(ref_lse_ptr + offs, ref_lse, mask=row_mask)
    tl.store(aux_ptr + offs, aux, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(ent_ptr + offs, entropy_from(s, u_ent), mask=row_mask)


def check_divergence_heads(policy: HeadInput, ref: HeadInput, tokens: ScoredTokens) -> None:
    """Both heads as `check_head_inputs` / `check_ref_head` check them, logit scales and mixed-dtype heads
    allowed: these kernels fold a scale into the soft cap and the temperature (`divergence_head_args`),
    and multiply a head whose weight dtype differs from its hidden states' in fp32 (`tiles.dot`)."""
    check_head_inputs(policy, tokens, scaled_mixed=True)
    check_ref_head(ref, policy, tokens, scaled_mixed=True)


def check_spec(spec: DivergenceSpec) -> None:
    """`spec` must be a resolved `fdpo.divergences.DivergenceSpec` (js and alpha strictly inside (0, 1))."""
    if not isinstance(spec, DivergenceSpec):
        raise TypeError(f"spec must be an fdpo.divergences.DivergenceSpec, got {type(spec).__name__}")
    if spec.name in ("js", "alpha") and not 0.0 < spec.param < 1.0:
        raise ValueError(f"{spec.name} needs its parameter in the open interval (0, 1) (the endpoints are the KLs: "
                         f"resolve them with DivergenceSpec.of), got {spec.param!r}")


def divergence_head_args(head: HeadInput, prefix: str) -> dict:
    """A head's pointers, sizes, strides and logit scales as the divergence kernels take them, named `{prefix}...`.

    The head's logit scale s (docs/math.md 13) is folded into the soft cap and the temperature, so
    that `tiles.logit_tile` computes z = capped(s x) / T with x = h W^T + b:
        c tanh(s x / c) / T = (c / s) tanh(x / (c / s)) / (T / s),
    i.e. softcap c' = c / s and inv_temp = s / T (s / T alone without a cap). The backward's chain
    rule dz/dx = inv_temp (1 - tanh^2), tanh = z / (c' inv_temp), is then the scaled head's.
    """
    spec = head.head
    scale = float(spec.scale)
    return {**head_args(head, prefix), f"{prefix}softcap": float(spec.softcap or scale) / scale,
            f"{prefix}inv_temp": scale / spec.temperature}


def divergence_scalars(spec: DivergenceSpec) -> dict[str, float]:
    """The kernels' scalar arguments of a spec: param, rest = 1 - param, and log(1 - beta), log(beta) for js
    (0 otherwise). rest is formed here in float64: the kernels' fp32 `1 - param` would round a param
    within 6e-8 of 1 to 0 and lose the relative precision of 1 - param well before."""
    js = spec.name == "js"
    return dict(param=float(spec.param), rest=1.0 - float(spec.param), log_keep=math.log1p(-spec.param) if js else 0.0,
                log_mix=math.log(spec.param) if js else 0.0)


def token_divergence_forward_launch(policy: HeadInput, ref: HeadInput, tokens: ScoredTokens, spec: DivergenceSpec,
                                    entropy: bool = False) -> tuple[Launch, dict[str, torch.Tensor]]:
    """Build (without running) the launch of `token_divergence_forward` and allocate its outputs."""
    check_divergence_heads(policy, ref, tokens)
    check_spec(spec)
    num_rows, hidden = tokens.rows.numel(), policy.hidden
    names = ("divergence", "lse", "ref_lse", "aux", *(("entropy",) if entropy else ()))
    outputs = {name: torch.empty(num_rows, dtype=torch.float32, device=hidden.device) for name in names}
    dtype = heads_compute_dtype(policy, ref)
    tiles = divergence_tiles("forward", policy, ref)
    launch = Launch(
        _token_divergence_fwd_kernel,
        grid=(triton.cdiv(num_rows, tiles.block_n),),
        args=dict(**divergence_head_args(policy, ""), **divergence_head_args(ref, "ref_"), rows_ptr=tokens.rows,
                  div_ptr=outputs["divergence"], lse_ptr=outputs["lse"], ref_lse_ptr=outputs["ref_lse"],
                  aux_ptr=outputs["aux"], ent_ptr=outputs.get("entropy"), R=num_rows, V=policy.weight.shape[0],
                  **divergence_scalars(spec)),
        constexprs=dict(**head_flags(policy, ""), **head_flags(ref, "REF_"), DIVERGENCE=spec.code,
                        WITH_ENTROPY=entropy,
                        BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v, BLOCK_D=tiles.block_d,
                        INPUT_PRECISION=input_precision(dtype)),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return launch, outputs


def token_divergence_forward(policy: HeadInput, ref: HeadInput, tokens: ScoredTokens, spec: DivergenceSpec,
                             entropy: bool = False) -> dict[str, torch.Tensor]:
    """Per-row divergence between the policy's and the reference's next-token distributions.

    Args:
        policy: hidden [B, T, D] float16/bfloat16/float32 (any strides) with its head (weight [V, D]
            of any float dtype on the same device, bias [V] or None, softcap, temperature, logit
            scale; products in its compute dtype, `fdpo.heads.head_compute_dtype`).
        ref: the reference: hidden [B', T', D'] holding the same B*T tokens, with a head of the same
            vocabulary (a constant; its own dtypes and compute dtype).
        tokens: rows int64 [R] (flat indices into the B*T tokens), labels int32 [R] (unused here).
        spec: a resolved `fdpo.divergences.DivergenceSpec` (docs/math.md 12).
        entropy: also accumulate the policy's entropy in the first pass (docs/math.md 7, 12).

    Returns:
        dict of float32 [R]: "divergence" (>= 0), "lse", "ref_lse", "aux" (the backward's per-row scalar),
        and with `entropy` "entropy" (>= 0, log s - u / s).
    """
    launch, outputs = token_divergence_forward_launch(policy, ref, tokens, spec, entropy)
    if tokens.rows.numel():
        launch()
    return outputs


def aot_launches(dtype: torch.dtype) -> dict[str, Launch]:
    """The forward's variants on meta operands, for `fdpo.kernels.aot`: a one-pass KL and each
    second-pass divergence (both heads with bias and soft cap: the longest paths), and the policy's
    entropy beside the reverse KL's expectation and beside the JS."""
    op = meta_operands(dtype)
    head = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7))
    ref = HeadInput(op["hidden"], LMHead(op["weight"], op["bias"], softcap=30.0, temperature=0.7), "ref_")
    tokens = ScoredTokens(op["rows"], op["labels"])
    specs = (DivergenceSpec("reverse_kl"), DivergenceSpec("js", 0.5), DivergenceSpec("alpha", 0.5),
             DivergenceSpec("tv"))
    launches = {f"divergence {spec.describe()}": token_divergence_forward_launch(head, ref, tokens, spec)[0]
                for spec in specs}
    for spec in specs[:2]:
        launches[f"divergence {spec.describe()}, with entropy"] = token_divergence_forward_launch(
            head, ref, tokens, spec, entropy=True)[0]
    if dtype == torch.float32:
        # A mixed-dtype policy (bfloat16 hidden states, float32 head): fp32 products, operands cast in registers.
        mixed = HeadInput(meta_operands(torch.bfloat16)["hidden"], head.head)
        launches["divergence js, mixed-dtype policy"] = token_divergence_forward_launch(
            mixed, ref, tokens, DivergenceSpec("js", 0.5))[0]
        # Both heads' fp32 operands with bf16 products (autocast): tiles rounded to bf16 in registers.
        launches["divergence js, bf16 products"] = token_divergence_forward_launch(
            bf16_products(head), bf16_products(ref), tokens, DivergenceSpec("js", 0.5))[0]
    return launches
