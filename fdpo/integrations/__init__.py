"""Integrations of fdpo's fused heads and losses with training frameworks.

Each is imported explicitly (none is imported by `import fdpo`):
    fdpo.integrations.trl        TRL's trainers on fdpo's kernels, and TRL's DPOTrainer with fdpo's losses.
    fdpo.integrations.hf_logits  the logit scale and soft cap of a transformers config (no TRL needed),
                                 read by the TRL integration and by fdpo's trainer.
"""
