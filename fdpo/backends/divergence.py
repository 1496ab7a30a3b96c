"""Token-level divergences between two heads on the "torch" and "reference" backends (docs/math.md 12).

- torch: the kernels' algorithm in chunked PyTorch. A first pass over vocabulary chunks forms both
  LSEs online (and the KLs, which are online expectations, and on request the policy's entropy);
  JS, alpha and TV then take a second pass that recomputes both logit chunks normalized by the
  known LSEs. The backward recomputes the chunks once more from the saved LSEs and per-row scalar.
  Every chunk is float32; peak memory is O(chunk rows x chunk vocabulary), never O(tokens x vocabulary).
- reference: materialized float32 logits of both heads and plain autograd (the naive baseline).

The elementwise math (`divergence_terms`, `divergence_grad`) is written once here; the Triton
kernels (`fdpo.kernels.token_divergence_fwd` / `_bwd`) evaluate the same formulas on their tiles.
"""

import math

import torch

from ..divergences import DivergenceSpec
from ..heads import HeadInput, ScoredTokens
from .chunked import (
    CHUNK_ROWS,
    HeadGradients,
    OnlineSoftmax,
    chunk_vocab,
    gather_rows,
    logit_chunk,
    weighted_,
    without_autocast,
)
from .reference import entropy_of, kl_of, logits

# The per-row float32 outputs of a divergence forward: the value, both LSEs, and the scalar the
# backward needs besides them (docs/math.md 12: D itself, KL(p || m) for JS, E_p[sign(p - q)] for TV).
DIVERGENCE_ROWS = ("divergence", "lse", "ref_lse", "aux")


def weighted_expm1(log_w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w expm1(x) with w = exp(log_w), to full relative precision, for log_w + x <= 0 (docs/math.md 12).

    w expm1(x) for x <= 1, exp(log_w + x) - w above: never overflows where x is large. 0 where
    log_w = -inf whatever x (a masked entry: 0 log 0 = 0, docs/math.md 8).
    """
    small = x <= 1.0
    w = torch.exp(log_w)
    value = torch.where(small, w * torch.expm1(x.clamp(max=1.0)), torch.exp(log_w + x.clamp(min=1.0)) - w)
    return value.masked_fill_(log_w == float("-inf"), 0.0)


def log_mixture(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """log m, m = (1 - beta) p + beta q, as a log-add-exp (0 < beta < 1)."""
    return torch.logaddexp(logp + math.log1p(-beta), logq + math.log(beta))


def nan_sign(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sign(p - q) from the log-probs: 1, -1, or 0 where they are equal (both -inf included), and NaN where
    either is NaN. torch.sign(NaN) is 0, which would give a NaN input a finite TV gradient."""
    d = logp - logq
    return torch.where((logp == logq) | ~d.isnan(), torch.sign(d), d)


def divergence_terms(logp: torch.Tensor, logq: torch.Tensor, spec: DivergenceSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-entry terms (value, aux) whose sums over the vocabulary give D and the saved scalar.

    For the second-pass divergences (js, alpha, tv) from normalized log-probs logp, logq [C, Vc]
    (float32): js (beta KL-terms of q and p against m, p log(p / m)); alpha (the expm1 form, aux
    unused: 0); tv (|p - q| / 2, p sign(p - q)). Entries masked in either head (-inf) follow
    0 log 0 = 0 (`weighted_`, `weighted_expm1`): every term is finite.
    """
    a = spec.param
    if spec.name == "js":
        log_m = log_mixture(logp, logq, a)
        kl_pm = weighted_(logp - log_m, torch.exp(logp))
        return a * weighted_(logq - log_m, torch.exp(logq)) + (1.0 - a) * kl_pm, kl_pm
    if spec.name == "alpha":
        d = logp - logq
        if a <= 0.5:
            terms = weighted_expm1(logq, a * d)
        else:
            terms = weighted_expm1(logp, -(1.0 - a) * d)
        return terms / (-a * (1.0 - a)), torch.zeros_like(terms)
    if spec.name == "tv":
        p, q = torch.exp(logp), torch.exp(logq)
        return 0.5 * (p - q).abs(), p * nan_sign(logp, logq)
    raise ValueError(f"{spec.name} is accumulated in the first pass, not by divergence_terms")


def divergence_grad(logp: torch.Tensor, logq: torch.Tensor, value: torch.Tensor, aux: torch.Tensor,
                    spec: DivergenceSpec) -> torch.Tensor:
    """dD/dz for the policy logits (docs/math.md 12), from logp, logq [C, Vc] and the rows' D and aux [C].

    0 at an entry the policy masks (p = 0, `weighted_`), except the forward KL's -q, which only a row of
    D = +inf has (`divergence_backward` zeroes those rows).
    """
    p = torch.exp(logp)
    a = spec.param
    if spec.name == "forward_kl":
        return p.sub_(torch.exp(logq))
    if spec.name == "reverse_kl":
        return weighted_(torch.sub(logp, logq).sub_(value[:, None]), p)
    if spec.name == "js":
        return weighted_(log_mixture(logp, logq, a).neg_().add_(logp).sub_(aux[:, None]), p).mul_(1.0 - a)
    if spec.name == "alpha":
        return -(weighted_expm1(logp, (a - 1.0) * (logp - logq)) / (1.0 - a) + a * value[:, None] * p)
    return 0.5 * p * (nan_sign(logp, logq) - aux[:, None])


@without_autocast
def divergence_forward(policy: HeadInput, ref: HeadInput, tokens: ScoredTokens, spec: DivergenceSpec, *,
                       entropy: bool = False) -> dict[str, torch.Tensor]:
    """float32 [R] rows of DIVERGENCE_ROWS for the scored rows of `tokens` (hidden as [B, T, D] views),
    and with `entropy` the row "entropy": the policy's entropy H >= 0 (docs/math.md 7).

    Pass 1 per row chunk: both LSEs online (OnlineSoftmax, docs/math.md 8), with the expectation of
    z_ref - z under q (forward KL) or z - z_ref under p (reverse KL), and the policy's entropy
    accumulator against the same running max. Pass 2 (js, alpha, tv): each chunk pair again,
    normalized by the LSEs, summed into D and aux.
    """
    rows, num_rows, vocab = tokens.rows, tokens.rows.numel(), policy.weight.shape[0]
    step = chunk_vocab(policy.hidden.device)
    f32 = dict(dtype=torch.float32, device=policy.hidden.device)
    names = DIVERGENCE_ROWS + (("entropy",) if entropy else ())
    out = {name: torch.zeros(num_rows, **f32) for name in names}
    for r0 in range(0, num_rows, CHUNK_ROWS):
        r1 = min(r0 + CHUNK_ROWS, num_rows)
        h, h_ref = gather_rows(policy, rows[r0:r1]), gather_rows(ref, rows[r0:r1])
        acc_p, acc_q = OnlineSoftmax(r1 - r0, h.device), OnlineSoftmax(r1 - r0, h.device)
        for v0 in range(0, vocab, step):
            v1 = min(v0 + step, vocab)
            z, zr = logit_chunk(h, policy, v0, v1), logit_chunk(h_ref, ref, v0, v1)
            acc_p.update(z, z - zr if spec.name == "reverse_kl" else None, entropy=entropy)
            acc_q.update(zr, zr - z if spec.name == "forward_kl" else None)
            del z, zr  # before the next chunk's logits are allocated
        lse, ref_lse = acc_p.lse(), acc_q.lse()
        if spec.name == "forward_kl":
            value, aux = acc_q.expectation() + acc_p.lse_minus(acc_q), torch.zeros_like(lse)
        elif spec.name == "reverse_kl":
            value, aux = acc_p.expectation() + acc_q.lse_minus(acc_p), torch.zeros_like(lse)
        else:
            value, aux = torch.zeros_like(lse), torch.zeros_like(lse)
            for v0 in range(0, vocab, step):
                v1 = min(v0 + step, vocab)
                logp = logit_chunk(h, policy, v0, v1).sub_(lse[:, None]).clamp_(max=0.0)
                logq = logit_chunk(h_ref, ref, v0, v1).sub_(ref_lse[:, None]).clamp_(max=0.0)
                terms, aux_terms = divergence_terms(logp, logq, spec)
                value += terms.sum(dim=1)
                aux += aux_terms.sum(dim=1)
                del logp, logq, terms, aux_terms
        value = value.clamp(min=0.0)
        out["divergence"][r0:r1], out["lse"][r0:r1], out["ref_lse"][r0:r1] = value, lse, ref_lse
        out["aux"][r0:r1] = value if spec.name in ("reverse_kl", "alpha") else aux
        if entropy:
            out["entropy"][r0:r1] = acc_p.entropy()
    return out


@without_autocast
def divergence_backward(policy: HeadInput, ref: HeadInput, tokens: ScoredTokens, spec: DivergenceSpec,
                        saved: dict[str, torch.Tensor], grad: torch.Tensor, *, need_hidden: bool = True,
                        need_weight: bool = True, need_bias: bool = False
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d_hidden float32 [R, D], d_weight [V, D], d_bias [V]) of sum_r grad_r D_r, policy side only.

    saved: the forward's "lse", "ref_lse", "divergence" and "aux" rows. Each chunk pair is recomputed,
    dz = grad dD/dz (`divergence_grad`), carried back to the head by `fdpo.backends.chunked.HeadGradients`.
    A row whose D is +inf (a KL where one head masks an entry the other does not) is a constant:
    dz = 0 (docs/math.md 12). Fixed chunk order: deterministic.
    """
    rows, vocab, step = tokens.rows, policy.weight.shape[0], chunk_vocab(policy.hidden.device)
    infinite = saved["divergence"] == float("inf")
    out = HeadGradients(policy, rows.numel(), need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
    for r0 in range(0, rows.numel(), CHUNK_ROWS):
        r1 = min(r0 + CHUNK_ROWS, rows.numel())
        h, h_ref = gather_rows(policy, rows[r0:r1]), gather_rows(ref, rows[r0:r1])
        lse, ref_lse = saved["lse"][r0:r1, None], saved["ref_lse"][r0:r1, None]
        for v0 in range(0, vocab, step):
            v1 = min(v0 + step, vocab)
            z = logit_chunk(h, policy, v0, v1)
            logq = logit_chunk(h_ref, ref, v0, v1).sub_(ref_lse).clamp_(max=0.0)
            dz = divergence_grad(torch.sub(z, lse).clamp_(max=0.0), logq, saved["divergence"][r0:r1],
                                 saved["aux"][r0:r1], spec)
            dz *= grad[r0:r1, None]
            dz.masked_fill_(infinite[r0:r1, None], 0.0)
            out.add(dz, z, h, r0, r1, v0, v1)
            del z, logq, dz  # before the next chunk's logits are allocated
    return out.result()


def reference_divergence(policy: HeadInput, ref: HeadInput, spec: DivergenceSpec, *,
                         entropy: bool = False) -> dict[str, torch.Tensor]:
    """float32 [...] per-token "divergence" from the materialized logits of both heads, by autograd,
    and with `entropy` the policy's "entropy" -sum_v p_v log p_v of the same logits, detached.

    The naive formulas of docs/math.md 12 on log-softmax values (the power sum of alpha as it is
    written, which loses precision near alpha = 0 and 1), with 0 log 0 = 0 at masked logits and a
    +inf KL a constant (`fdpo.backends.reference.kl_of`, docs/math.md 8); differentiable in the
    policy only when `ref` is detached. Clamped at 0 like the fused backends.
    """
    logp = torch.log_softmax(logits(policy), dim=-1)
    logq = torch.log_softmax(logits(ref), dim=-1)
    a = spec.param
    if spec.name == "forward_kl":
        value = kl_of(logq, logp)
    elif spec.name == "reverse_kl":
        value = kl_of(logp, logq)
    elif spec.name == "js":
        # An entry both heads mask has m = 0: log m = -inf, with no NaN in logaddexp's gradient.
        empty = (logp == float("-inf")) & (logq == float("-inf"))
        log_m = log_mixture(logp.masked_fill(empty, 0.0), logq.masked_fill(empty, 0.0), a).masked_fill(empty,
                                                                                                     float("-inf"))
        value = a * kl_of(logq, log_m) + (1.0 - a) * kl_of(logp, log_m)
    elif spec.name == "alpha":
        value = (1.0 - torch.exp(a * logp + (1.0 - a) * logq).sum(-1)) / (a * (1.0 - a))
    else:
        # |p - q| as (p - q) sign(p - q), the sign a constant: abs's autograd would take sign(NaN) = 0,
        # a finite gradient of a NaN reference; `nan_sign` keeps it NaN.
        value = 0.5 * ((logp.exp() - logq.exp()) * nan_sign(logp, logq).detach()).sum(-1)
    out = {"divergence": value.clamp(min=0.0)}
    if entropy:
        out["entropy"] = entropy_of(logp.detach())
    return out
