"""fdpo: fused Triton kernels for preference fine-tuning without materialized logits.

Public API (names are a contract):
    fdpo.token_logprobs(hidden, weight, labels, ...)      -> float32 [...] label log-probs
    fdpo.sequence_logprobs(hidden, weight, labels, ...)   -> float32 [B] or [S] per-sequence sums
Backends: "auto" | "triton" | "torch" | "reference" (see `fdpo.backends`).
"""

from .logprobs import LMHead, sequence_logprobs, token_logprobs
from .modules import FusedLMHead
from .outputs import PreferenceLossOutput

__version__ = "0.1.0"

__all__ = ["FusedLMHead", "LMHead", "PreferenceLossOutput", "sequence_logprobs", "token_logprobs"]
