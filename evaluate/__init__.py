"""Evaluate stage: metrics, splicing into the model, reports and plots, feature contexts, other formats."""
