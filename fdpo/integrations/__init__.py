"""Integrations of fdpo's fused heads and losses with training frameworks.

Each is a subpackage imported explicitly (none is imported by `import fdpo`):
    fdpo.integrations.trl   TRL's trainers on fdpo's kernels, and TRL's DPOTrainer with fdpo's losses.
"""
