"""TRL's DistillationTrainer divergence on fdpo's kernels: `chunked_divergence_loss`.

`chunked_divergence_loss` has the signature (plus a keyword-only `backend`) and return contract of
TRL's `trl.trainer.distillation_trainer._chunked_divergence_loss`, which `DistillationTrainer._compute_loss`
calls by its module-level name; `install()` (fdpo.integrations.trl.head) rebinds that name to this
function. The divergence is `fdpo.TokenDivergenceLoss("js", beta)`: TRL's generalized JSD with the
student as fdpo's policy and the teacher as its reference, the same mixture m = (1 - beta) p_student
+ beta p_teacher, so beta 0 is KL(teacher || student) (fdpo's "forward_kl") and beta 1
KL(student || teacher) (fdpo's "reverse_kl"), exactly as TRL's `ChunkedDivergenceFunction`. The
student's entropy TRL logs comes from the divergence's own first vocabulary pass (`with_entropy`).
"""

import functools

import torch
from trl.trainer.distillation_trainer import _chunked_divergence_loss as TRL_CHUNKED_DIVERGENCE_LOSS
from trl.trainer.utils import maybe_gather_lm_head_ctx

from ...heads import LMHead
from ...token_divergence import TokenDivergenceLoss
from .fsdp import full_parameter

IGNORE_INDEX = -100

__all__ = ["TRL_CHUNKED_DIVERGENCE_LOSS", "chunked_divergence_loss"]


def lm_head(weight: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float | None,
            temperature: float) -> LMHead:
    """One model's head z = softcap(scale (h W^T + b)) / temperature as an `fdpo.LMHead`.

    A DTensor weight or bias (FSDP2) is gathered whole (`fsdp.full_parameter`: one all-gather, whose
    backward reduce-scatters the gradient averaged over the processes); the head enters TRL's
    `maybe_gather_lm_head_ctx` around every use of its weights (DeepSpeed ZeRO-3), in the forward and
    in the backward.
    """
    weight, bias = full_parameter(weight), full_parameter(bias)
    return LMHead(weight, bias, softcap, temperature, scale=float(scale),
                  gather=functools.partial(maybe_gather_lm_head_ctx, weight, bias))


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's distillation loss (generalized JSD, student vs teacher) on fdpo's fused kernels.

    Each model's logits are z = softcap(scale (h W^T + b)) / temperature, never materialized.

    Args:
        student_hidden_states: [B, K, H_s] student final hidden states of the completion tokens
            (float16 / bfloat16 / float32), differentiable.
        teacher_hidden_states: [B, K, H_t] teacher hidden states of the same tokens (any width H_t).
        student_lm_head_weight: [V, H_s] (a DTensor is gathered whole); teacher_lm_head_weight: [V, H_t].
        completion_mask: [B, K], nonzero at the positions in the loss.
        beta: in [0, 1]; 0 the forward KL(teacher || student), 1 the reverse KL(student || teacher),
            else the generalized JSD with mixture (1 - beta) p_student + beta p_teacher.
        num_items_in_batch: the loss is sum / num_items_in_batch when given, else the mean over the
            valid positions (their count clamped at 1).
        student_lm_head_bias, teacher_lm_head_bias: [V] or None.
        student_logit_scale, teacher_logit_scale: positive factors on h W^T + b, before the soft cap.
        student_final_logit_softcapping, teacher_final_logit_softcapping: soft caps c (c tanh(x / c)) or None.
        temperature: divides both models' logits after the scale and the soft cap.
        backend: fdpo's backend ("auto": triton on CUDA, torch otherwise); not one of TRL's arguments.

    Returns:
        (loss, entropy_sum, n_valid): the scalar float32 loss (gradients to the student's hidden
        states, weight and bias; none to the teacher), the detached float32 sum of the student's
        entropy (nats) over the valid positions, and the int64 count of valid positions.

    Cost: the JSD takes two passes over the vocabulary in the forward (both LSEs, then the
    divergence; one for beta 0 or 1) and one in the backward; the entropy is accumulated in the
    first forward pass beside the student's LSE (`fdpo.TokenDivergenceLoss(...)(..., with_entropy=True)`),
    as TRL's function does, with no pass of its own. Memory stays O(tile), never O(tokens x V).

    Raises:
        ValueError / TypeError (from fdpo) for beta outside [0, 1], a scale, soft cap or temperature
        that is not positive and finite, or heads whose vocabularies or shapes differ.
    """
    student = lm_head(student_lm_head_weight, student_lm_head_bias, student_logit_scale,
                      student_final_logit_softcapping, temperature)
    teacher = lm_head(teacher_lm_head_weight, teacher_lm_head_bias, teacher_logit_scale,
                      teacher_final_logit_softcapping, temperature)
    valid = completion_mask != 0
    n_valid = valid.sum()
    # The divergence sums over the whole vocabulary: a label only marks a position as scored.
    labels = torch.where(valid, 0, IGNORE_INDEX).to(student_hidden_states.device)
    divergence = TokenDivergenceLoss("js", beta=beta, reduction="sequence", ignore_index=IGNORE_INDEX,
                                     backend=backend)
    per_sequence, entropy = divergence(student_hidden_states, labels, student,
                                       ref_hidden=teacher_hidden_states.detach(), ref_head=teacher,
                                       with_entropy=True)
    loss = per_sequence.sum()
    if not loss.requires_grad and torch.is_grad_enabled():
        # No valid position: a zero still connected to the student's hidden states and head, so that
        # backward() runs and DDP sees a (zero) gradient for every head parameter, as with TRL's.
        loss = loss + 0 * sum(t.reshape(-1)[:1].sum() for t in (student_hidden_states, student.weight, student.bias)
                              if t is not None and t.requires_grad)
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy.sum(), n_valid
