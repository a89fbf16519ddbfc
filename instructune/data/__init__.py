"""Data stage: read and validate records, render prompts, tokenise with prompt masking."""

from instructune.data.encode import IGNORE_INDEX, DataStats, encode_records, hold_out
from instructune.data.records import Record, load_records
from instructune.data.templates import TEMPLATES, render_prompt

__all__ = ["IGNORE_INDEX", "DataStats", "Record", "TEMPLATES", "encode_records", "hold_out", "load_records", "render_prompt"]
