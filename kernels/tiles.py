"""Shared `@triton.jit` building blocks of the fused LM-head kernels.

Every kernel in this package works on one [BLOCK_N, BLOCK_V] tile of logits at a time: rows are
(non-ignored) tokens, columns are vocabulary entries. The helpers here load such a tile from the
hidden states and the head weight, keep the online log-sum-exp over vocabulary tiles, and form the
gradient of a log-prob with respect to the tile. Everything is accumulated in fp32 whatever the
input dtype; pointers are offset in int64 so that N*D, V*D and N*V may exceed 2**31. The operands of
every product are rounded in registers to the head's compute dtype, a constexpr (`COMPUTE_DTYPE`, a
Triton dtype) the launchers pass for each head (`validate.head_flags`; `dot`, `compute_cast`;
docs/math.md 13): float32 tiles of a head computed in bfloat16 reach the tensor cores as bfloat16.
"""

import triton
import triton.language as tl
from triton import knobs

# Whether `triton.jit` built the kernels of this package for Triton's CPU interpreter (TRITON_INTERPRET=1
# when they were imported): it decides this from the same knob, once, at decoration.
INTERPRETED = bool(knobs.runtime.interpret)

# Triton's CPU interpreter stores bfloat16 as raw uint16 and its tl.dot multiplies those bit
# patterns (triton-lang/triton#11584; its debugging guide says to convert bfloat16 to float32
# there); its float32 -> bfloat16 conversion truncates, where the GPU rounds to nearest even.
# Under the interpreter only, `dot` rounds its operands to the compute dtype (`interpreter_round`,
# round to nearest even as on the GPU) and then widens them to fp32. Products of 16-bit floats are
# exact in fp32, as on the tensor cores, so the interpreted result is the one the GPU computes up
# to summation order; compiled kernels never see this branch.
WIDEN_DOT_OPERANDS = tl.constexpr(INTERPRETED)

# The most negative finite float32: the stand-in for a masked (-inf) logit where a difference of two
# logits must stay defined (the perturbed logits' z_ref, docs/math.md 8).
FLOAT32_MIN = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def interpreter_round(x, COMPUTE_DTYPE: tl.constexpr):
    """x rounded to nearest even in COMPUTE_DTYPE, returned as the fp32 holding that value exactly
    (interpreter only, see WIDEN_DOT_OPERANDS). The interpreter's own bfloat16 conversions are wrong
    for subnormals both ways, so bfloat16 is handled on the bit patterns: widened as the top half of
    an fp32, rounded by adding half an ulp (ties to even) and keeping the top 16 bits. A NaN becomes
    the canonical NaN (the carry of a low-bit payload would reach the exponent: inf, or the sign)."""
    if x.dtype == tl.bfloat16:
        x = (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    if COMPUTE_DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, float("nan"), bits.to(tl.float32, bitcast=True))
    elif COMPUTE_DTYPE == tl.float16:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def dot(a, b, acc, INPUT_PRECISION: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """acc + a @ b with an fp32 result, both operands rounded to COMPUTE_DTYPE first (a no-op for an
    operand already in it; see WIDEN_DOT_OPERANDS for the interpreter)."""
    if WIDEN_DOT_OPERANDS:
        a = interpreter_round(a, COMPUTE_DTYPE)
        b = interpreter_round(b, COMPUTE_DTYPE)
    else:
        a = a.to(COMPUTE_DTYPE)
        b = b.to(COMPUTE_DTYPE)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def compute_cast(x, COMPUTE_DTYPE: tl.constexpr):
    """x rounded to the head's compute dtype COMPUTE_DTYPE (to nearest even, in the interpreter too:
    there a bfloat16 is built from the rounded value's top 16 bits, see `interpreter_round`)."""
    if WIDEN_DOT_OPERANDS:
        x = interpreter_round(x, COMPUTE_DTYPE)
        if COMPUTE_DTYPE == tl.bfloat16:
            return (x.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(COMPUTE_DTYPE)


@triton.jit
def hidden_row_offsets(rows, T, stride_hb, stride_ht):
    """Element offsets (int64) of the hidden-state rows `rows` of a [B, T, D] strided tensor.

    Rows are flat indices into the logical [B, T] leading shape, so a view such as
    `hidden[:, :-1]` is read in place: row r lives at (r // T) * stride_b + (r % T) * stride_t.
    """
    rows = rows.to(tl.int64)
    b = rows // T
    return b * stride_hb + (rows - b * T) * stride_ht


@triton.jit
def log1p(x):
    """log(1 + x) for x > -1, accurate for tiny x: log(u) * x / (u - 1) with u = 1 + x (Goldberg).

    The ratio x / (u - 1) corrects the rounding of u = 1 + x, so log1p(1e-10) is 1e-10, not 0.
    """
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * (x / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def expm1(x):
    """exp(x) - 1, accurate for tiny x: (u - 1) * x / log(u) with u = exp(x) (Kahan).

    Exact x where u rounds to 1. Kahan's correction needs log(u) of a normal u; for x < -1,
    u - 1 has no cancellation (and is -1 where u is subnormal or underflows), so it is used as is.
    x must keep exp(x) finite. NaN stays NaN.
    """
    u = tl.exp(x)
    kahan = (u != 1.0) & (x >= -1.0)
    ratio = x / tl.log(tl.where(kahan, u, 2.0))
    return tl.where(kahan, (u - 1.0) * ratio, tl.where(u == 1.0, x, u - 1.0))


@triton.jit
def tanh(x):
    """tanh to a few ulps of relative precision for every x, and odd: the odd Taylor polynomial to x^13
    for |x| < 0.4 (truncation about 4e-9 relative), sign(x) (1 - 2 / (exp(2|x|) + 1)) beyond, where
    tanh > 0.38 bounds its relative error by ~3 ulps (on x itself, 1 - 2 / (exp(2x) + 1) for x < 0
    subtracts a number in (1, 1.38), whose ulp is 4x tanh's: ~6 ulps); saturates to +-1 without
    overflow; NaN stays NaN.

    The soft cap c tanh(z / c) (docs/math.md 0) is ~z for |z| << c, so tanh must keep its relative
    precision for small arguments: 1 - 2 / (exp(2x) + 1) alone has an absolute error of ~6e-8 whatever
    x, i.e. ~c 6e-8 on the capped logit (1e-3 at c = 1e4), where the logit itself rounds to ~z 6e-8.
    sign(x) e / (e + 2) with e = `expm1`(2|x|) is as accurate, but its extra live values per tile entry
    (and the fp32 log of Kahan's expm1) made the logit-tile kernels spill up to 632 B, past
    tests/test_aot.py's limit; this form spills about as the plain one did (the 16-bit divergence
    backward took a smaller block_d for it: `token_divergence_fwd._GPU_TILES`).
    """
    x2 = x * x
    p = x2 * (21844.0 / 6081075.0) - 1382.0 / 155925.0
    p = x2 * p + 62.0 / 2835.0
    p = x2 * p - 17.0 / 315.0
    p = x2 * p + 2.0 / 15.0
    p = x2 * p - 1.0 / 3.0
    ax = tl.abs(x)
    far = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    return tl.where(ax < 0.4, x + x * (x2 * p), tl.where(x < 0.0, -far, far))


@triton.jit
def logit_tile(
    h_ptr, h_offs, row_mask,
    w_ptr, cols, col_mask,
    b_ptr, D,
    stride_hd, stride_wv, stride_wd,
    softcap, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, scale=1.0,
):
    """z[BLOCK_N, BLOCK_V] = capped(scale * (h[rows] @ w[cols]^T + b[cols])) / temperature, in fp32.

    The product is accumulated over D in chunks of BLOCK_D with `tl.dot` of operand tiles rounded to
    COMPUTE_DTYPE (tensor cores for a 16-bit compute dtype); the bias is added in fp32. Out-of-range
    rows and columns read zeros: callers mask them out of whatever they reduce. `scale` multiplies the raw logits, bias included, before
    the cap (docs/math.md 13); `softcap` c gives c * tanh(z / c) (Gemma-2 style); `inv_temp` is
    1 / temperature.
    """
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    w_cols = cols.to(tl.int64) * stride_wv
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_mask = ks < D
        ks = ks.to(tl.int64)
        h = tl.load(h_ptr + h_offs[:, None] + ks[None, :] * stride_hd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_t = tl.load(w_ptr + w_cols[None, :] + ks[:, None] * stride_wd,
                      mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = dot(h, w_t, acc, INPUT_PRECISION, COMPUTE_DTYPE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    acc = acc * scale
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc * inv_temp


@triton.jit
def head_pair_tiles(
    h_ptr, w_ptr, b_ptr, ref_h_ptr, ref_w_ptr, ref_b_ptr, rows, row_mask, cols, col_mask,
    D, T, ref_D, ref_T,
    stride_hb, stride_ht, stride_hd, stride_wv, stride_wd,
    stride_ref_hb, stride_ref_ht, stride_ref_hd, stride_ref_wv, stride_ref_wd,
    softcap, inv_temp, ref_softcap, ref_inv_temp,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, REF_HAS_BIAS: tl.constexpr, REF_HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, REF_COMPUTE_DTYPE: tl.constexpr,
    scale=1.0, ref_scale=1.0, HAS_REF: tl.constexpr = True,
):
    """(z, z_ref): the policy's and the reference's `logit_tile` of the same tokens and columns, in fp32.

    `rows` are flat indices into the [B, T] tokens of either head's hidden states (`hidden_row_offsets`
    with each head's T and strides); each head has its own weight, bias, D, soft cap, 1 / temperature
    and logit scale. The reference's row offsets are formed after the policy tile, so that they are
    not live across its dot chain. Without HAS_REF the reference is not read and z_ref is z.
    """
    z = logit_tile(h_ptr, hidden_row_offsets(rows, T, stride_hb, stride_ht), row_mask, w_ptr, cols, col_mask,
                   b_ptr, D, stride_hd, stride_wv, stride_wd, softcap, inv_temp,
                   HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE, scale)
    z_ref = z
    if HAS_REF:
        z_ref = logit_tile(ref_h_ptr, hidden_row_offsets(rows, ref_T, stride_ref_hb, stride_ref_ht), row_mask,
                           ref_w_ptr, cols, col_mask, ref_b_ptr, ref_D, stride_ref_hd, stride_ref_wv, stride_ref_wd,
                           ref_softcap, ref_inv_temp, REF_HAS_BIAS, REF_HAS_SOFTCAP,
                           BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, REF_COMPUTE_DTYPE, ref_scale)
    return z, z_ref


@triton.jit
def weighted(w, x):
    """w * x, and 0 wherever the weight w is 0 whatever x is: the convention 0 log 0 = 0 (docs/math.md 8).

    A masked logit (-inf, from a -inf bias entry) has weight e^(-inf) = 0 beside an infinite or NaN
    x (z - m = -inf, -inf - -inf); a weight that underflowed to 0 gives 0 either way, so finite
    entries are unchanged. A NaN weight stays NaN.
    """
    return tl.where(w == 0.0, 0.0, w * x)


@triton.jit
def exponent_offset(m):
    """The running max m [BLOCK_N] as the offset of the exponentials e^(z - m): m itself, or 0 while
    every logit of the row so far is -inf (a tile of masked logits before any other), where z - m
    would be -inf - -inf = NaN instead of -inf (docs/math.md 8)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_lse_update(m, s, z):
    """One vocabulary tile of the online log-sum-exp (docs/math.md 8).

    m [BLOCK_N]: running max, s: running sum of exp(z - m). Masked columns must hold -inf; a row may
    hold nothing but -inf in a tile (a vocabulary mask): s stays 0 and m -inf until a finite logit.
    Returns the updated (m, s); at the end LSE = m + log(s).
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    offset = exponent_offset(m_new)
    s = s * tl.exp(m - offset) + tl.sum(tl.exp(z - offset[:, None]), axis=1)
    return m_new, s


@triton.jit
def lse_difference(m, s, m_other, s_other):
    """LSE - LSE_other of two online log-sum-exps (m, s as `online_lse_update` leaves them) without
    rounding either LSE: (m - m_other) + log(s / s_other). For two nearly equal heads the maxima are
    nearly equal logits (their difference is exact) and s / s_other is near 1, so the result is exact to
    a few ulps of itself and of 1; m + log(s) - (m_other + log(s_other)) is off by ulps of the LSEs
    (about 4e-6 at |LSE| = 55), which swamps a KL of that size (docs/math.md 6)."""
    return (m - m_other) + tl.log(s / s_other)


@triton.jit
def label_logit(z, cols, labels):
    """z[row, labels[row]] where the label falls inside this tile's columns, else 0."""
    hit = cols[None, :] == labels[:, None]
    return tl.sum(tl.where(hit, z, 0.0), axis=1)


@triton.jit
def online_moments_update(m, s, t, u, q, z, x, z_values,
                          EXPECTATION: tl.constexpr, ENTROPY: tl.constexpr, SQUARES: tl.constexpr):
    """One vocabulary tile of an online softmax p = softmax(z): `online_lse_update`'s (m, s), and t, u, q
    against the same running max m (docs/math.md 8).

    EXPECTATION: t = sum exp(z - m) x, rescaled by e^(m - m') when the max grows to m'; at the end
    E_p[x] = t / s. Masked columns must hold z = -inf (their weight is 0).
    ENTROPY: u = sum exp(z - m) (z - m) <= 0, in a form that never cancels. When the max grows from
    m to m': u <- e^(m - m') (u + (m - m') s), both terms <= 0. At the end H = log(s) - u / s
    (`entropy_from`), a sum of two non-negative terms, where lse - E_p[z] would lose ~|z| * 2^-24
    to cancellation (docs/math.md 7, 8).
    SQUARES: q = sum exp(2 (z - m)), rescaled by the square of e^(m - m'); at the end
    log sum p^2 = log(q) - 2 log(s) (docs/math.md 13).
    Masked columns must hold z = -inf; `z_values` is the unmasked tile. An entry of weight 0 adds
    nothing to t and u whatever its x or z (`weighted`: 0 log 0 = 0, so a -inf logit of a vocabulary
    mask gives no NaN), and a row may hold nothing but -inf in a tile (`exponent_offset`). An entry
    of weight > 0 with x = +inf (the other head masks it) makes t, and E_p[x], +inf.
    Returns the updated (m, s, t, u, q); t, u and q are passed through when not asked for.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    offset = exponent_offset(m_new)
    scale = tl.exp(m - offset)
    e = tl.exp(z - offset[:, None])
    if ENTROPY:
        # Nothing to carry before the first finite logit (s = 0 and m = -inf: (m - m') s would be -inf * 0).
        carried = u + tl.where(s > 0.0, m - m_new, 0.0) * s
        u = carried * scale + tl.sum(weighted(e, z_values - offset[:, None]), axis=1)
    if SQUARES:
        q = q * (scale * scale) + tl.sum(e * e, axis=1)
    s = s * scale + tl.sum(e, axis=1)
    if EXPECTATION:
        t = t * scale + tl.sum(weighted(e, x), axis=1)
    return m_new, s, t, u, q


@triton.jit
def online_expectation_update(m, s, t, z, x):
    """One vocabulary tile of an online softmax expectation E_p[x], p = softmax(z) (docs/math.md 8):
    `online_moments_update` with EXPECTATION only. Returns the updated (m, s, t)."""
    m, s, t, _, _ = online_moments_update(m, s, t, s, s, z, x, z, True, False, False)
    return m, s, t


@triton.jit
def online_softmax_update(m, s, u, q, z, z_values, ENTROPY: tl.constexpr, SQUARES: tl.constexpr):
    """One vocabulary tile of the policy's online softmax: `online_moments_update` without the
    expectation. Returns the updated (m, s, u, q); u and q are passed through when not asked for."""
    m, s, _, u, q = online_moments_update(m, s, s, u, q, z, z, z_values, False, ENTROPY, SQUARES)
    return m, s, u, q


@triton.jit
def max_before_label(b, z, cols, labels):
    """b <- max(b, max of z[row, v] over this tile's columns v < labels[row]) (is_top1, docs/math.md 13).

    Masked columns must hold z = -inf.
    """
    return tl.maximum(b, tl.max(tl.where(cols[None, :] < labels[:, None], z, float("-inf")), axis=1))


@triton.jit
def entropy_from(s, u):
    """H = log(s) - u / s from `online_softmax_update`'s sums, clamped at 0 against rounding; NaN stays NaN."""
    return tl.maximum(tl.log(s) - u / s, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def policy_tile_grad(
    z, zr, cols, tile_mask, labels, lse, g_lp, ref_lse, g_kl, entropy, g_ent,
    softcap, inv_temp, scale,
    HAS_SOFTCAP: tl.constexpr, KL: tl.constexpr, ENTROPY: tl.constexpr,
):
    """dL/d(raw policy logits) of a tile for L = sum_rows g_lp lp + g_kl KL(ref || policy) + g_ent H.

    With p = exp(z - lse) recomputed from the saved LSE (docs/math.md 1, 6, 7):
        d lp / dz = onehot(label) - p,   d KL / dz = p - p_ref,   d H / dz = -p (z - lse + H),
    p_ref = exp(zr - ref_lse) from the reference tile zr (read only when KL). Then through the
    temperature (* 1/T), the soft cap (* 1 - tanh^2, where tanh = z*T / c) and the logit scale
    (* scale, docs/math.md 13). Entries outside `tile_mask` are exactly 0 (their z may be garbage).
    A masked logit (z = -inf, p = 0) gets 0 from every term but the log-prob's onehot (`weighted`;
    a row whose KL is +inf comes with g_kl = 0, docs/math.md 8).
    """
    p = tl.exp(z - lse[:, None])
    onehot = cols[None, :] == labels[:, None]
    dz = g_lp[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    if KL:
        dz += g_kl[:, None] * (p - tl.exp(zr - ref_lse[:, None]))
    if ENTROPY:
        dz -= g_ent[:, None] * weighted(p, z - lse[:, None] + entropy[:, None])
    dz = dz * inv_temp
    if HAS_SOFTCAP:
        t = z / (softcap * inv_temp)
        dz = dz * (1.0 - t * t)
    return tl.where(tile_mask, dz * scale, 0.0)


@triton.jit
def grouped_tile(pid, num_n, num_v, GROUP_N: tl.constexpr):
    """Map a flat program id to (tile_n, tile_v), walking GROUP_N row tiles per vocabulary tile.

    Consecutive programs then share the same weight tile (read once into L2) and a small set of
    hidden-state tiles, as in the Triton matmul tutorial's grouped ordering.
    """
    per_group = GROUP_N * num_v
    group = pid // per_group
    first_n = group * GROUP_N
    group_rows = tl.minimum(num_n - first_n, GROUP_N)
    tile_n = first_n + (pid % per_group) % group_rows
    tile_v = (pid % per_group) // group_rows
    return tile_n, tile_v


@triton.jit
def backward_tile(own, step, num_n, num_v, ORDERED: tl.constexpr, WEIGHT_SIDE: tl.constexpr, GROUP_N: tl.constexpr):
    """(tile_n, tile_v) of step `step` of the backward program `own`, in the tile-gradient kernels' two schedules.

    ORDERED: the program owns one row tile (sweeping the vocabulary tiles) or, WEIGHT_SIDE, one
    vocabulary tile (sweeping the row tiles); otherwise one tile pair per program in grouped order.
    """
    if ORDERED:
        tile_n = step if WEIGHT_SIDE else own
        tile_v = own if WEIGHT_SIDE else step
    else:
        tile_n, tile_v = grouped_tile(own, num_n, num_v, GROUP_N)
    return tile_n, tile_v


@triton.jit
def backward_steps(num_n, num_v, ORDERED: tl.constexpr, WEIGHT_SIDE: tl.constexpr):
    """How many steps a backward program of `backward_tile`'s schedules takes: 1 tile pair in grouped
    order; ORDERED, the num_n row tiles (WEIGHT_SIDE) or the num_v vocabulary tiles it sweeps."""
    steps = 1
    if ORDERED:
        steps = num_n if WEIGHT_SIDE else num_v
    return steps


@triton.jit
def add_to(ptrs, value, mask, ATOMIC: tl.constexpr):
    """ptrs += value: an fp32 atomic add, or a plain read-modify-write for a single writer."""
    if ATOMIC:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def add_product(
    a, src_ptr, src_offs, src_mask, stride_k, dst_ptr, dst_offs, dst_mask, D,
    ATOMIC: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    """dst[dst_offs + k] += (a @ src[src_offs + k * stride_k]) for k < D, in BLOCK_D chunks.

    a [M, K] has the head's compute dtype COMPUTE_DTYPE (`compute_cast`; `dot` rounds each src tile
    to it); src_offs [K] and dst_offs [M] are int64 element offsets of the rows, masked by src_mask
    and dst_mask.
    """
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_mask = ks < D
        ks = ks.to(tl.int64)
        src = tl.load(src_ptr + src_offs[:, None] + ks[None, :] * stride_k,
                      mask=src_mask[:, None] & k_mask[None, :], other=0.0)
        add_to(dst_ptr + dst_offs[:, None] + ks[None, :], dot(a, src, None, INPUT_PRECISION, COMPUTE_DTYPE),
               dst_mask[:, None] & k_mask[None, :], ATOMIC)


@triton.jit
def add_hidden_grad(
    dz, offs, row_mask, w_ptr, cols, col_mask, dh_ptr, D, stride_wv, stride_wd,
    ATOMIC: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    """dh[offs, :] += dz @ W[cols, :] (dz and the weight tiles rounded to the head's COMPUTE_DTYPE)."""
    add_product(compute_cast(dz, COMPUTE_DTYPE), w_ptr, cols.to(tl.int64) * stride_wv, col_mask, stride_wd,
                dh_ptr, offs.to(tl.int64) * D, row_mask, D, ATOMIC, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE)


@triton.jit
def add_weight_grad(
    dz, h_ptr, h_offs, row_mask, cols, col_mask, dw_ptr, D, stride_hd,
    ATOMIC: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
):
    """dw[cols, :] += dz^T @ H[rows, :] (dz and the hidden-state tiles rounded to the head's COMPUTE_DTYPE)."""
    add_product(tl.trans(compute_cast(dz, COMPUTE_DTYPE)), h_ptr, h_offs, row_mask, stride_hd,
                dw_ptr, cols.to(tl.int64) * D, col_mask, D, ATOMIC, BLOCK_D, INPUT_PRECISION, COMPUTE_DTYPE)
