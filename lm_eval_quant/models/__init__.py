"""lm-eval model wrappers (layer 3)."""
