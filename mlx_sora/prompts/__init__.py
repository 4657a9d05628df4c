"""Prompts to token ids: Open-Sora 1.2's caption cleaning and score suffixes (``text``), the T5 tokenizer
(``tokenizer``).
"""
