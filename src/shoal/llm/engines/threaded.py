"""What the continuous-batching engines share: one decode thread that owns the model, and the
asyncio side that feeds it requests and streams their deltas back.

`ThreadedEngine` holds the request intake (validation, tokenizing, the context-length checks that
raise `PromptTooLongError` at call time), the queues between the event loop and the thread, aborts
when a stream is closed early, the delivery of deltas (one ``call_soon_threadsafe`` per event loop
per step) and `on_token`: the per-token bookkeeping (EOS, stop token ids, stop strings with their
hold-back, `max_tokens`). An engine subclass supplies `_load` (in the thread), `render_prompt`,
`_decode_text`, and `_step` (one scheduling iteration: admit, prefill, decode).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from .base import (
    Delta,
    EmbeddingOutput,
    EngineShutdownError,
    GenerationRequest,
    InvalidParameterError,
    LoraAdapterBase,
    PromptTooLongError,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from .detokenize import IncrementalDetokenizer
from .stopping import find_stop, stop_holdback
from .structured import grammar_for_response_format

logger = logging.getLogger(__name__)

__all__ = ["Outbox", "SequenceState", "ThreadedEngine"]


class SequenceState:
    """One request's state, owned by the decode thread once submitted (engines subclass it to add
    their own fields, with ``__slots__``)."""

    __slots__ = (
        "request_id", "prompt_ids", "params", "max_tokens", "stops", "max_stop_len", "stop_ids",
        "detok", "text", "sent", "pending_ids", "completion_tokens", "last_token", "loop", "queue",
        "aborted", "logits_processor", "pending_logprobs", "grammar", "adapter",
    )  # fmt: skip

    def __init__(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_tokens: int
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_tokens = max_tokens
        self.stops = params.stop_strings
        self.max_stop_len = max((len(s) for s in self.stops), default=0)
        self.stop_ids: frozenset[int] = frozenset(params.stop_token_ids or ())
        self.detok: IncrementalDetokenizer | None = None
        self.text = ""
        self.sent = 0
        self.pending_ids: list[int] = []
        self.completion_tokens = 0
        self.last_token = -1
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[Any] | None = None
        self.aborted = False
        #: `sampling.LogitsProcessor` when the request has penalties or a logit bias (else None).
        self.logits_processor: Any = None
        #: `TokenLogprob`s of `pending_ids` when the request asked for logprobs (else None).
        self.pending_logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.grammar: Any = None  # a `structured.GrammarState` when the request has a response_format
        self.adapter: Any = None  # the engine's LoRA adapter object when the request names one


#: What a step hands back: (sequence, `Delta` or exception) pairs, delivered together.
Outbox = list[tuple[Any, Any]]


def _put_all(items: list[tuple["asyncio.Queue[Any]", Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


class ThreadedEngine:
    """Base of the engines whose model runs in one decode thread (see the module docstring)."""

    #: The `SequenceState` subclass `_make_sequence` creates.
    sequence_class: type[SequenceState] = SequenceState
    #: Counters `stats()` reports; every key exists up front so stats() can copy the dict while the
    #: decode thread counts.
    STAT_KEYS: tuple[str, ...] = (
        "requests", "prefill_tokens", "prefill_ms", "decode_steps", "decode_rows", "decode_ms",
        "generated_tokens", "aborted", "finished_stop", "finished_length",
    )  # fmt: skip

    model_id: str

    def __init__(self, *, warmup: bool = True) -> None:
        self._warmup = warmup
        self.max_model_len = 0
        self.max_num_seqs = 0
        self._eos_ids: frozenset[int] = frozenset()
        self._cv = threading.Condition()
        self._incoming: collections.deque[Any] = collections.deque()
        self._aborts: set[Any] = set()
        self._waiting: collections.deque[Any] = collections.deque()
        self._active: list[Any] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._started = False
        self._stats: dict[str, int] = dict.fromkeys(self.STAT_KEYS, 0)
        self._token_texts: dict[int, str] = {}
        self._structured: Any = None  # see `_make_structured`
        self._structured_lock = threading.Lock()

    # -- what an engine supplies -------------------------------------------------------------------

    def _load(self) -> None:  # pragma: no cover - abstract
        """Load the model (runs in the decode thread); set `max_model_len`, `max_num_seqs`, `_eos_ids`."""
        raise NotImplementedError

    def render_prompt(self, request: GenerationRequest) -> list[int]:  # pragma: no cover - abstract
        """The prompt's token ids (chat template applied for `messages`); ``ValueError`` if invalid."""
        raise NotImplementedError

    def _decode_text(self, ids: Sequence[int]) -> str:  # pragma: no cover - abstract
        """Token ids to text (special tokens skipped); safe to call from any thread."""
        raise NotImplementedError

    def _step(self, aborts: set[Any], outbox: Outbox) -> None:  # pragma: no cover - abstract
        """One iteration of the decode thread: apply `aborts`, admit from `_waiting`, run the model."""
        raise NotImplementedError

    def _token_text(self, token_id: int) -> str:
        """One token's own text, for logprobs (cached; decode thread)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._decode_text([token_id])
        return text

    def _fail_batch(self, failed: list[Any]) -> None:
        """After `_step` raised: forget engine-side state of the `failed` requests (no longer in
        `_active`; they got the error)."""

    def _thread_context(self) -> AbstractContextManager[Any]:
        """Entered around the decode loop (e.g. ``torch.inference_mode()``)."""
        return nullcontext()

    def _init_sequence(self, seq: Any, request: GenerationRequest) -> None:
        """Engine-specific setup of a new sequence (event-loop side, after validation)."""

    def _make_structured(self) -> Any:
        """The engine's `structured.StructuredDecoding` (built once, on the first request with a
        `response_format`); engines that constrain decoding override this."""
        raise ValueError(f"engine {type(self).__name__} does not support response_format")

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model and start the decode loop, both in the engine's own thread (a library's
        thread pools may be per calling thread; one thread keeps one pool)."""
        if self._started:
            return
        self._stopping = False
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name=f"shoal-llm-{self.model_id}", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            self._thread = None
            raise
        self._started = True
        if self._warmup:
            request = GenerationRequest(prompt="Hello", sampling=SamplingParams(max_tokens=2, temperature=0))
            async for _ in self.generate(request):
                pass

    def _thread_main(self, ready: "concurrent.futures.Future[None]") -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        self._run()

    def is_alive(self) -> bool:
        """Whether the decode thread runs (for health checks)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    async def shutdown(self) -> None:
        """Stop the decode thread; pending and running streams get `EngineShutdownError`."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join)
        self._thread = None
        self._started = False

    # -- public API --------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Validate and tokenize now (``ValueError`` for bad requests); stream deltas when iterated."""
        if not self._started:
            raise RuntimeError("engine is not started; await engine.start() first")
        seq = self._make_sequence(request)
        return self._stream(seq)

    async def embed(self, texts: Sequence[str]) -> EmbeddingOutput:
        raise NotImplementedError(f"{self.model_id} is a text-generation engine; use an EmbeddingEngine")

    def stats(self) -> dict[str, int]:
        """Counters for metrics and tests (requests, tokens, steps) plus current queue sizes."""
        out = dict(self._stats)
        out["active"] = len(self._active)
        out["waiting"] = len(self._waiting) + len(self._incoming)
        return out

    # -- request intake (event-loop side) ----------------------------------------------------------

    def _make_sequence(self, request: GenerationRequest) -> Any:
        params = request.sampling
        params.validate()
        prompt_ids = self.render_prompt(request)
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_model_len:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt "
                f"has {n} tokens"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n
        if n + max_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_model_len} tokens, but {n + max_tokens} "
                f"were requested ({n} in the prompt, {max_tokens} for the completion); lower max_tokens"
            )
        seq = self.sequence_class(request.request_id, prompt_ids, params, max_tokens)
        seq.detok = IncrementalDetokenizer(self._decode_text, prompt_ids)
        grammar = grammar_for_response_format(request.response_format)
        if grammar is not None:
            seq.grammar = self._structured_decoding().new_state(grammar)
        if request.adapter is not None:
            if not isinstance(request.adapter, LoraAdapterBase) or request.adapter.retired:
                raise InvalidParameterError("model", f"LoRA adapter {request.adapter!r} is not loaded")
            seq.adapter = request.adapter
        self._init_sequence(seq, request)
        return seq

    @property
    def structured_ready(self) -> bool:
        """Whether `response_format` requests can start without first building the grammar
        machinery over the vocabulary (0.2-1 s for SmolLM2's 49k tokens; see `prepare_structured`)."""
        return self._structured is not None

    def prepare_structured(self) -> None:
        """Build the grammar machinery now. Blocking: the server calls it in a worker thread before
        the first `response_format` request, so building it never stalls the replica's event loop
        (and every stream on it)."""
        self._structured_decoding()

    def _structured_decoding(self) -> Any:
        if self._structured is None:
            with self._structured_lock:
                if self._structured is None:
                    self._structured = self._make_structured()
        return self._structured

    async def _stream(self, seq: Any) -> AsyncIterator[Delta]:
        seq.loop = asyncio.get_running_loop()
        seq.queue = asyncio.Queue()
        with self._cv:
            if self._stopping or not self._started:
                raise EngineShutdownError("engine is shut down")
            self._incoming.append(seq)
            self._cv.notify()
        finished = False
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                with self._cv:
                    self._aborts.add(seq)
                    self._cv.notify()

    # -- decode thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        with self._thread_context():
            while True:
                with self._cv:
                    while not (
                        self._stopping or self._incoming or self._aborts or self._active or self._waiting
                    ):
                        self._cv.wait()
                    if self._stopping:
                        break
                    self._waiting.extend(self._incoming)
                    self._incoming.clear()
                    aborts, self._aborts = self._aborts, set()
                outbox: Outbox = []
                try:
                    self._step(aborts, outbox)
                except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                    logger.exception("decode loop error; failing %d active requests", len(self._active))
                    failed, self._active = self._active, []
                    for seq in failed:
                        outbox.append((seq, RuntimeError(f"generation failed: {exc!r}")))
                    self._fail_batch(failed)
                self._deliver(outbox)
        # Shutting down: everything still known gets an error.
        outbox = []
        with self._cv:
            pending = [*self._active, *self._waiting, *self._incoming]
            self._active, self._incoming = [], collections.deque()
            self._waiting.clear()
        for seq in pending:
            outbox.append((seq, EngineShutdownError("engine shut down")))
        self._deliver(outbox)

    def _deliver(self, outbox: Outbox) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for seq, item in outbox:
            if seq.loop is not None and seq.queue is not None:
                by_loop.setdefault(seq.loop, []).append((seq.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    def _timed(self, key: str, started: float) -> None:
        self._stats[key] += int(1000 * (time.perf_counter() - started))

    def _on_token(self, seq: Any, token: int, outbox: Outbox, logprob: Any = None) -> bool:
        """Account one new token for `seq`; queue its delta; return True when it has finished.
        `logprob` (a `sampling.RowLogprobs`) is the token's when the request asked for logprobs."""
        seq.completion_tokens += 1
        seq.last_token = token
        seq.pending_ids.append(token)
        self._stats["generated_tokens"] += 1
        finish: str | None = None
        old_len = len(seq.text)
        if token in seq.stop_ids or (token in self._eos_ids and not seq.params.ignore_eos):
            finish = "stop"
        else:
            assert seq.detok is not None
            seq.text += seq.detok.push(token)
            if logprob is not None and seq.pending_logprobs is not None:
                seq.pending_logprobs.append(self._token_logprob(logprob))
            if seq.grammar is not None and seq.grammar.advance(token):
                finish = "stop"  # the structured output is complete
            elif seq.completion_tokens >= seq.max_tokens:
                finish = "length"
        if finish is not None:
            assert seq.detok is not None
            seq.text += seq.detok.flush()
        if seq.stops and len(seq.text) > old_len:
            hit = find_stop(seq.text, seq.stops, max(0, old_len - seq.max_stop_len + 1))
            if hit != -1:
                seq.text = seq.text[:hit]
                finish = "stop"
        end = len(seq.text) if finish is not None else len(seq.text) - stop_holdback(seq.text, seq.stops)
        piece = seq.text[seq.sent : end] if end > seq.sent else ""
        if piece or finish is not None:
            seq.sent = max(seq.sent, end)
            usage = Usage(len(seq.prompt_ids), seq.completion_tokens) if finish is not None else None
            outbox.append((seq, Delta(piece, seq.pending_ids, finish, usage, seq.pending_logprobs)))
            seq.pending_ids = []
            if seq.pending_logprobs is not None:
                seq.pending_logprobs = []
        if finish is not None:
            self._stats["finished_" + finish] += 1
            return True
        return False

    def _token_logprob(self, row: Any) -> TokenLogprob:
        text = self._token_text
        return TokenLogprob(
            row.token_id, text(row.token_id), row.logprob,
            [TokenLogprob(t, text(t), lp) for t, lp in row.top],
        )  # fmt: skip
