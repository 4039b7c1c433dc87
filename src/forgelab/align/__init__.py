"""Alignment data: preference pairs and labelled completions from a model's own samples."""
