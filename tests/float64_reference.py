"""Independent float64 references for the tests: they materialize the logits, as docs/math.md writes them.

Nothing here calls fdpo: every fused result is checked against plain float64 PyTorch, and every
gradient against float64 autograd through that plain computation.
"""

import torch

INF = float("inf")


def logits64(hidden, weight, bias=None, softcap=None, temperature=1.0):
    """float64 z = capped(h W^T + b) / T for hidden [..., D] (any leading shape)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def token_logprobs64(hidden, weight, labels, bias=None, ignore_index=-100, softcap=None, temperature=1.0):
    """float64 log p(label) per token, 0 where labels == ignore_index."""
    logp = torch.log_softmax(logits64(hidden, weight, bias, softcap, temperature), dim=-1)
    ignored = labels == ignore_index
    picked = logp.gather(-1, labels.masked_fill(ignored, 0).long().unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def leaf64(t):
    """A float64 leaf copy of t that requires grad (or None)."""
    return None if t is None else t.detach().double().requires_grad_(True)


def relative_error(got, want) -> float:
    """||got - want|| / ||want|| in float64 (absolute when want is all zeros)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want.norm().item()
    return (got - want).norm().item() / (scale if scale > 0 else 1.0)


def assert_close(got, want, rel: float, what: str) -> None:
    """Norm-wise relative comparison, with the error in the message; NaN never passes."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = relative_error(got, want)
    assert err <= rel, f"{what}: relative error {err:.3e} > {rel:.1e}"


def expectation64(log_w, x):
    """sum_v w_v x_v over the last dim, w = exp(log_w), with the convention 0 * x = 0 of 0 log 0 = 0
    (docs/math.md 8): an entry of weight 0 (log_w = -inf, a masked logit) adds nothing, whatever its x
    (-inf, +inf, or the NaN of -inf - -inf). An entry of weight > 0 with x = +inf makes the sum +inf,
    a constant: it is +inf for every finite parameter nearby, so its gradient is 0. Written with
    `masked_fill` on both factors, so that autograd never forms 0 * inf either."""
    skip_zero = log_w == -INF
    infinite = ~skip_zero & (x == INF)
    skip = skip_zero | infinite
    terms = log_w.masked_fill(skip, 0.0).exp() * x.masked_fill(skip, 0.0)
    return terms.masked_fill(skip, 0.0).sum(-1).masked_fill(infinite.any(-1), INF)


def kl64(log_a, log_b):
    """KL(a || b) = sum_v a_v (log a_v - log b_v) of two log-distributions over the last dim, under 0 log 0 = 0:
    +inf (with zero gradient) where some b_v = 0 < a_v."""
    return expectation64(log_a, log_a - log_b)


def entropy64(logp):
    """-sum_v p_v log p_v over the last dim, under 0 log 0 = 0."""
    return -expectation64(logp, logp)


def assert_close_extended(got, want, rel: float, what: str) -> None:
    """`assert_close` for values that may be infinite: the same entries +inf, and -inf, in both, none NaN,
    the finite entries compared norm-wise."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert not torch.isnan(got).any(), f"{what}: NaN values"
    assert not torch.isnan(want).any(), f"{what}: NaN in the reference"
    want = want.to(got.device)
    for sign, test in (("+", torch.isposinf), ("-", torch.isneginf)):
        assert torch.equal(test(got), test(want)), f"{what}: {sign}inf at other entries than the reference's"
    finite = want.isfinite()
    assert_close(got[finite], want[finite], rel, what)


def token_stats64(hidden, weight, labels, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                  ignore_index=-100, softcap=None, ref_softcap=None, temperature=1.0, eps=0.1):
    """float64 per-token statistics of docs/math.md 5-7 from both materialized logit tensors.

    logprob, entropy = -sum p log p, and with a reference: ref_logprob, kl = sum p_ref (log p_ref -
    log p), logprob_plus / logprob_minus of (1 +- eps) z -+ eps z_ref. 0 where labels == ignore_index.
    Masked (-inf) logits follow 0 log 0 = 0 (`expectation64`); (1 + eps) z - eps z_ref reads a masked
    z_ref as the most negative float32, and is +inf on paper where the reference alone masks an entry:
    lp+ is -inf there (docs/math.md 8).
    """
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0).long().unsqueeze(-1)

    def pick(logp):
        return logp.gather(-1, safe).squeeze(-1).masked_fill(ignored, 0.0)

    z = logits64(hidden, weight, bias, softcap, temperature)
    logp = torch.log_softmax(z, dim=-1)
    out = {"logprob": pick(logp), "entropy": entropy64(logp).masked_fill(ignored, 0.0)}
    if ref_hidden is not None:
        z_ref = logits64(ref_hidden, ref_weight, ref_bias, ref_softcap, temperature)
        ref_logp = torch.log_softmax(z_ref, dim=-1)
        out["ref_logprob"] = pick(ref_logp)
        out["kl"] = kl64(ref_logp, logp).masked_fill(ignored, 0.0)
        z_plus = (1 + eps) * z - eps * z_ref.clamp(min=torch.finfo(torch.float32).min)
        out["logprob_plus"] = pick(torch.log_softmax(z_plus, dim=-1))
        if eps > 0:  # z+ = +inf where the reference alone masks an entry: lp+ = -inf
            alone = ((z_ref == float("-inf")) & (z > float("-inf"))).any(-1)
            out["logprob_plus"] = out["logprob_plus"].masked_fill(alone & (labels != ignore_index), float("-inf"))
        out["logprob_minus"] = pick(torch.log_softmax((1 - eps) * z + eps * z_ref, dim=-1))
    return out
