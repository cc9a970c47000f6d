"""Structured output: OpenAI's ``response_format`` turned into a grammar that constrains decoding.

The grammar engine is `llguidance` (Rust, abi3 wheel, no torch dependency): it compiles a JSON
schema into a grammar, and for a request in progress computes the bitmask of tokens that keep the
output a valid prefix of the grammar (tens of microseconds per row for JSON schemas). Every token a
constrained request samples is therefore allowed, so the output always parses and matches the
schema (unless `max_tokens` or a stop string cuts it short, as with OpenAI).

What an engine does (see `ThreadedEngine`, which already does the request-side parts):

1. At intake, ``grammar_for_response_format(response_format)`` (validated, cached per schema text)
   and ``StructuredDecoding.new_state(grammar)`` give the request a `GrammarState` (or ``None``
   for free text). `StructuredDecoding` wraps one engine's tokenizer (`from_hf_tokenizer`, or an
   `llguidance.LLTokenizer` built by the engine) and caches compiled grammars.
2. Before sampling each step: ``mask_logits(logits, [state or None per row])`` on the step's
   ``[rows, vocab]`` logits (a torch tensor on any device, or a numpy array) sets disallowed
   tokens to ``-inf`` in the constrained rows only; free-text rows cost one ``any()`` check.
3. After sampling: ``state.advance(token)``; it returns True when the grammar is complete (the
   sequence then ends with finish_reason "stop"). End-of-sequence tokens are allowed by the mask
   only where the grammar may end, and need no `advance`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "GrammarState",
    "StructuredDecoding",
    "grammar_for_response_format",
    "mask_logits",
    "response_format_kind",
]

#: JSON is generated compactly (no free whitespace): small models given free whitespace tend to
#: emit newlines forever instead of closing the object.
_JSON_OPTIONS = {"whitespace_flexible": False}
#: `json_object`: any JSON object.
_ANY_OBJECT = {"type": "object"}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover - the `llm` extra installs it
        raise ValueError(
            "structured output needs the `llguidance` package (pip install 'shoal[llm]')"
        ) from None
    return llguidance


def response_format_kind(response_format: dict[str, Any] | None) -> str:
    """``"text"``, ``"json_object"`` or ``"json_schema"``; ``ValueError`` for anything else."""
    if not response_format:
        return "text"
    if not isinstance(response_format, dict):
        raise ValueError("response_format must be an object")
    kind = response_format.get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise ValueError(
            f"response_format.type must be 'text', 'json_object' or 'json_schema' (got {kind!r})"
        )
    return kind


def grammar_for_response_format(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar for an OpenAI ``response_format``; ``None`` for free text.

    ``ValueError`` (with llguidance's message) for a malformed or unsupported schema. Results are
    cached per schema text, so the ingress's validation and the engine's intake compile once.
    """
    kind = response_format_kind(response_format)
    if kind == "text":
        return None
    assert response_format is not None
    if kind == "json_object":
        schema: Any = _ANY_OBJECT
    else:
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format.json_schema must be an object with `name` and `schema`")
        if not isinstance(spec.get("name", ""), str):
            raise ValueError("response_format.json_schema.name must be a string")
        schema = spec.get("schema", {})  # OpenAI: an absent schema allows any JSON
        if not isinstance(schema, (dict, bool)):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
    return _compile_schema(json.dumps(schema))  # key order kept: properties come out in it


@functools.lru_cache(maxsize=256)
def _compile_schema(schema_text: str) -> str:
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema_text, overrides=_JSON_OPTIONS)
    except ValueError as exc:
        raise ValueError(f"invalid JSON schema: {exc}") from None
    error = llg.LLMatcher.validate_grammar(grammar, None)
    if error and not error.startswith("WARNING"):
        raise ValueError(f"invalid JSON schema: {error}")
    return grammar


class GrammarState:
    """One request's position in its grammar (an `llguidance.LLMatcher`)."""

    __slots__ = ("matcher", "finished")

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.finished = False

    def advance(self, token: int) -> bool:
        """Consume the sampled `token`; True when the grammar is complete (nothing more may follow)."""
        matcher = self.matcher
        if not matcher.consume_token(token):
            # Cannot happen for a token the mask allowed; end the request rather than loop.
            logger.warning("structured output: token %d rejected (%s)", token, matcher.get_error())
            self.finished = True
            return True
        self.finished = matcher.is_stopped()
        return self.finished

    def is_accepting(self) -> bool:
        return bool(self.matcher.is_accepting())


class StructuredDecoding:
    """One engine's bridge to llguidance: its tokenizer and a cache of compiled grammars."""

    def __init__(self, lltokenizer: Any, vocab_size: int, cache_size: int = 64) -> None:
        self.lltokenizer = lltokenizer
        self.vocab_size = vocab_size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def from_hf_tokenizer(
        cls,
        tokenizer: Any,
        vocab_size: int | None = None,
        eos_ids: Sequence[int] = (),
        lock: Any = None,
    ) -> "StructuredDecoding":
        """From a fast Hugging Face tokenizer (about a second for a 50k vocabulary: build it once
        per engine). `vocab_size` is the logits' width when it differs from the tokenizer's;
        `eos_ids` are the tokens that may end a completed grammar; `lock`, if given, is held only
        while the tokenizer is read (the slow part runs without it)."""
        llg = _llguidance()
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("response_format needs a fast (Rust `tokenizers`) tokenizer")
        with lock if lock is not None else contextlib.nullcontext():
            backend = copy.copy(backend)
            backend.no_padding()
            backend.no_truncation()
            serialized = backend.to_str()
            if not eos_ids and tokenizer.eos_token_id is not None:
                eos_ids = [tokenizer.eos_token_id]
        eos = sorted(eos_ids) or None
        lltok = llg.LLTokenizer(serialized, n_vocab=vocab_size, eos_token=eos)
        return cls(lltok, vocab_size or lltok.vocab_size)

    def new_state(self, grammar: str) -> GrammarState:
        """A fresh `GrammarState` for `grammar` (a copy of a cached compiled matcher)."""
        with self._lock:
            pristine = self._cache.get(grammar)
            if pristine is None:
                llg = _llguidance()
                pristine = llg.LLMatcher(self.lltokenizer, grammar, log_level=0)
                if pristine.is_error():
                    raise ValueError(f"invalid response_format grammar: {pristine.get_error()}")
                self._cache[grammar] = pristine
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(grammar)
            return GrammarState(pristine.deep_copy())


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------

def _fill_bitmasks(states: Sequence[GrammarState], words: int) -> Any:
    """``[len(states), words]`` int32 bitmasks (numpy), one row per state, in the calling thread.

    llguidance's parallel executor is not used: its worker threads compete with the model's
    OpenMP threads for the cores (on 2 cores it made decoding several times slower), while one
    row's mask for a JSON schema takes a fraction of a millisecond.
    """
    import numpy as np

    bitmask = np.zeros((len(states), words), dtype=np.int32)
    base, row_bytes = bitmask.ctypes.data, words * 4
    for i, state in enumerate(states):
        state.matcher.unsafe_compute_mask_ptr(base + i * row_bytes, row_bytes)
    return bitmask


def _allowed(bitmask: Any, vocab: int) -> Any:
    """Bitmasks ``[k, words]`` → boolean ``[k, vocab]`` (bit j of word w is token 32*w + j)."""
    import numpy as np

    as_bytes = bitmask.view(np.uint8)  # little-endian words: byte b holds tokens 8b..8b+7
    bits = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :vocab]
    return bits.astype(bool)


def mask_logits(logits: Any, states: Sequence[GrammarState | None]) -> None:
    """Set the logits of tokens the grammar forbids to ``-inf``, in place, for the rows that have a
    `GrammarState` (``logits[i]`` is `states[i]`'s row). `logits` is ``[rows, vocab]``: a torch
    tensor (any device) or a numpy array (a 1-D row is one row). Rows without a state are not touched."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return
    if len(logits.shape) == 1:  # one row
        logits = logits.reshape(1, -1)
    constrained = [states[i] for i in rows]
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    allowed = _allowed(_fill_bitmasks(constrained, words), vocab)  # type: ignore[arg-type]
    if allowed.shape[1] < vocab:  # logits wider than the tokenizer: the extra ids are never allowed
        import numpy as np

        allowed = np.pad(allowed, ((0, 0), (0, vocab - allowed.shape[1])))
    dead = ~allowed.any(axis=1)
    if dead.any():  # a matcher in an error state: let the row end rather than sample from nothing
        logger.warning("structured output: no token allowed for %d row(s)", int(dead.sum()))
        allowed[dead] = True
    if hasattr(logits, "masked_fill_"):  # torch
        import torch

        forbid = torch.from_numpy(~allowed).to(logits.device, non_blocking=True)
        if len(rows) == logits.shape[0]:
            logits.masked_fill_(forbid, float("-inf"))
        else:
            index = torch.tensor(rows, device=logits.device)
            logits[index] = logits[index].masked_fill(forbid, float("-inf"))
    else:  # numpy
        import numpy as np

        view = logits[rows]
        view[~allowed] = -np.inf
        logits[rows] = view
