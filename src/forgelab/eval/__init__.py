"""Evaluation (stage 09): held-out perplexity, GSM8K-style math and MMLU-style multiple choice
for one or more models side by side, and the reference check against lm-evaluation-harness."""
