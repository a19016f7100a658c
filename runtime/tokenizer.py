"""Tokenizers: the checkpoint's ``tokenizer.json`` through the ``tokenizers`` package when both
exist, otherwise a byte-level fallback (ids 0-255 are bytes, then BOS/EOS)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens; ids beyond the byte range decode to nothing."""

    bos_token_id = 256
    eos_token_id = 257

    def __init__(self, add_bos: bool = True) -> None:
        self.add_bos = add_bos

    def encode(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if self.add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` loaded by the ``tokenizers`` package (no transformers needed)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.bos_token_id = None
        self.eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(model_dir: str | Path | None) -> Tokenizer:
    if model_dir is not None:
        p = Path(model_dir) / "tokenizer.json"
        if p.is_file():
            try:
                return HFTokenizer(p)
            except ImportError:
                pass  # the byte fallback still works; the package is optional
    return ByteTokenizer()
