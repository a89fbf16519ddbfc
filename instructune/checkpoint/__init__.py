"""Checkpoints: crash-safe saving and resume, ZeRO/FSDP checkpoints → Hugging Face folders, re-sharding."""
