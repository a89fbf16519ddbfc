"""Inference: the OpenAI-compatible client (client.py) used by the data filter."""
