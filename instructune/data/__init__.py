"""Data stage: formats → conversations (formats.py), files, mixes and dedup (sources.py), prompts
(templates.py), tokenisation with assistant turns as targets (encode.py), and `data inspect` (inspect.py)."""

from instructune.data.encode import IGNORE_INDEX, DataStats, encode_conversations, hold_out
from instructune.data.formats import Conversation, Message
from instructune.data.sources import DatasetSpec, load_conversations, load_mix, parse_datasets
from instructune.data.templates import TEMPLATES, render_prompt, render_segments

__all__ = ["IGNORE_INDEX", "TEMPLATES", "Conversation", "DataStats", "DatasetSpec", "Message", "encode_conversations",
           "hold_out", "load_conversations", "load_mix", "parse_datasets", "render_prompt", "render_segments"]
