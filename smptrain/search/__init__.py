"""Cross-validation (smptrain-cv) and hyper-parameter search (smptrain-tune)."""
