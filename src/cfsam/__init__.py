"""cfsam: catastrophic forgetting and sharpness-aware minimization in LLM tuning (Li et al., 2024)."""
__version__ = "0.1.0"
