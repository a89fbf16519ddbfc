"""Data stage: read and validate records, render prompts, tokenise with prompt masking."""

from instructune.data.encode import IGNORE_INDEX, EncodeStats, encode_records
from instructune.data.records import Record, load_records
from instructune.data.templates import TEMPLATES, render_prompt

__all__ = ["IGNORE_INDEX", "EncodeStats", "Record", "TEMPLATES", "encode_records", "load_records", "render_prompt"]
