"""Independent float64 references for the tests: they materialize the logits, as docs/math.md writes them.

Nothing here calls fdpo: every fused result is checked against plain float64 PyTorch, and every
gradient against float64 autograd through that plain computation.
"""

import torch


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


def token_stats64(hidden, weight, labels, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                  ignore_index=-100, softcap=None, ref_softcap=None, temperature=1.0, eps=0.1):
    """float64 per-token statistics of docs/math.md 5-7 from both materialized logit tensors.

    logprob, entropy = -sum p log p, and with a reference: ref_logprob, kl = sum p_ref (log p_ref -
    log p), logprob_plus / logprob_minus of (1 +- eps) z -+ eps z_ref. 0 where labels == ignore_index.
    """
    ignored = labels == ignore_index
    safe = labels.masked_fill(ignored, 0).long().unsqueeze(-1)

    def pick(logp):
        return logp.gather(-1, safe).squeeze(-1).masked_fill(ignored, 0.0)

    z = logits64(hidden, weight, bias, softcap, temperature)
    logp = torch.log_softmax(z, dim=-1)
    out = {"logprob": pick(logp), "entropy": (-(logp.exp() * logp).sum(-1)).masked_fill(ignored, 0.0)}
    if ref_hidden is not None:
        z_ref = logits64(ref_hidden, ref_weight, ref_bias, ref_softcap, temperature)
        ref_logp = torch.log_softmax(z_ref, dim=-1)
        out["ref_logprob"] = pick(ref_logp)
        out["kl"] = (ref_logp.exp() * (ref_logp - logp)).sum(-1).masked_fill(ignored, 0.0)
        out["logprob_plus"] = pick(torch.log_softmax((1 + eps) * z - eps * z_ref, dim=-1))
        out["logprob_minus"] = pick(torch.log_softmax((1 - eps) * z + eps * z_ref, dim=-1))
    return out
