"""fdpo inside TRL: TRL's fused LM head on fdpo's kernels, and fdpo's losses in TRL's DPOTrainer.

One line before building any TRL trainer runs every fused forward of TRL's trainers (DPO, GRPO,
RLOO, KTO, SFT) on fdpo's kernels:

    import fdpo.integrations.trl as fdpo_trl
    fdpo_trl.install()                 # or fdpo_trl.add_fused_lm_head(model, ...), which installs too

It also makes TRL's DistillationTrainer compute its generalized JSD (student vs teacher) with
fdpo's divergence kernels (`distill.chunked_divergence_loss`, which replaces TRL's
`_chunked_divergence_loss`). `uninstall()` restores TRL's head and loss for trainers built
afterwards. `DPOTrainer` / `DPOConfig` add fdpo's loss types "bpo", "tdpo" and "epsilon_dpo" to
TRL's. Tested with TRL in `TESTED_TRL`; another version warns once on import. Requires TRL:
`pip install "fdpo[trl]"`.
"""

import warnings

try:
    import trl
except ImportError as error:
    raise ImportError('fdpo.integrations.trl needs TRL: pip install "fdpo[trl]"') from error

from packaging.specifiers import SpecifierSet

# The TRL versions this integration is tested with (the `trl` extra of setup.py pins the same range).
TESTED_TRL = ">=1.16,<1.17"

if trl.__version__ not in SpecifierSet(TESTED_TRL):
    warnings.warn(f"fdpo.integrations.trl is tested with trl{TESTED_TRL}; found trl {trl.__version__}: "
                  "TRL's trainers may call the fused head differently", UserWarning, stacklevel=2)

from .dpo import DPOConfig, DPOTrainer  # noqa: E402
from .head import (  # noqa: E402
    OUTPUTS,
    FusedCausalLMOutput,
    HeadCall,
    add_fused_lm_head,
    install,
    installed,
    logit_scale,
    set_head_backend,
    uninstall,
)

__all__ = [
    "OUTPUTS",
    "TESTED_TRL",
    "DPOConfig",
    "DPOTrainer",
    "FusedCausalLMOutput",
    "HeadCall",
    "add_fused_lm_head",
    "install",
    "installed",
    "logit_scale",
    "set_head_backend",
    "uninstall",
]
