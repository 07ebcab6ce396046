"""The tokenizer of a model directory (tokenizer.json, tokenizer_config.json, chat template), via `tokenizers`
as wrapped by transformers, behind a small interface: encode, decode, chat rendering, stop ids."""
from __future__ import annotations

import json
from pathlib import Path


class Tokenizer:
    """thinking: whether rendered chat prompts leave a reasoning model (Qwen3) free to open a <think> block.
    Off by default: its template then closes an empty one right after the generation prompt, so answers start
    with the answer itself. Templates that do not know the `enable_thinking` variable ignore it."""

    def __init__(self, hf, stop_ids: list[int] | None = None, thinking: bool = False):
        self.hf = hf
        self.thinking = thinking
        ids = [] if hf.eos_token_id is None else [hf.eos_token_id]
        for i in stop_ids or []:
            if i not in ids:
                ids.append(i)
        self.eos_ids: list[int] = ids  # every id that ends a generation

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        from transformers import AutoTokenizer

        path = Path(path)
        if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json / tokenizer_config.json")
        hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        stop = []
        gen = path / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            stop = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(hf, stop)

    # --- basics ------------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def pad_token_id(self) -> int:
        """Pad id for batching; equal to EOS when the model has none (masks are built by position, never by id)."""
        if self.hf.pad_token_id is not None:
            return self.hf.pad_token_id
        return self.eos_token_id if self.eos_token_id is not None else 0

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can decode; the embedding table may be larger (Qwen): never sample at or above this."""
        return len(self.hf)

    # --- chat --------------------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    thinking: bool | None = None) -> str:
        """Render messages [{"role", "content"}] with the model's own chat template, as text.
        thinking: None = self.thinking (see the class docstring)."""
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template; pass raw text prompts instead")
        thinking = self.thinking if thinking is None else thinking
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           enable_thinking=thinking)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    thinking: bool | None = None) -> list[int]:
        # the template already writes any BOS it wants: no second one from the tokenizer
        return self.encode(self.render_chat(messages, add_generation_prompt, thinking), add_special_tokens=False)

    def save(self, out_dir: str | Path):
        self.hf.save_pretrained(str(out_dir))
