"""Any Hugging Face causal LM seen through the fused head: final hidden states in, log-probs out.

`CausalLM` runs the model's decoder (the base model, `get_decoder()`), never its LM head, and
scores labels with `fdpo.FusedLMHead` over the head's own Parameters (`get_output_embeddings()`;
tied embeddings are the same Parameter), with the config's logit scale and final-logit soft cap
(`head_options`: Cohere, Falcon-H1, Granite, HyperCLOVA X, Gemma 2, PaliGemma 2, ...). PEFT-wrapped
models are unwrapped to their base model, whose decoder carries the adapters; a frozen head
(requires_grad False) gets no weight gradient.

The head is read inside `CausalLM.forward`, so when the module (or a module that calls it) is
sharded with FSDP2's `fully_shard`, the weight is whole while the kernels read it.
"""

import torch
from torch import nn

from .. import FusedLMHead, LMHead
from ..heads import HeadInput, autocast_compute_dtype, head_compute_dtype
from ..integrations.hf_logits import check_logit_options, final_logit_softcap, logit_scale
from ..modules import check_plain_linear


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (`get_base_model()`), else the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def find_decoder(model: nn.Module) -> nn.Module:
    """The module that maps input ids to the final hidden states (the model without its head)."""
    model = unwrap(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(decoder, nn.Module) or decoder is model:
        raise TypeError(f"cannot find the decoder of {type(model).__name__}: expected get_decoder() or the base "
                        "model attribute named by base_model_prefix")
    return decoder


def head_options(config, head_rows: int | None = None) -> dict[str, float | None]:
    """logit_scale and softcap of the fused head that reproduce the logits of a model with this config:
    z = capped(logit_scale (h W^T + b)), as its forward computes them (docs/math.md 0, 13).

    Read from the text config (`config.get_text_config()`, where multimodal models such as PaliGemma 2
    keep them) by `fdpo.integrations.hf_logits`, as the TRL integration reads them: Cohere's
    `logit_scale`, Falcon-H1's `lm_head_multiplier`, `output_multiplier`, `logits_scaling` (Granite and
    MiniCPM3 divide by it, HyperCLOVA X multiplies), and `final_logit_softcapping`. ValueError for a
    config with a setting of the logits that these do not reproduce
    (`fdpo.integrations.hf_logits.check_logit_options`; head_rows: the LM head's row count).
    """
    check_logit_options(config, head_rows)
    softcap = final_logit_softcap(config)
    return {"logit_scale": logit_scale(config), "softcap": float(softcap) if softcap else None}


class CausalLM(nn.Module):
    """A causal LM whose forward returns label log-probs through the fused head (no logits).

    Wraps (and registers) `model`, a transformers causal LM or a PEFT model around one. `backend` and
    `backward_buffer_bytes` are the fused head's (see `fdpo.FusedLMHead`).

    Example:
        lm = CausalLM(AutoModelForCausalLM.from_pretrained(name))
        seq = lm(input_ids, labels, attention_mask=mask, per_sequence=True)   # float32 [B]
    """

    def __init__(self, model: nn.Module, *, backend: str = "auto", ignore_index: int = -100,
                 backward_buffer_bytes: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.backend = backend
        self.backward_buffer_bytes = backward_buffer_bytes
        self.ignore_index = ignore_index
        linear = unwrap(model).get_output_embeddings()
        check_plain_linear(f"{type(unwrap(model)).__name__}.get_output_embeddings()", linear)
        self.options = head_options(unwrap(model).config, getattr(linear, "out_features", None))
        find_decoder(model)

    def head(self, dtype: torch.dtype | None = None) -> FusedLMHead:
        """The LM head as a `fdpo.FusedLMHead` over its current Parameters, used as they are.

        `dtype`: the head's compute dtype (`fdpo.FusedLMHead.compute_dtype`; None: an active
        autocast's at each call, else the weight's and hidden states'): the products are formed in it
        tile by tile, with no cast copy of the [V, D] weight, and the gradients reach the Parameters
        in their own dtype. Call this inside a forward so that FSDP has gathered the weight.
        """
        linear = unwrap(self.model).get_output_embeddings()
        return FusedLMHead(linear.weight, linear.bias, ignore_index=self.ignore_index, backend=self.backend,
                           backward_buffer_bytes=self.backward_buffer_bytes, compute_dtype=dtype, **self.options)

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, D] (after the final norm) of input_ids int64 [B, T].

        Padded batches pass attention_mask [B, T]; packed ones (several sequences in a row) pass
        position_ids [B, T] restarting at 0 for each sequence and no mask.
        """
        out = find_decoder(self.model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       use_cache=False)
        return out.last_hidden_state

    def head_dtype(self, hidden: torch.Tensor) -> torch.dtype:
        """The dtype the head's products are formed in for `hidden`: autocast's where it is on, else the
        common dtype of the hidden states and the weight (float32 when they differ;
        `fdpo.heads.head_compute_dtype`)."""
        head = HeadInput(hidden, LMHead(unwrap(self.model).get_output_embeddings().weight))
        return head_compute_dtype(autocast_compute_dtype(head))

    def head_inputs(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None,
                    packed: bool = False) -> tuple[torch.Tensor, FusedLMHead]:
        """(hidden states, head) ready for the fused losses: the decoder's hidden states as they are, and
        the head with its compute dtype fixed to `head_dtype` (autocast's, when the call runs under
        it), so that the losses computed from them later use it too.

        Padded: hidden [B, T, D]. Packed (packed=True, input_ids [1, N]): hidden [N, D].
        """
        hidden = self.hidden_states(input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if packed:
            hidden = hidden[0]
        return hidden, self.head(self.head_dtype(hidden))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                per_sequence: bool = False) -> torch.Tensor:
        """Label log-probs of the sequences (float32).

        Padded: input_ids, labels [B, T] (labels already shifted: the next token, ignore_index where
        not scored) -> [B, T], or [B] sums with per_sequence=True. Packed: input_ids [1, N],
        position_ids [1, N], labels [N], cu_seqlens [S + 1] -> [N], or [S] sums with per_sequence.
        """
        hidden, head = self.head_inputs(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                        packed=cu_seqlens is not None)
        return head(hidden, labels, cu_seqlens=cu_seqlens, per_sequence=per_sequence or cu_seqlens is not None)
