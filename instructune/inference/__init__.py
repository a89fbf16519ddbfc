"""Inference: the engine (engine.py: loading, prompts, batched generation and scoring) used by generate, serve and
the demo, and the OpenAI-compatible client (client.py) used by the data filter."""
