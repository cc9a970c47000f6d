"""Incremental detokenizing: token ids in, text pieces out, never a garbled character."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IncrementalDetokenizer"]


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces that are never garbled.

    A token may end inside a multi-byte character (the decoded text then ends with U+FFFD), and some
    tokenizers decode a lone token differently from the same token in context (SentencePiece drops
    a leading space). So each step decodes a short window -- the text already emitted for the last
    few tokens plus the new ones -- and emits only what grew past that, and only once it no longer
    ends in an incomplete character.
    """

    def __init__(self, decode: Any, context_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context_ids)[-4:]
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still pending (at the end of a stream), even if incomplete."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :] if len(after) > len(before) else ""
