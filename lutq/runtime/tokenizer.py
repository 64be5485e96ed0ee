"""The tokenizer: a fast (Rust) tokenizer from tokenizer.json, with the chat template rendered by transformers.

transformers is imported only here and only when a tokenizer is needed, and never reaches torch: lutq uses its
tokenizer classes only. No hub access: everything is read from a local directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from lutq.errors import LutqError


class Tokenizer:
    def __init__(self, directory: Path, eos_token_ids: list[int] | None = None):
        from transformers import PreTrainedTokenizerFast

        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        kwargs = {}
        if config_path.exists():
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            kwargs = {k: v for k, v in config.items() if k in
                      ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template", "add_bos_token", "add_eos_token")}
        template_file = directory / "chat_template.jinja"
        if "chat_template" not in kwargs and template_file.exists():
            kwargs["chat_template"] = template_file.read_text(encoding="utf-8")
        self.hf = PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), **kwargs)
        eos = set(eos_token_ids or [])
        if self.hf.eos_token_id is not None:
            eos.add(self.hf.eos_token_id)
        self.eos_token_ids = sorted(eos)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=True)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template, ready for the assistant's turn."""
        if not self.has_chat_template:
            raise LutqError("this model's tokenizer has no chat template")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template writes any BOS itself: adding special tokens again would double it.
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)
