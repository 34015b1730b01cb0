"""Defaults that more than one layer uses, each defined once here (this module imports nothing, so the
torch-free layers, presets and specs, can read them too)."""

DEFAULT_RHO = 2.0  # SAM's radius: the paper's rho=2, for the optimizer, DeepSpeed, the HF mixin and the trainer
