"""The model stage: load the tokenizer and the causal LM (a hub id, a folder or a built-in model), the special
tokens training needs, and LoRA/QLoRA adapters (training them, checking them, merging them)."""
