"""Evaluation: lm-eval tasks (harness.py) and pairwise judging of two models' answers (pairwise.py)."""
