"""Any Hugging Face causal LM seen through the fused head: final hidden states in, log-probs out.

`CausalLM` runs the model's decoder (the base model, `get_decoder()`), never its LM head, and
scores labels with `fdpo.FusedLMHead` over the head's own Parameters (`get_output_embeddings()`;
tied embeddings are the same Parameter), with the config's logit scale and final-logit soft cap
(`head_options`: Cohere, Falcon-H1, Granite, HyperCLOVA X, Gemma 2, PaliGemma 2, ...). PEFT-wrapped
models are unwrapped to their base model, whose decoder carries the adapters; a frozen head
(requires_grad False) gets no weight gradient.

The head is read inside `CausalLM.forward`, so when the module (or a module that calls it) is
sharded with FSDP2's `fully_shard`, the weight is whole while the kernels read it.

Packed rows (several sequences back to back in one row, position ids restarting at 0 for each, no
attention mask) keep the sequences apart only in models whose attention mask transformers builds
from the position ids (`create_causal_mask`: Llama, Mistral, Qwen2/3, Gemma, Phi, GPT-2, GPT-NeoX,
...). Models with ALiBi or learned positions (OPT, BLOOM, MPT) let a sequence attend to the ones
before it, and layers with a recurrent state or a convolution over the tokens (Mamba, Jamba, LFM2,
Falcon-H1) carry it from one sequence into the next. `CausalLM` therefore checks the model at its
first packed call (`packing_leak`) and refuses one that mixes packed sequences; padded batches are
exact for every model.
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


# The probe of `packing_leak`: a first sequence (two versions, same length) and the second one.
PROBE_FIRST, PROBE_SECOND, PROBE_SEED = 6, 4, 0
# A model that keeps packed sequences apart gives the second sequence the same hidden states packed
# as alone up to rounding: bitwise after either first sequence, a few float32 ulps of the hidden
# states' largest magnitude against the separate run (other matrix shapes). The tolerance, relative
# to that magnitude, is this or PROBE_ULPS units of the dtype the decoder computes in, the larger.
PROBE_RTOL, PROBE_ULPS = 1e-4, 8


def packing_leak(decoder: nn.Module, vocab_size: int, device: torch.device | str) -> tuple[float, torch.dtype]:
    """How much packing changes a sequence's final hidden states in `decoder`, relative to their scale.

    Runs the decoder without gradients, every module in eval mode (dropout off; each module's mode is
    restored after), with autocast off (leaking is a property of the architecture: a float32 model is
    probed in float32, where 16-bit rounding cannot hide a small leak), on three rows of a few tokens
    from a fixed seed:
    A + S and B + S packed (position ids restarting at 0 for S, no attention mask), and S alone.
    A and B are random tokens of the same length. Returns (leak, the hidden states' dtype), the leak
    being max |h_S(A + S) - h_S(B + S)| or max |h_S(A + S) - h_S(S)|, the larger, divided by
    max |h_S(S)|. It makes the same calls on every process of a data-parallel run (no collective of
    its own; an FSDP-sharded decoder gathers its weights as in any forward), so call it at the same
    point on each.
    """
    g = torch.Generator().manual_seed(PROBE_SEED)
    first = torch.randint(vocab_size, (2, PROBE_FIRST), generator=g)
    second = torch.randint(vocab_size, (PROBE_SECOND,), generator=g)

    def run(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = decoder(input_ids=ids.unsqueeze(0).to(device), position_ids=positions.unsqueeze(0).to(device),
                      attention_mask=None, use_cache=False)
        return out.last_hidden_state[0, -PROBE_SECOND:]

    positions = torch.cat([torch.arange(PROBE_FIRST), torch.arange(PROBE_SECOND)])
    modes = [(module, module.training) for module in decoder.modules()]
    try:
        decoder.eval()
        with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
            after_a, after_b = (run(torch.cat([row, second]), positions) for row in first)
            alone = run(second, torch.arange(PROBE_SECOND))
    finally:
        for module, mode in modes:
            module.training = mode
    dtype = alone.dtype
    after_a, after_b, alone = after_a.double(), after_b.double(), alone.double()
    scale = alone.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    leak = torch.maximum((after_a - after_b).abs().max(), (after_a - alone).abs().max()) / scale
    return float(leak), dtype


def packing_tolerance(dtype: torch.dtype) -> float:
    """The largest `packing_leak` of a model that keeps packed sequences apart, for a decoder whose hidden
    states are `dtype` (the probe runs without autocast): PROBE_RTOL, or PROBE_ULPS units of `dtype`, the
    larger: 1e-4 in float32, 6.3e-2 in bfloat16, 7.8e-3 in float16. Tiny random-weight models (2 layers,
    width 64) leak 1e-3 (Falcon-H1, Jamba, LFM2) to 0.8 (OPT, MPT, Mamba) and keep apart to 5e-7 in
    float32 (Llama, Qwen2/3, Gemma, GPT-2, MoE, ...); a model held in 16 bits (not only computed in 16
    bits under autocast) hides a leak under its tolerance."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return max(PROBE_RTOL, PROBE_ULPS * eps)


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
        self.packing_checked = False

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

    def check_packing(self, device: torch.device | str) -> None:
        """ValueError if the model lets sequences packed into one row see each other (`packing_leak` above
        `packing_tolerance`): attention across them (ALiBi, learned positions: OPT, BLOOM, MPT) or a
        recurrent or convolutional state carried from one into the next (Mamba, Jamba, LFM2, Falcon-H1).

        Runs once per instance, at the first packed call (on that call's device, without autocast, on
        every process alike), and is remembered after a pass.
        """
        if self.packing_checked:
            return
        model = unwrap(self.model)
        embeddings = model.get_input_embeddings()
        vocab_size = getattr(embeddings, "num_embeddings", None) or model.config.get_text_config().vocab_size
        leak, dtype = packing_leak(find_decoder(self.model), vocab_size, device)
        tolerance = packing_tolerance(dtype)
        if not leak <= tolerance:
            raise ValueError(
                f"packed sequences are not kept apart by this {model.config.model_type} model "
                f"({type(model).__name__}): with position ids restarting at 0 and no attention mask, a "
                f"sequence's hidden states depend on the sequences packed before it (relative change "
                f"{leak:.1e}, tolerance {tolerance:.1e}; its attention or recurrent state crosses the sequence "
                "boundaries). Train without --packed (packed=False): padded batches are exact for every model")
        self.packing_checked = True

    def head_inputs(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None,
                    packed: bool = False) -> tuple[torch.Tensor, FusedLMHead]:
        """(hidden states, head) ready for the fused losses: the decoder's hidden states as they are, and
        the head with its compute dtype fixed to `head_dtype` (autocast's, when the call runs under
        it), so that the losses computed from them later use it too.

        Padded: hidden [B, T, D]. Packed (packed=True, input_ids [1, N]): hidden [N, D]; the first packed
        call checks that the model keeps packed sequences apart (`check_packing`).
        """
        if packed:
            self.check_packing(input_ids.device)
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
