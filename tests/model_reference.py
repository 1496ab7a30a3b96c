"""float64 references from a Hugging Face model's own logits, for the trainer's model-adapter tests."""

import copy

import torch

from fdpo.train import CausalLM


def batch(vocab: int, seed: int = 0, rows: int = 3, width: int = 11, top: int = 0):
    """(ids [rows, width], labels [rows, width], attention mask [rows, width]): random token ids in
    [3, vocab - top), the first 4 positions prompt (-100), row 1 shorter (ignored from 7, padded from 8)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - top, (rows, width + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, :4] = -100                    # prompt tokens
    labels[1, 7:] = -100                    # a shorter row
    mask = torch.ones(rows, width, dtype=torch.int64)
    mask[1, 8:] = 0
    return ids[:, :-1], labels, mask


def model_logits(model: torch.nn.Module, ids, mask) -> torch.Tensor:
    """The model's own logits in float64 [B, T, V]."""
    return model(input_ids=ids, attention_mask=mask).logits.double()


def model_logprobs(model: torch.nn.Module, ids, labels, mask) -> torch.Tensor:
    """The model's own log-probs of `labels` in float64 [B, T] (0 where ignored)."""
    lp = torch.log_softmax(model_logits(model, ids, mask), dim=-1)
    return lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)


def assert_matches_the_models_own(model: torch.nn.Module, vocab: int, backend: str, device: torch.device,
                                  top: int = 0, scaled_atol: bool = False) -> None:
    """CausalLM(model)'s log-probs of `batch(vocab)` and the gradients of their sum w.r.t. every
    parameter match the model's own in float64 (its copy on the CPU), the model itself on `device`.
    A parameter the text does not reach (a multimodal model's vision tower) has no gradient on either
    side. Gradients: atol 1e-5, or with `scaled_atol` 1e-5 times the largest entry when above 1 (RMS-
    normalized embedding rows give gradients of several hundred, which the model's own float32 forward
    misses by as much)."""
    reference = copy.deepcopy(model).double()
    ids, labels, mask = batch(vocab, top=top)
    lm = CausalLM(model.to(device), backend=backend)
    got = lm(ids.to(device), labels.to(device), attention_mask=mask.to(device))
    want = model_logprobs(reference, ids, labels, mask)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=2e-5)
    got.sum().backward()
    want.sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, p in reference.named_parameters():
        if p.grad is None:
            assert grads[name] is None, name
            continue
        atol = 1e-5 * (max(1.0, p.grad.abs().max().item()) if scaled_atol else 1.0)
        torch.testing.assert_close(grads[name].double().cpu(), p.grad, rtol=1e-4, atol=atol, msg=name)
