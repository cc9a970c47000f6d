"""`LlamaCppEngine`: GGUF models through llama.cpp (the low-level `llama_cpp` bindings), with
continuous batching and prefix caching. The default engine for ``.gguf`` sources on CPU.

In short:

- The GGUF file is memory-mapped as it is (no conversion, no re-quantizing): loading takes a
  fraction of a second, and the weights' pages are shared by every process that maps the file.
  On CPUs with AMX, llama.cpp repacks the quantized matrices into AMX tiles at load (in C, a
  fraction of a second; 2.2x the tokens/s here) and the file pages they came from are given back
  (`llama_amx`).
- One decode thread owns the llama.cpp context (`ThreadedEngine`). By default the KV cache is
  split into one stream ("slot") of `max_model_len` cells per sequence id (`max_num_seqs` slots):
  llama.cpp computes each token's attention over the cells of its own slot only. In one shared
  (``kv_unified``) cache every token's attention runs over all used cells, its batch-mates' and
  the kept prefixes' included, masked: measured here, 16 kept prefixes of ~94 tokens cut 1-stream
  decoding from 82 to 56 tokens/s and 16-stream from 181 to 140. Slots also make a sequence's
  output independent of what runs beside it (bit-identical greedy output alone or in a batch).
- Each step runs prompt chunks of sequences being prefilled (up to `max_prefill_tokens` prompt
  tokens per step), then the next token of every decoding sequence, in slot order. llama.cpp cuts a
  split cache's batch into micro-batches of consecutive slot ids with equal token counts, so the
  decoding tokens of slots 0..n-1 run as one and a prompt's chunk as another, each a pass over the
  weights; busy slots are kept low (a request takes the lowest free slot). Split cache: the two run
  as separate `llama_decode` calls, prompts first in small calls, shortest first, the first tokens
  of each call going out as it ends, before the decode pass (`_prompt_groups`). In a
  unified cache everything is ONE `llama_decode` (one micro-batch). A long prompt is prefilled over
  several steps (chunked prefill) while the running streams keep getting one token per step;
  requests join and leave between steps.
- Prefix caching: a finished sequence's slot keeps its cells (up to `prefix_cache_entries` kept
  slots, LRU) indexed by its tokens. A new prompt that starts like a kept (or running) sequence
  reuses those cells: in its own slot by dropping what follows the common prefix, from another
  slot by copying that slot's buffers (`llama_memory_seq_cp` across streams, a few MB), then it is
  prefilled from where they end. In a unified cache the copy only tags shared cells.
- Unified cache only: when it is full (`llama_decode` returns 1), kept prefixes are dropped oldest
  first, then the newest running sequence is preempted: its cells are freed and it is prefilled
  again (prompt plus what it generated) when there is room, as vLLM's recompute preemption does.
- Sampling is llama.cpp's sampler chain, one per request: greedy for ``temperature == 0``, else
  temperature, top-k, top-p and a seeded distribution sampler.
- Chat prompts are rendered from the GGUF's ``tokenizer.chat_template`` with jinja2 the way
  transformers renders chat templates; tokenizing and detokenizing use the model's own vocabulary.
- LoRA adapters (GGUF LoRA files, `load_adapter`): llama.cpp applies adapters to a whole context,
  not per sequence, so a step whose sequences use different adapters runs one `llama_decode` per
  adapter (sequences without one form their own group); a step where all agree, the usual case,
  stays one call. Prefixes are only shared between sequences of the same adapter (their KV differs).
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import random
import threading
import time
import warnings
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..models import DEFAULT_CHAT_MODEL, ModelSourceError, ResolvedModel, resolve_model_source
from .base import (
    EngineShutdownError,
    GenerationRequest,
    InvalidParameterError,
    LoraAdapterBase,
    SamplingParams,
    common_prefix,
)
from .llama_amx import amx_kernels_work, cpu_has_amx, release_file_pages
from .sampling import row_logprobs, validate_logit_bias
from .structured import mask_logits
from .threaded import Outbox, SequenceState, ThreadedEngine

logger = logging.getLogger(__name__)

# Cells per slot (a request's context) when neither `max_model_len` nor `kv_cache_tokens` is given
# (split cache): with 16 slots, 12,288 cells in all, ~280 MB of f16 KV for SmolLM2-135M, which keeps
# the whole server within llama-server's memory plus 300 MB (issue 15); 1,024 measured 733 MiB.
DEFAULT_SLOT_TOKENS = 768
# Prompt tokens per `llama_decode` call when several prompts are prefilled in one step (split
# cache; see `_prompt_groups`): one prompt per call unless prompts are tiny. 16 gave the lowest TTFT
# p50 of 16, 32, 64 and unbounded in `llm_workload.py` at 16 streams (0.25 s against 0.32-0.35 s).
PROMPT_CALL_TOKENS = 16

__all__ = ["LlamaCppEngine", "default_threads"]

_backend_lock = threading.Lock()
_backend_ready = False
_log_callback: Any = None  # kept alive: llama.cpp holds a pointer to it


def default_threads(replicas: int = 1) -> int:
    """Threads for one replica's llama.cpp context: the CPUs this process may run on, shared by the
    replicas on this machine; at least one. Measured on 2 idle cores (SmolLM2-135M, 64 tokens): 2
    threads gave 81 tokens/s at 1 stream and 175 at 16, 1 thread 49 and 101 (the proxy and the
    Python side take little). llama.cpp's threads meet at a barrier after every operation, so one
    descheduled thread stalls them all: on cores busy with other work, fewer threads (`num_threads`)
    do better."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, replicas))


def _init_backend(llama: Any) -> None:
    """`llama_backend_init` once per process, with llama.cpp's logging routed to ours."""
    global _backend_ready, _log_callback
    with _backend_lock:
        if _backend_ready:
            return
        levels = {3: logging.WARNING, 4: logging.ERROR}  # ggml: 1 debug, 2 info, 3 warn, 4 error

        def log(level: int, text: bytes | None, user_data: Any) -> None:
            if text and level in levels:
                logger.log(levels[level], "llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

        _log_callback = llama.llama_log_callback(log)
        llama.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama.llama_backend_init()
        _backend_ready = True


class LoraAdapter(LoraAdapterBase):
    """A GGUF LoRA adapter loaded into the model (`LlamaCppEngine.load_adapter`); the decode thread
    frees its `pointer` once it is retired and no sequence uses it."""

    def __init__(self, name: str, path: str, pointer: Any) -> None:
        super().__init__(name, path)
        self.pointer = pointer


class _LlamaSequence(SequenceState):
    """A request's state plus its llama.cpp side: sequence id, all its tokens (prompt then
    generated), how many of them are in the KV cache, its sampler chain and its LoRA adapter."""

    __slots__ = ("seq_id", "tokens", "n_cached", "sampler", "argmax", "seed", "reused")

    def __init__(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_tokens: int
    ) -> None:
        super().__init__(request_id, prompt_ids, params, max_tokens)
        self.seq_id = -1
        self.tokens: list[int] = list(prompt_ids)
        self.n_cached = 0
        self.sampler: Any = None
        self.argmax = False  # plain greedy: the token is the logits' argmax (`_sample`)
        self.seed = 0
        self.reused = 0  # prompt tokens taken from the prefix cache


class _ChatTemplate:
    """A GGUF chat template rendered with jinja2 as transformers renders chat templates (sandboxed,
    ``trim_blocks``/``lstrip_blocks``, loop controls, `raise_exception`, `tojson`, `strftime_now`)."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template error: {message}")

        def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)
        self.source = source
        self._specials = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, **kwargs: Any) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **{**self._specials, **kwargs}
        )


class LlamaCppEngine(ThreadedEngine):
    """A llama.cpp engine for GGUF files with continuous batching (see the module docstring).

    Options: `max_num_seqs` (sequences decoded together; more requests wait in a queue),
    `max_model_len` (context per request; default the model's), `kv_cache_tokens` (KV cells shared
    by all sequences; default `max_model_len`, at least that), `max_prefill_tokens` (prompt tokens
    per step), `num_threads` (default: this process's CPUs divided by `replicas`), `replicas`
    (replicas of this model on this machine, for the thread default), `prefix_cache_entries`
    (finished sequences whose KV is kept for reuse; 0 turns prefix caching off), `seed` (for
    requests without their own), `flash_attn` (off by default: llama.cpp's CPU flash attention gives
    a prompt different numbers when other prompts share its batch, so greedy output would depend on
    the load), `extra_buffers` (llama.cpp's repacked weight layouts, AMX tiles on CPUs with AMX;
    default on, except where this llama.cpp build faults in its AMX kernels: see `llama_amx`),
    `kv_unified` (default False: one KV stream ("slot") per sequence id, each of `max_model_len`
    cells, `DEFAULT_SLOT_TOKENS` unless given (or ``kv_cache_tokens // max_num_seqs``); attention
    runs over a sequence's own cells only, and greedy output is bit-identical whatever runs beside
    it. True: one cache of `kv_cache_tokens` cells (default: the model's context) shared by all
    sequences, so one request may use the model's whole context, but every token's attention runs
    over all used cells and a batch changes a sequence's sums),
    `warmup`. `dtype` is accepted for the CLI's sake:
    GGUF weights run in their own quantization ("auto"). `device`: "cpu" (default) or "gpu"
    (offload every layer, if llama.cpp was built with a GPU backend).
    """

    sequence_class = _LlamaSequence
    STAT_KEYS = ThreadedEngine.STAT_KEYS + ("prefix_hit_tokens", "preempted", "prefix_evicted")

    def __init__(
        self,
        model_source: str = DEFAULT_CHAT_MODEL,
        *,
        model_id: str | None = None,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        kv_cache_tokens: int | None = None,
        max_prefill_tokens: int | None = None,
        num_threads: int | None = None,
        replicas: int = 1,
        prefix_cache_entries: int | None = None,
        seed: int | None = None,
        flash_attn: bool = False,
        extra_buffers: bool | None = None,
        kv_unified: bool = False,
        dtype: str = "auto",
        device: str | None = None,
        warmup: bool = True,
    ) -> None:
        super().__init__(warmup=warmup)
        if dtype not in ("auto", None):
            logger.warning("dtype=%r is ignored by the llama.cpp engine: GGUF weights run as they are", dtype)
        if device not in (None, "cpu", "gpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'gpu' for the llama.cpp engine (got {device!r})")
        self.model_source = model_source
        self.model_id = model_id or model_source
        self._max_num_seqs_option = max_num_seqs
        self._max_model_len_option = max_model_len
        self._kv_tokens_option = kv_cache_tokens
        self._max_prefill_option = max_prefill_tokens
        self.num_threads = num_threads or default_threads(replicas)
        self._prefix_entries_option = prefix_cache_entries
        self._flash_attn = flash_attn
        self._unified = kv_unified
        self._gpu = device in ("gpu", "cuda")
        self._extra_buffers_option = extra_buffers
        self.extra_buffers = False  # decided at load (`_use_extra_buffers`)
        self._rng = random.Random(seed)

        self.resolved: ResolvedModel | None = None
        self.kv_cache_tokens = 0
        self.max_prefill_tokens = 0
        self.prefix_cache_entries = 0
        self._llama: Any = None  # the llama_cpp module
        self._model: Any = None
        self._ctx: Any = None
        self._vocab: Any = None
        self._batch: Any = None
        self._batch_size = 0
        self._n_vocab = 0
        self._add_special = False
        self._chat_template: _ChatTemplate | None = None
        self._vocab_lock = threading.Lock()
        self._free_ids: list[int] = []
        # Every live sampler chain by address (whatever is left is freed at shutdown).
        self._samplers: dict[int, Any] = {}
        # Finished sequences whose cells are kept: seq id -> their cached tokens (oldest first), and
        # the adapter their KV was computed with (only for kept sequences that had one).
        self._kept: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        self._kept_adapter: dict[int, LoraAdapter] = {}
        self._adapter_now: LoraAdapter | None = None  # the adapter set on the context
        self._retired: list[LoraAdapter] = []  # unloaded, freed by the decode thread once unused

    # -- lifecycle ---------------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            import llama_cpp as llama
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModelSourceError(
                "the llama.cpp engine needs llama-cpp-python (pip install llama-cpp-python)"
            ) from exc
        self._llama = llama
        _init_backend(llama)
        self.resolved = resolve_model_source(self.model_source)
        if self.resolved.format != "gguf":
            raise ModelSourceError(
                f"{self.model_source!r} is not a GGUF file; the llama.cpp engine loads .gguf files "
                "(use engine='transformers' for Hugging Face directories)"
            )
        started = time.perf_counter()
        mparams = llama.llama_model_default_params()
        mparams.load_mode = llama.LLAMA_LOAD_MODE_MMAP
        mparams.n_gpu_layers = -1 if self._gpu else 0
        amx = not self._gpu and cpu_has_amx()
        self.extra_buffers = mparams.use_extra_bufts = self._use_extra_buffers(amx)
        model = llama.llama_model_load_from_file(str(self.resolved.path).encode(), mparams)
        if not model:
            raise ModelSourceError(f"llama.cpp could not load {self.resolved.path}")
        if amx and self.extra_buffers:  # the weights were repacked into copies: their pages are not read again
            release_file_pages(self.resolved.path)
        self._model = model
        self._vocab = llama.llama_model_get_vocab(model)
        self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        limit = llama.llama_model_n_ctx_train(model) or 2048
        self.max_model_len = min(self._max_model_len_option or limit, limit)
        self.max_num_seqs = self._max_num_seqs_option or 16
        self.max_prefill_tokens = self._max_prefill_option or 256
        max_ids = llama.llama_max_parallel_sequences()
        self.max_num_seqs = min(self.max_num_seqs, max_ids)
        wanted = self.max_num_seqs if self._prefix_entries_option is None else self._prefix_entries_option
        if self._unified:
            self.kv_cache_tokens = max(self._kv_tokens_option or self.max_model_len, self.max_model_len)
            # Kept prefixes hold sequence ids of their own beyond the running ones.
            self.prefix_cache_entries = max(0, min(wanted, max_ids - self.max_num_seqs))
            n_seq = self.max_num_seqs + self.prefix_cache_entries
        else:
            # One slot per sequence id; a kept prefix is a free slot that still holds its cells.
            if self._kv_tokens_option:
                per_seq = self._kv_tokens_option // self.max_num_seqs
            else:
                per_seq = self._max_model_len_option or DEFAULT_SLOT_TOKENS
            self.max_model_len = min(self.max_model_len, per_seq)
            self.kv_cache_tokens = self.max_model_len * self.max_num_seqs
            self.prefix_cache_entries = max(0, min(wanted, self.max_num_seqs))
            n_seq = self.max_num_seqs
        self._n_seq = n_seq

        cparams = llama.llama_context_default_params()
        cparams.n_ctx = self.kv_cache_tokens
        self._batch_size = self.max_num_seqs + self.max_prefill_tokens
        cparams.n_batch = self._batch_size
        cparams.n_ubatch = min(self._batch_size, 512)
        cparams.n_seq_max = n_seq
        cparams.kv_unified = self._unified
        cparams.n_threads = cparams.n_threads_batch = self.num_threads
        cparams.flash_attn_type = (
            llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if self._flash_attn else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.no_perf = True
        ctx = llama.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {self.resolved.path}")
        self._ctx = ctx
        self._batch = llama.llama_batch_init(self._batch_size, 0, 1)
        self._free_ids = list(range(n_seq - 1, -1, -1))  # pop() hands out 0 first
        self._add_special = bool(llama.llama_vocab_get_add_bos(self._vocab))
        self._eos_ids = frozenset(t for t in range(self._n_vocab) if llama.llama_vocab_is_eog(self._vocab, t))
        template = llama.llama_model_chat_template(model, None)
        if template:
            self._chat_template = _ChatTemplate(
                template.decode("utf-8"), self._vocab_text(llama.llama_vocab_bos(self._vocab)),
                self._vocab_text(llama.llama_vocab_eos(self._vocab)),
            )
        logger.info(
            "loaded %s (%s) with llama.cpp in %.2fs; max_num_seqs=%d max_model_len=%d kv_cache_tokens=%d "
            "threads=%d",
            self.model_id, self.resolved.path, time.perf_counter() - started, self.max_num_seqs,
            self.max_model_len, self.kv_cache_tokens, self.num_threads,
        )  # fmt: skip

    def _use_extra_buffers(self, amx: bool) -> bool:
        """llama.cpp's repacked weight layouts (AMX tiles when `amx`, a CPU run on a CPU with AMX):
        the option if given, else on, except where this build faults in the AMX kernels (`llama_amx`)."""
        if self._extra_buffers_option is not None:
            return self._extra_buffers_option
        if not amx:
            return True
        assert self.resolved is not None
        return amx_kernels_work(self.resolved.path)

    def _vocab_text(self, token: int) -> str:
        """A token's text as the vocabulary stores it (e.g. "<|im_start|>"), for the chat template;
        not `_token_text`, its decoded text for logprobs."""
        if token < 0:
            return ""
        text = self._llama.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", "replace") if text else ""

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            self._free_native()

    def _free_native(self) -> None:
        llama = self._llama
        if llama is None:
            return
        for sampler in self._samplers.values():
            llama.llama_sampler_free(sampler)
        self._samplers.clear()
        if self._batch is not None:
            llama.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama.llama_free(self._ctx)
            self._ctx = None
        with self._vocab_lock:  # no tokenizing while the vocabulary goes away
            self._vocab = None
            if self._model is not None:
                llama.llama_model_free(self._model)
                self._model = None
        self._kept.clear()
        self._kept_adapter.clear()

    # -- public API --------------------------------------------------------------------------------

    @property
    def chat_template_text(self) -> str | None:
        """The GGUF's chat template (`llm/tools.py` reads whether it renders tools itself)."""
        return self._chat_template.source if self._chat_template is not None else None

    def render_prompt(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids (chat template applied for `messages`)."""
        if request.messages is not None:
            if self._chat_template is None:
                raise ValueError(f"model {self.model_id!r} has no chat template; send a plain prompt")
            text = self._chat_template.render(
                request.messages, request.add_generation_prompt, **(request.chat_template_kwargs or {})
            )
            return self.tokenize(text, add_special=False)
        if isinstance(request.prompt, str):
            return self.tokenize(request.prompt, add_special=True)
        if isinstance(request.prompt, list) and all(isinstance(t, int) for t in request.prompt):
            if any(t < 0 or t >= self._n_vocab for t in request.prompt):
                raise ValueError("prompt token id out of range")
            return list(request.prompt)
        raise ValueError("request needs `messages`, a `prompt` string, or a list of token ids")

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """`text` to token ids with the model's vocabulary (special tokens in the text are parsed)."""
        llama = self._llama
        data = text.encode("utf-8")
        add = add_special and self._add_special
        capacity = len(data) + 8
        with self._vocab_lock:
            if self._vocab is None:
                raise EngineShutdownError("engine is shut down")
            while True:
                buf = (llama.llama_token * capacity)()
                n = llama.llama_tokenize(self._vocab, data, len(data), buf, capacity, add, True)
                if n >= 0:
                    return list(buf[:n])
                capacity = -n

    def _decode_text(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        llama = self._llama
        tokens = (llama.llama_token * len(ids))(*ids)
        capacity = 16 * len(ids) + 16
        with self._vocab_lock:
            if self._vocab is None:
                raise EngineShutdownError("engine is shut down")
            while True:
                buf = ctypes.create_string_buffer(capacity)
                n = llama.llama_detokenize(self._vocab, tokens, len(ids), buf, capacity, False, False)
                if n >= 0:
                    return buf.raw[:n].decode("utf-8", "replace")
                capacity = -n

    def stats(self) -> dict[str, int]:
        out = super().stats()
        out["kv_cache_tokens"] = sum(s.n_cached for s in list(self._active))
        out["kv_cache_capacity_tokens"] = self.kv_cache_tokens
        out["prefix_cache_sequences"] = len(self._kept)
        return out

    # -- request intake (event-loop side) ----------------------------------------------------------

    def _init_sequence(self, seq: _LlamaSequence, request: GenerationRequest) -> None:
        params = seq.params
        if params.logit_bias:
            try:
                validate_logit_bias(params.logit_bias, self._n_vocab)
            except ValueError as exc:
                raise InvalidParameterError("logit_bias", str(exc)) from None
        seq.seed = params.seed if params.seed is not None else self._rng.getrandbits(32)

    # -- decode thread -----------------------------------------------------------------------------

    def _step(self, aborts: set[Any], outbox: Outbox) -> None:
        if aborts:
            self._apply_aborts(aborts)
        if self._retired:
            self._free_retired()
        self._admit()
        if self._active:
            self._forward(outbox)

    def _fail_batch(self, failed: list[Any]) -> None:
        """Free the failed requests' samplers, and every cell but the kept ones."""
        for seq in failed:
            self._free_sampler(seq)
            seq.seq_id = -1
        llama = self._llama
        mem = llama.llama_get_memory(self._ctx)
        used = set(range(self._n_seq)) - set(self._free_ids) - set(self._kept)
        for seq_id in used:
            llama.llama_memory_seq_rm(mem, seq_id, -1, -1)
            self._free_ids.append(seq_id)

    def _apply_aborts(self, aborts: set[_LlamaSequence]) -> None:
        for seq in aborts:
            seq.aborted = True
        self._waiting = collections.deque(s for s in self._waiting if not s.aborted)
        gone = [s for s in self._active if s.aborted]
        if gone:
            self._stats["aborted"] += len(gone)
            self._active = [s for s in self._active if not s.aborted]
            for seq in gone:
                self._release(seq)

    def _admit(self) -> None:
        """Give waiting requests a sequence id (and any cached prefix) while there are free slots;
        their prompts are prefilled in chunks by the following steps."""
        while self._waiting and len(self._active) < self.max_num_seqs:
            if self._unified and not self._free_ids and not self._evict_one():
                break  # pragma: no cover - ids are sized for max_num_seqs plus the kept ones
            seq = self._waiting.popleft()
            seq.n_cached = 0
            self._active.append(seq)  # from here on, a failure fails it with the batch
            self._stats["requests"] += 1
            seq.sampler = self._make_sampler(seq)
            self._samplers[_address(seq.sampler)] = seq.sampler
            self._place(seq)

    def _place(self, seq: _LlamaSequence) -> None:
        """Give `seq` a sequence id holding the cells of the longest cached prefix of its tokens
        (kept or running). Unified cache: a free id, the shared cells tagged with it. Split cache:
        the kept slot holding that prefix, else the lowest free slot (busy slots stay consecutive:
        one micro-batch) with a copy of the prefix's slot (llama.cpp copies the whole stream, a few
        MB, before the next decode); what follows the prefix is dropped."""
        best, source = self._best_prefix(seq) if self.prefix_cache_entries else (0, -1)
        llama = self._llama
        mem = llama.llama_get_memory(self._ctx)
        if self._unified:
            seq.seq_id = self._free_ids.pop()
            if best:
                llama.llama_memory_seq_cp(mem, source, seq.seq_id, 0, best)
        else:
            slot = source if source in self._kept else min(self._free_ids + list(self._kept))
            if slot in self._kept:
                del self._kept[slot]
                self._kept_adapter.pop(slot, None)
            else:
                self._free_ids.remove(slot)
            seq.seq_id = slot
            if best and source != slot:
                llama.llama_memory_seq_cp(mem, source, slot, -1, -1)
            llama.llama_memory_seq_rm(mem, slot, best if best else -1, -1)
        if source in self._kept:
            self._kept.move_to_end(source)
        seq.n_cached = best
        seq.reused = best
        self._stats["prefix_hit_tokens"] += best

    def _best_prefix(self, seq: _LlamaSequence) -> tuple[int, int]:
        """(length, sequence id) of the longest cached prefix of `seq`'s tokens, kept or running
        (kept first: on a tie, no copy), computed with `seq`'s LoRA adapter; (0, -1) if none."""
        tokens = seq.tokens
        # At least one token must run, for the logits; in a split cache two: a prompt's last token
        # run alone (a one-token micro-batch) came out different in the last bits from a whole
        # prefill, and greedy output diverged a few tokens later.
        limit = len(tokens) - (1 if self._unified else 2)
        best, best_id = 0, -1
        adapter = seq.adapter
        candidates = [(sid, toks) for sid, toks in self._kept.items() if self._kept_adapter.get(sid) is adapter]
        candidates += [(s.seq_id, s.tokens[: s.n_cached]) for s in self._active if s.n_cached and s.adapter is adapter]
        for seq_id, cached in candidates:
            n = min(len(cached), limit)
            if n <= best or cached[:best + 1] != tokens[:best + 1]:
                continue
            common = common_prefix(cached, tokens, n)
            if common > best:
                best, best_id = common, seq_id
        return best, best_id

    def _logits_row(self, out_index: int) -> Any:
        """The step's logits for batch index `out_index`: a writable numpy view of llama.cpp's buffer."""
        import numpy as np

        return np.ctypeslib.as_array(self._llama.llama_get_logits_ith(self._ctx, out_index), shape=(self._n_vocab,))

    def _logprobs(self, out_index: int, token: int, k: int) -> Any:
        """The chosen token's log-probability and the `k` best, from the step's logits row (after
        a response_format mask; before logit_bias and penalties, which run in the sampler chain)."""
        return row_logprobs(self._logits_row(out_index), token, k)

    def _make_structured(self) -> Any:
        """Structured output over llama.cpp's own vocabulary (llguidance reads it, ~1 s, once)."""
        from llguidance.llamacpp import lltokenizer_from_vocab

        from .structured import StructuredDecoding

        with self._vocab_lock:
            if self._vocab is None:
                raise EngineShutdownError("engine is shut down")
            with warnings.catch_warnings():  # it calls a deprecated binding once per token (49k warnings)
                warnings.simplefilter("ignore", DeprecationWarning)
                tokenizer = lltokenizer_from_vocab(self._vocab, n_vocab=self._n_vocab, eos_token=sorted(self._eos_ids))
        return StructuredDecoding(tokenizer, self._n_vocab)

    def _make_sampler(self, seq: _LlamaSequence) -> Any:
        """The request's sampler chain: its logit_bias and OpenAI's presence/frequency penalties
        over the tokens it generated (llama.cpp's penalties sampler: the same formula), then
        greedy, or temperature / top-k / top-p and a draw seeded per request."""
        llama = self._llama
        params = seq.params
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        if params.logit_bias:
            biases = [llama.llama_logit_bias(int(t), float(b)) for t, b in params.logit_bias.items()]
            array = (llama.llama_logit_bias * len(biases))(*biases)  # copied by llama.cpp
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_logit_bias(self._n_vocab, len(biases), array))
        if params.presence_penalty or params.frequency_penalty:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_penalties(
                self._n_vocab, max(1, seq.max_tokens), 1.0, params.frequency_penalty, params.presence_penalty))
        if params.temperature <= 1e-5:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
            # Nothing before greedy: `_sample` takes numpy's argmax (the first maximum, as llama.cpp's
            # greedy sampler) over the logits in place instead of the chain, which copies all of them
            # into a candidates array first: 0.13 ms a row, +4.6% tokens/s at 16 streams.
            seq.argmax = not (params.logit_bias or params.presence_penalty or params.frequency_penalty)
            return chain
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(params.temperature))
        if params.top_k is not None and params.top_k > 0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(params.top_p, 1))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seq.seed & 0xFFFFFFFF))
        return chain

    def _free_sampler(self, seq: _LlamaSequence) -> None:
        if seq.sampler is not None:
            self._samplers.pop(_address(seq.sampler), None)
            self._llama.llama_sampler_free(seq.sampler)
            seq.sampler = None

    def _release(self, seq: _LlamaSequence) -> None:
        """`seq` left the batch: keep its cells as a prefix for later prompts, or free them."""
        self._free_sampler(seq)
        if seq.seq_id < 0:
            return
        seq_id, seq.seq_id = seq.seq_id, -1
        if self.prefix_cache_entries and seq.n_cached > 0:
            while len(self._kept) >= self.prefix_cache_entries:
                self._evict_one()
            self._kept[seq_id] = seq.tokens[: seq.n_cached]
            if seq.adapter is not None:
                self._kept_adapter[seq_id] = seq.adapter
            return
        llama = self._llama
        llama.llama_memory_seq_rm(llama.llama_get_memory(self._ctx), seq_id, -1, -1)
        self._free_ids.append(seq_id)

    def _evict_one(self) -> bool:
        """Drop the least recently used kept prefix; False if none is kept."""
        if not self._kept:
            return False
        seq_id, _ = self._kept.popitem(last=False)
        self._kept_adapter.pop(seq_id, None)
        llama = self._llama
        llama.llama_memory_seq_rm(llama.llama_get_memory(self._ctx), seq_id, -1, -1)
        self._free_ids.append(seq_id)
        self._stats["prefix_evicted"] += 1
        return True

    def _preempt_newest(self, adapter: LoraAdapter | None = None) -> None:
        """Out of KV cells with nothing kept to drop: the newest running sequence (on `adapter`, the
        one whose decode needs the room) gives its cells back and waits (first in line) to be
        prefilled again, generated tokens included."""
        at = max(i for i, s in enumerate(self._active) if s.adapter is adapter)
        seq = self._active.pop(at)
        llama = self._llama
        llama.llama_memory_seq_rm(llama.llama_get_memory(self._ctx), seq.seq_id, -1, -1)
        self._free_ids.append(seq.seq_id)
        self._free_sampler(seq)
        seq.seq_id, seq.n_cached = -1, 0
        self._waiting.appendleft(seq)
        self._stats["preempted"] += 1
        self._stats["requests"] -= 1  # counted again when it is admitted again

    def _forward(self, outbox: Outbox) -> None:
        """One `llama_decode` for every active sequence: a token each for the decoding ones, prompt
        chunks (up to `max_prefill_tokens`) for the ones being prefilled; then sample. Sequences on
        different LoRA adapters take one `llama_decode` per adapter (see the module docstring)."""
        finished: list[_LlamaSequence] = []
        for adapter in dict.fromkeys(s.adapter for s in self._active):  # usually one: None
            if self._unified:
                self._sample(self._decode(adapter), outbox, finished)  # before the next decode overwrites the logits
                continue
            # Split cache: prompts first, in small calls (`_prompt_groups`), each call's first tokens
            # out as it ends; then the running sequences' tokens (the newcomers' second ones
            # included). llama.cpp would cut a mixed batch into separate micro-batches anyway (a
            # prompt's tokens are not one per slot); the extra calls of a burst of prompts cost a
            # few ms each and save new requests the decode pass and each other's prefill.
            for group in self._prompt_groups(self._plan(adapter)[1]):
                self._sample(self._decode(adapter, group), outbox, finished)
                if outbox:  # this call's first tokens go out before the next call runs
                    self._deliver(outbox)
                    outbox.clear()
            self._retire(finished)
            decoding = [(seq, 1, 0) for seq in self._decoding(adapter)]  # indexed by `_in_slot_order`
            self._sample(self._decode(adapter, self._in_slot_order(decoding)), outbox, finished)
        self._retire(finished)

    def _prompt_groups(self, plan: list[tuple[_LlamaSequence, int, int | None]],
                       ) -> list[list[tuple[_LlamaSequence, int, int | None]]]:
        """Split cache: the prompt chunks of a step as `llama_decode` calls, shortest chunks first,
        each call of one chunk length and at most `PROMPT_CALL_TOKENS` tokens (or one chunk).

        One length per call: llama.cpp would cut chunks of different lengths into equal parts per
        slot, and a one-token part takes another kernel path than a whole chunk, so a prompt's
        numbers, and its greedy output, would depend on its batch-mates' prompt lengths.
        Small calls: prompt tokens cost as much as decode rows on a CPU (compute-bound), so a burst
        of prompts run as one call gets every first token at the end of it; in calls of a few
        prompts, each call's first tokens go out as it ends (`_forward`): most of a burst gets its
        first token well before the last prompt is done, for ~6 ms of fixed cost per extra call."""
        by_length: dict[int, list[tuple[_LlamaSequence, int, int | None]]] = {}
        for entry in plan:
            by_length.setdefault(entry[1], []).append(entry)
        calls = []
        for length in sorted(by_length):
            group = by_length[length]
            per_call = max(1, PROMPT_CALL_TOKENS // length)
            calls.extend(self._in_slot_order(group[i : i + per_call]) for i in range(0, len(group), per_call))
        return calls

    def _retire(self, finished: list[_LlamaSequence]) -> None:
        """Take the finished sequences out of the batch (and empty `finished`)."""
        if finished:
            gone = set(map(id, finished))
            self._active = [s for s in self._active if id(s) not in gone]
            for seq in finished:
                self._release(seq)
            finished.clear()

    def _decode(self, adapter: LoraAdapter | None,
                plan: list[tuple[_LlamaSequence, int, int | None]] | None = None,
                ) -> list[tuple[_LlamaSequence, int, int | None]]:
        """Run one `llama_decode` of `plan` (split cache: its cells are there, no retry), or plan one
        for the active sequences on `adapter` (all of them when no sequence has one) and run it,
        freeing cells (kept prefixes, then the newest sequence) while the KV cache is full.
        Returns the plan that ran; its logits must be read before the next decode."""
        llama = self._llama
        if adapter is not self._adapter_now:
            self._set_adapter(adapter)
        while True:
            fixed = plan is not None
            if not fixed:
                decoding, prompts = self._plan(adapter)
                plan = decoding + prompts
            if not plan:
                return plan
            started = time.perf_counter()
            rc = llama.llama_decode(self._ctx, self._fill_batch(plan))
            if rc == 0:
                break
            if rc != 1 or fixed:
                raise RuntimeError(f"llama_decode failed with status {rc}")
            # No room in the KV cache: free some and try again.
            if not self._evict_one():
                if len(self._active) <= 1:
                    raise RuntimeError("the KV cache cannot hold this sequence; raise kv_cache_tokens")
                self._preempt_newest(adapter)
        decoding = 0
        for seq, n, _ in plan:
            if n > 1 or not seq.completion_tokens:
                self._stats["prefill_tokens"] += n
            else:
                decoding += 1
        self._timed("decode_ms" if decoding else "prefill_ms", started)
        if decoding:
            self._stats["decode_steps"] += 1
            self._stats["decode_rows"] += decoding
        return plan

    def _sample(self, plan: list[tuple[_LlamaSequence, int, int | None]], outbox: Outbox,
                finished: list[_LlamaSequence]) -> None:
        """Advance each planned sequence and sample the ones whose logits the decode produced."""
        llama = self._llama
        for seq, n, out_index in plan:
            seq.n_cached += n
            if out_index is None:
                continue
            if seq.grammar is not None:  # structured output: forbidden tokens to -inf, in llama.cpp's buffer
                mask_logits(self._logits_row(out_index), [seq.grammar])
            if seq.argmax:
                token = int(self._logits_row(out_index).argmax())
            else:
                token = llama.llama_sampler_sample(seq.sampler, self._ctx, out_index)
            seq.tokens.append(token)
            row = None if seq.params.logprobs is None else self._logprobs(out_index, token, seq.params.logprobs)
            if self._on_token(seq, token, outbox, row):
                finished.append(seq)

    # -- LoRA adapters -------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> LoraAdapter:
        """Load the GGUF LoRA adapter at `path` (a ``.gguf`` file, or a directory holding one) for
        requests that name it (`GenerationRequest.adapter`). Blocking: call it off the event loop."""
        from pathlib import Path

        target = Path(path)
        if target.is_dir():
            files = sorted(target.glob("*.gguf"))
            if len(files) != 1:
                raise ValueError(f"LoRA adapter {name!r}: {target} must hold exactly one .gguf file "
                                 f"(found {len(files)}); the llama.cpp engine loads GGUF LoRA adapters")
            target = files[0]
        if not target.is_file():
            raise FileNotFoundError(f"LoRA adapter {name!r}: {target} does not exist")
        with self._vocab_lock:
            if self._model is None:
                raise EngineShutdownError("engine is shut down")
            pointer = self._llama.llama_adapter_lora_init(self._model, str(target).encode())
        if not pointer:
            raise ValueError(f"LoRA adapter {name!r}: llama.cpp could not load {target} (not a LoRA adapter "
                             "for this model's architecture and shapes; see the replica's log)")
        logger.info("loaded LoRA adapter %s from %s", name, target)
        return LoraAdapter(name, str(target), pointer)

    def unload_adapter(self, adapter: LoraAdapter) -> None:
        """Retire `adapter`: new requests may no longer use it; it is freed at the next step that
        finds no sequence (running, waiting or kept as a prefix) on it."""
        with self._cv:
            if not adapter.retired:
                adapter.retired = True
                self._retired.append(adapter)
                self._cv.notify()

    def _free_retired(self) -> None:
        in_use = {id(s.adapter) for s in (*self._active, *self._waiting) if s.adapter is not None}
        keep = []
        for adapter in self._retired:
            if id(adapter) in in_use:
                keep.append(adapter)
                continue
            for seq_id in [sid for sid, a in self._kept_adapter.items() if a is adapter]:
                del self._kept[seq_id]
                del self._kept_adapter[seq_id]
                llama = self._llama
                llama.llama_memory_seq_rm(llama.llama_get_memory(self._ctx), seq_id, -1, -1)
                self._free_ids.append(seq_id)
            if self._adapter_now is adapter:
                self._set_adapter(None)
            self._llama.llama_adapter_lora_free(adapter.pointer)
            adapter.pointer = None
            logger.info("freed LoRA adapter %s", adapter.name)
        self._retired = keep

    def _set_adapter(self, adapter: LoraAdapter | None) -> None:
        llama = self._llama
        if adapter is None:
            llama.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            adapters = (llama.llama_adapter_lora_p_ctypes * 1)(adapter.pointer)
            scales = (ctypes.c_float * 1)(1.0)
            llama.llama_set_adapters_lora(self._ctx, adapters, 1, scales)
        self._adapter_now = adapter

    def _plan(self, adapter: LoraAdapter | None = None) -> tuple[list[tuple[_LlamaSequence, int, int | None]],
                                                                list[tuple[_LlamaSequence, int, int | None]]]:
        """This step's work for the sequences on `adapter`: every decoding sequence's one token, and
        prompt chunks within the prefill budget. Entries are (sequence, tokens to run, batch index
        of its logits or None), indexed for one batch of the decoding tokens then the chunks."""
        running = self._decoding(adapter)
        decoding: list[tuple[_LlamaSequence, int, int | None]] = [(seq, 1, i) for i, seq in enumerate(running)]
        prompts: list[tuple[_LlamaSequence, int, int | None]] = []
        prefilling = [seq for seq in self._active if seq.adapter is adapter and seq not in running]
        size = len(decoding)
        budget = self.max_prefill_tokens
        for seq in prefilling:
            if budget <= 0:
                break
            pending = len(seq.tokens) - seq.n_cached
            n = min(pending, budget)
            if n < pending and not self._unified:
                # Never a one-token piece of a prompt (see `_prompt_groups`): leave two or more.
                n = min(n, pending - 2)
                if n < 2:
                    continue
            budget -= n
            prompts.append((seq, n, size + n - 1 if n == pending else None))
            size += n
        return decoding, prompts

    def _decoding(self, adapter: LoraAdapter | None) -> list[_LlamaSequence]:
        """The active sequences on `adapter` with one token to run: their last sampled one."""
        return [seq for seq in self._active
                if seq.adapter is adapter and seq.completion_tokens and len(seq.tokens) - seq.n_cached == 1]

    @staticmethod
    def _in_slot_order(plan: list[tuple[_LlamaSequence, int, int | None]],
                       ) -> list[tuple[_LlamaSequence, int, int | None]]:
        """`plan` sorted by slot, batch indices of the logits recomputed: consecutive slots with
        equal token counts form one micro-batch in a split cache."""
        plan = sorted(plan, key=lambda entry: entry[0].seq_id)
        size = 0
        for i, (seq, n, out_index) in enumerate(plan):
            plan[i] = (seq, n, None if out_index is None else size + n - 1)
            size += n
        return plan

    def _fill_batch(self, plan: list[tuple[_LlamaSequence, int, int | None]]) -> Any:
        batch = self._batch
        token, pos, n_seq, seq_ids, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        i = 0
        for seq, n, out_index in plan:
            start = seq.n_cached
            sid = seq.seq_id
            for j, tok in enumerate(seq.tokens[start : start + n]):
                token[i] = tok
                pos[i] = start + j
                n_seq[i] = 1
                seq_ids[i][0] = sid
                logits[i] = 0
                i += 1
            if out_index is not None:
                logits[out_index] = 1
        batch.n_tokens = i
        return batch


def _address(pointer: Any) -> int:
    """A ctypes pointer's address (pointer objects themselves are not hashable)."""
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0
