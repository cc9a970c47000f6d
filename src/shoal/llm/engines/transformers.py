"""`TransformersEngine`: a PyTorch/transformers engine with continuous batching (HF directories,
CUDA, and GGUF files converted to a transformers checkpoint).

In short:

- One decode thread owns the model. Each iteration it (1) admits waiting requests into free batch
  slots and prefills them, one prompt per forward, up to `max_prefill_tokens` prompt tokens per
  iteration so running streams are not stalled for long; a prefill also yields the newcomer's first
  token, which is streamed at once; then (2) runs ONE forward pass for every active sequence to
  produce one more token each. Requests thus join between decode steps and leave as soon as they
  finish (EOS, a stop string, `max_tokens`), and each streams its own tokens.
- The KV cache is a preallocated, slot-indexed buffer per layer, ``[max_num_seqs, kv_heads, columns,
  head_dim]`` (`_KVStore`), handed to transformers as a `Cache` whose layers write in place. Rows are
  left-aligned: token i of every sequence sits in column i, a decode step writes each row's new K/V at
  that row's own length (one indexed write per layer), and attention reads columns ``[0, width)``
  with a boolean mask hiding each row's columns past its length; position ids are per row. Joining
  copies only the new row in; leaving moves a tail row into the hole. transformers' `DynamicCache`
  would instead concatenate the whole cache on every step (an O(cache) copy per token), needs
  left-padding with shifts when a longer prompt joins, and has no cheap row removal.
- Batch invariance (CPU): with the int8 weights (exact integer matmuls), prompts prefilled alone
  and the chunked decode attention (`_chunked_decode_attention`), a request's tokens are
  bit-identical whatever else is in the batch: greedy output does not change under load.
- Prefix caching (opt-in, `prefix_cache_tokens`): each prompt's K/V from its prefill is kept (LRU,
  up to that many tokens in all). A new prompt that starts like a kept one (at least
  `MIN_PREFIX_TOKENS` tokens, same LoRA adapter) starts from those K/V and prefills only the rest.
  Off by default because it is not bit-exact: the rest's attention runs over fewer queries than a
  whole prefill would, so its K/V can differ in the last bits, and a seeded sampled reply can then
  differ from a cold run's (greedy replies matched in the tests).
- The asyncio side never runs model code: `generate()` tokenizes, validates (raising `ValueError` at
  once for over-long prompts) and hands the request to the thread; deltas come back through
  ``call_soon_threadsafe``, one call per event loop per step.
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..models import (
    DEFAULT_CHAT_MODEL,
    Precision,
    ResolvedModel,
    choose_precision,
    load_causal_lm,
    prepare_weights,
    resolve_model_source,
)
from .base import EngineShutdownError, GenerationRequest, InvalidParameterError, SamplingParams, common_prefix
from .sampling import apply_logits_processors, make_logits_processor, sample_tokens, token_logprobs
from .structured import mask_logits
from .threaded import Outbox, SequenceState, ThreadedEngine

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

__all__ = ["TransformersEngine"]


# --------------------------------------------------------------------------------------------------
# The batched KV cache
# --------------------------------------------------------------------------------------------------


class _KVStore:
    """Per-layer K/V buffers ``[max_rows, kv_heads, cols, head_dim]`` shared by all active rows.

    Rows ``[0, rows)`` are live. Every row is left-aligned: its token ``i`` sits in column ``i``, and
    its next token goes to column ``position`` (its length). Keeping each row's data at the same
    columns whatever its batch-mates look like keeps attention's reductions in the same order, so
    a request's output does not depend on who else is in the batch; the columns past a row's length
    are hidden by the attention mask.
    """

    def __init__(
        self,
        n_layers: int,
        kv_heads: int,
        head_dim: int,
        max_rows: int,
        dtype: "torch.dtype",
        device: "torch.device",
        initial_cols: int = 128,
    ) -> None:
        import torch

        self._torch = torch
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.max_rows, self.dtype, self.device = max_rows, dtype, device
        self.initial_cols = initial_cols
        self.rows = 0
        self.used_cols = 0  # columns holding data for some live row (max length)
        # Set for the duration of one decode forward: where each row writes, and the width read.
        self.step_rows: torch.Tensor | None = None
        self.step_cols: torch.Tensor | None = None
        self.step_width = 0
        self._alloc(initial_cols)

    def _alloc(self, cols: int) -> None:
        torch = self._torch
        shape = (self.max_rows, self.kv_heads, cols, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.n_layers)]
        self.cols = cols

    @property
    def nbytes(self) -> int:
        per = self.max_rows * self.kv_heads * self.cols * self.head_dim * self.keys[0].element_size()
        return 2 * self.n_layers * per

    def ensure_cols(self, needed: int) -> None:
        """Grow the column capacity (doubling) so `needed` columns fit."""
        if needed <= self.cols:
            return
        cols = self.cols
        while cols < needed:
            cols *= 2
        old_k, old_v, rows, used = self.keys, self.values, self.rows, self.used_cols
        self._alloc(cols)
        for layer in range(self.n_layers):
            self.keys[layer][:rows, :, :used] = old_k[layer][:rows, :, :used]
            self.values[layer][:rows, :, :used] = old_v[layer][:rows, :, :used]

    def append_rows(self, kv: Sequence[tuple["torch.Tensor", "torch.Tensor"]], width: int) -> int:
        """Copy `n` prefilled rows in (`kv[layer]` is ``[n, heads, width, dim]``, left-aligned).

        Returns the first new row's index.
        """
        n = kv[0][0].shape[0]
        self.ensure_cols(width + 1)
        first = self.rows
        for layer, (k, v) in enumerate(kv):
            self.keys[layer][first : first + n, :, :width] = k
            self.values[layer][first : first + n, :, :width] = v
        self.rows += n
        self.used_cols = max(self.used_cols, width)
        return first

    def remove_rows(self, gone: Sequence[int], used_cols: int) -> list[tuple[int, int]]:
        """Drop rows; live rows from the tail move into the holes. Returns the (src, dst) moves.

        `used_cols` is the longest live row after the removal (what needs copying).
        """
        if not gone:
            return []
        torch = self._torch
        gone_set = set(gone)
        keep = self.rows - len(gone_set)
        holes = sorted(r for r in gone_set if r < keep)
        movers = [r for r in range(keep, self.rows) if r not in gone_set]
        if holes and used_cols:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            for buf in (*self.keys, *self.values):
                buf[dst, :, :used_cols] = buf[src, :, :used_cols]
        self.rows = keep
        self.used_cols = used_cols if keep else 0
        if keep == 0 and self.cols > self.initial_cols:
            self._alloc(self.initial_cols)  # give back what a burst of long prompts took
        return list(zip(movers, holes))

    def write(
        self, layer: int, k: "torch.Tensor", v: "torch.Tensor"
    ) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Store one decode step's K/V (``[rows, heads, 1, dim]``) at each row's own column and return
        the live views ``[rows, heads, step_width, dim]``."""
        keys, values = self.keys[layer], self.values[layer]
        rows, cols = self.step_rows, self.step_cols
        keys[rows, :, cols] = k[:, :, 0]
        values[rows, :, cols] = v[:, :, 0]
        return keys[: self.rows, :, : self.step_width], values[: self.rows, :, : self.step_width]


def _make_store_cache(store: _KVStore) -> Any:
    """A transformers `Cache` whose layers read and write `store` in place."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class _StoreLayer(CacheLayerMixin):
        is_sliding = False
        is_compileable = False
        is_croppable = False

        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index
            self.is_initialized = True

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:  # pragma: no cover
            pass

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            self.keys, self.values = store.write(self.index, key_states, value_states)
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return store.step_width, 0

        def get_seq_length(self) -> int:
            return max(store.step_width - 1, 0)

        def get_max_length(self) -> int:
            return -1

    return Cache(layers=[_StoreLayer(i) for i in range(store.n_layers)])


#: Width of the key/value chunks the CPU decode attention works in (see `_chunked_decode_attention`).
ATTENTION_CHUNK = 128
_ATTENTION_NAME = "shoal_batch_invariant"


def _chunked_decode_attention(
    module: Any,
    query: "torch.Tensor",
    key: "torch.Tensor",
    value: "torch.Tensor",
    attention_mask: "torch.Tensor | None",
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple["torch.Tensor", None]:
    """Attention whose result for a row does not depend on the batch it runs in (CPU path).

    BLAS kernels sum in an order that depends on the matrix sizes, so the same row attended over
    100 columns alone or over 300 (padded, beside a longer batch-mate) differs in the last bits,
    and greedy text can flip at near-ties. Here keys are taken in fixed ``ATTENTION_CHUNK``-column
    chunks (the store hands out widths that are multiples of it), every matmul has the same shape
    whatever the batch, and chunks are merged with the online-softmax recurrence; a chunk that is
    padding for a row adds exactly nothing. Prompts (``query`` longer than 1) are prefilled one
    request at a time, so they use transformers' SDPA unchanged.
    """
    import torch

    b, heads, q_len, dim = query.shape
    if q_len > 1 or attention_mask is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    kv_heads, width = key.shape[1], key.shape[2]
    rep = heads // kv_heads
    scale = scaling if scaling is not None else dim**-0.5
    chunk = ATTENTION_CHUNK
    if width % chunk:  # not from the engine's store: pad to whole chunks
        pad = chunk - width % chunk
        key = torch.nn.functional.pad(key, (0, 0, 0, pad))
        value = torch.nn.functional.pad(value, (0, 0, 0, pad))
        attention_mask = torch.nn.functional.pad(attention_mask, (0, pad), value=False)
        width += pad
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    out_dtype = query.dtype
    # Scores and softmax in float32 (bf16/fp16 weights only change the stored K/V).
    grouped = query.reshape(b, kv_heads, rep, dim).float()  # query heads of one kv head side by side
    keep = attention_mask.reshape(attention_mask.shape[0], 1, 1, width)
    lowest = torch.finfo(torch.float32).min
    run_max = run_sum = acc = None
    for start in range(0, width, chunk):
        end = start + chunk
        k_chunk, v_chunk = key[:, :, start:end], value[:, :, start:end]
        if k_chunk.dtype != torch.float32:
            k_chunk, v_chunk = k_chunk.float(), v_chunk.float()
        scores = torch.matmul(grouped, k_chunk.transpose(-1, -2)).mul_(scale)
        scores.masked_fill_(~keep[..., start:end], lowest)
        chunk_max = scores.amax(-1, keepdim=True)
        if run_max is None:
            run_max = chunk_max
            probs = scores.sub_(run_max).exp_()
            run_sum = probs.sum(-1, keepdim=True)
            acc = torch.matmul(probs, v_chunk)
        else:
            new_max = torch.maximum(run_max, chunk_max)
            correction = (run_max - new_max).exp_()
            probs = scores.sub_(new_max).exp_()
            run_sum = run_sum * correction + probs.sum(-1, keepdim=True)
            acc = acc * correction + torch.matmul(probs, v_chunk)
            run_max = new_max
    out = acc.div_(run_sum).to(out_dtype)  # type: ignore[union-attr]
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


def _use_batch_invariant_attention(model: Any) -> bool:
    """Register `_chunked_decode_attention` with transformers and switch `model` to it."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(_ATTENTION_NAME, _chunked_decode_attention)
        AttentionMaskInterface.register(_ATTENTION_NAME, sdpa_mask)
        model.set_attn_implementation(_ATTENTION_NAME)
        return True
    except Exception as exc:  # noqa: BLE001 - older transformers: keep SDPA (correct, not bit-invariant)
        logger.warning("batch-invariant attention unavailable (%s); using SDPA", exc)
        return False


# --------------------------------------------------------------------------------------------------
# The transformers engine
# --------------------------------------------------------------------------------------------------


class _Sequence(SequenceState):
    """A request's state plus the transformers engine's own: its RNG and its cache length."""

    __slots__ = ("generator", "position")

    def __init__(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_tokens: int
    ) -> None:
        super().__init__(request_id, prompt_ids, params, max_tokens)
        self.generator: Any = None
        self.position = 0  # tokens in the cache = next position id = the row's next column


class TransformersEngine(ThreadedEngine):
    """A PyTorch/transformers engine with continuous batching (see the module docstring).

    Options: `dtype` ("auto" | "float32" | "bfloat16" | "float16" | "int8"; "auto" is int8 on CPU,
    bfloat16 on CUDA), `device` (default: CUDA when present), `max_num_seqs` (batch cap; more
    requests wait in a queue), `max_model_len` (context; default the model's), `max_prefill_tokens`
    (prompt tokens prefilled per iteration, at least one request), `seed` (for requests without
    their own seed), `num_threads` (torch intra-op threads), `cache_converted` (keep converted GGUF
    checkpoints, see `models`), `prefix_cache_tokens` (prompt K/V kept for prefix reuse, in tokens;
    0, the default, turns prefix caching off: see the module docstring), `warmup` (run one tiny
    request in `start()`).
    """

    #: A kept prompt is reused only for a common prefix at least this long (shorter saves little).
    MIN_PREFIX_TOKENS = 16
    STAT_KEYS = ThreadedEngine.STAT_KEYS + ("prefix_hit_tokens",)

    sequence_class = _Sequence

    def __init__(
        self,
        model_source: str = DEFAULT_CHAT_MODEL,
        *,
        model_id: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        max_prefill_tokens: int | None = None,
        seed: int | None = None,
        num_threads: int | None = None,
        cache_converted: bool = True,
        prefix_cache_tokens: int = 0,
        warmup: bool = True,
    ) -> None:
        super().__init__(warmup=warmup)
        if prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be >= 0 (got {prefix_cache_tokens})")
        self.prefix_cache_tokens = prefix_cache_tokens
        # Kept prompts: (LoRA adapter or None, token tuple) -> per-layer (K, V) ``[1, heads, len, dim]``.
        self._kept: collections.OrderedDict[tuple, list[tuple[Any, Any]]] = collections.OrderedDict()
        self._kept_tokens = 0
        self.model_source = model_source
        self.model_id = model_id or model_source
        self._dtype_option = dtype
        self._device_option = device
        self._max_num_seqs_option = max_num_seqs
        self._max_model_len_option = max_model_len
        self._max_prefill_option = max_prefill_tokens
        self._seed = seed
        self._num_threads = num_threads
        self._cache_converted = cache_converted

        self.device = "cpu"
        self.precision: Precision | None = None
        self.max_prefill_tokens = 0
        self.resolved: ResolvedModel | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self._tok_lock = threading.Lock()
        self._cache_kwarg = "cache"
        self._chunked_attention = False
        self._store: _KVStore | None = None
        self._cache: Any = None
        self._generator: Any = None
        self._lora_rows: Any = None  # `lora_torch.LoraRows` once an adapter was loaded
        self._lora_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------

    def _thread_context(self) -> Any:
        """Loading happens in the decode thread too because PyTorch's OpenMP pool is per calling
        thread: each extra thread that ever ran parallel torch ops keeps an idle team, and with more
        OpenMP threads than cores libgomp stops spinning between parallel regions, which made every
        decode step ~1.5x slower on 2 cores."""
        import torch

        return torch.inference_mode()

    def _load(self) -> None:
        import torch

        device = self._device_option or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = device
        self.precision = choose_precision(self._dtype_option, device)
        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        self.resolved = resolve_model_source(self.model_source)
        started = time.perf_counter()
        model, tokenizer = load_causal_lm(self.resolved, cache_converted=self._cache_converted)
        self._check_architecture(model)
        model = prepare_weights(model, self.precision, device)
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        limit = getattr(config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(self._max_model_len_option or limit, limit)
        is_cuda = device.startswith("cuda")
        self.max_num_seqs = self._max_num_seqs_option or (64 if is_cuda else 16)
        self.max_prefill_tokens = self._max_prefill_option or (8192 if is_cuda else 256)
        self._eos_ids = self._find_eos_ids(model, tokenizer)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # On CPU, decode with attention whose per-row result ignores batch-mates (exact with int8).
        self._chunked_attention = not is_cuda and _use_batch_invariant_attention(model)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(
            self._seed if self._seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        )
        logger.info(
            "loaded %s (%s) on %s as %s in %.1fs; max_num_seqs=%d max_model_len=%d",
            self.model_id, self.resolved.path, device, self.precision,
            time.perf_counter() - started, self.max_num_seqs, self.max_model_len,
        )  # fmt: skip

    @staticmethod
    def _check_architecture(model: Any) -> None:
        """The engine's cache gives every layer full attention over the whole sequence."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        layer_types = getattr(config, "layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise NotImplementedError(
                f"{type(model).__name__} has {sorted(set(layer_types))} layers; the continuous-batching "
                "engine supports full-attention decoder models only"
            )
        if getattr(config, "is_encoder_decoder", False):
            raise NotImplementedError("encoder-decoder models are not supported")

    @staticmethod
    def _find_eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
        ids: set[int] = set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        # Chat models often also end turns with a generic end-of-text token.
        vocab = tokenizer.get_vocab()
        for name in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>"):
            token_id = vocab.get(name)
            if token_id is not None and name in (tokenizer.all_special_tokens or []):
                ids.add(token_id)
        return frozenset(ids)

    # -- public API --------------------------------------------------------------------------------

    @property
    def chat_template_text(self) -> str | None:
        """The tokenizer's chat template (`llm/tools.py` reads whether it renders tools itself)."""
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    def render_prompt(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids (chat template applied for `messages`)."""
        tokenizer = self.tokenizer
        if request.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"model {self.model_id!r} has no chat template; send a plain prompt")
            with self._tok_lock:
                text = tokenizer.apply_chat_template(
                    request.messages,
                    tokenize=False,
                    add_generation_prompt=request.add_generation_prompt,
                    **(request.chat_template_kwargs or {}),
                )
                return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if isinstance(request.prompt, str):
            with self._tok_lock:
                return list(tokenizer(request.prompt)["input_ids"])
        if isinstance(request.prompt, list) and all(isinstance(t, int) for t in request.prompt):
            vocab = getattr(self.model.config, "vocab_size", None)
            if vocab is not None and any(t < 0 or t >= vocab for t in request.prompt):
                raise ValueError("prompt token id out of range")
            return list(request.prompt)
        raise ValueError("request needs `messages`, a `prompt` string, or a list of token ids")

    def stats(self) -> dict[str, int]:
        """Counters for metrics and tests (requests, tokens, steps) plus current queue sizes."""
        out = super().stats()
        out["kv_cache_bytes"] = self._store.nbytes if self._store is not None else 0
        # KV-cache usage for metrics: the tokens held for running requests, of what the cache can hold.
        out["kv_cache_tokens"] = sum(s.position for s in list(self._active))
        out["kv_cache_capacity_tokens"] = self.max_num_seqs * self.max_model_len
        return out

    # -- request intake (event-loop side) ----------------------------------------------------------

    def _init_sequence(self, seq: _Sequence, request: GenerationRequest) -> None:
        if seq.params.needs_logits_processing:
            try:
                seq.logits_processor = make_logits_processor(seq.params, self._vocab_size(), self.device)
            except ValueError as exc:
                raise InvalidParameterError("logit_bias", str(exc)) from None
        if seq.params.seed is not None and seq.params.temperature > 0:
            import torch

            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(seq.params.seed)

    # -- LoRA adapters (`lora_torch.py`) -----------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> Any:
        """Load the PEFT LoRA adapter in directory `path` for requests that name it
        (`GenerationRequest.adapter`). Blocking: call it off the event loop."""
        import torch

        from .lora_torch import LoraRows, load_peft_adapter, wrap_targets

        model = self.model
        if model is None:
            raise EngineShutdownError("engine is shut down")
        dtype = torch.float32 if self.precision in ("int8", "float32") else getattr(torch, str(self.precision))
        adapter = load_peft_adapter(model, name, path, self.device, dtype)
        with self._lora_lock:
            if self._lora_rows is None:
                self._lora_rows = LoraRows()
            wrap_targets(model, list(adapter.weights), self._lora_rows)
        logger.info("loaded LoRA adapter %s from %s (%d modules)", name, path, len(adapter.weights))
        return adapter

    def unload_adapter(self, adapter: Any) -> None:
        """Retire `adapter`: new requests may no longer use it; its weights go when the last
        sequence on it ends."""
        adapter.retired = True

    def _lora_for(self, seqs: Sequence[_Sequence]) -> None:
        """Tell the wrapped modules which rows of the next forward use which adapter."""
        if self._lora_rows is not None:
            self._lora_rows.set([s.adapter for s in seqs], self.device)

    def _make_structured(self) -> Any:
        from .structured import StructuredDecoding

        vocab = self.model.config.vocab_size
        return StructuredDecoding.from_hf_tokenizer(self.tokenizer, vocab, self._eos_ids, self._tok_lock)

    def _decode_text(self, ids: Sequence[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # -- decode thread -----------------------------------------------------------------------------

    def _step(self, aborts: set[Any], outbox: Outbox) -> None:
        if aborts:
            self._apply_aborts(aborts)
        self._admit(outbox)
        if self._active:
            started = time.perf_counter()
            self._decode_step(outbox)
            self._timed("decode_ms", started)

    def _fail_batch(self, failed: list[Any]) -> None:
        self._store = None
        self._cache = None

    def _apply_aborts(self, aborts: set[_Sequence]) -> None:
        for seq in aborts:
            seq.aborted = True
        self._waiting = collections.deque(s for s in self._waiting if not s.aborted)
        gone = [i for i, s in enumerate(self._active) if s.aborted]
        if gone:
            self._stats["aborted"] += len(gone)
            self._remove_rows(gone)

    def _admit(self, outbox: Outbox) -> None:
        """Prefill waiting requests into free slots, up to `max_prefill_tokens` prompt tokens (at
        least one request) per iteration, so running streams are not stalled for long."""
        free = self.max_num_seqs - len(self._active)
        budget = self.max_prefill_tokens
        admitted = 0
        while self._waiting and admitted < free:
            n = len(self._waiting[0].prompt_ids)
            if admitted and n > budget:
                break
            seq = self._waiting.popleft()
            budget -= n
            admitted += 1
            started = time.perf_counter()
            try:
                self._prefill(seq, outbox)
            except Exception as exc:  # noqa: BLE001
                if seq in self._active:  # failed after joining the batch: let _run fail the batch
                    raise
                logger.exception("prefill failed for request %s", seq.request_id)
                outbox.append((seq, RuntimeError(f"prefill failed: {exc!r}")))
            self._timed("prefill_ms", started)
            self._deliver(outbox)  # first token out now, not after the other prefills
            outbox.clear()

    def _forward(self, **kwargs: Any) -> Any:
        cache = kwargs.pop("cache")
        kwargs[self._cache_kwarg] = cache
        return self.model(use_cache=True, **kwargs)

    def _prefill(self, seq: _Sequence, outbox: Outbox) -> None:
        """Run one prompt (alone: no padding, so exactly as it would run by itself) and copy its
        K/V into a new batch row; the prompt's last logits give the first token. A kept prompt with
        a common prefix supplies that prefix's K/V (prefix caching)."""
        import torch
        from transformers import DynamicCache

        device = self.device
        length = len(seq.prompt_ids)
        cache = DynamicCache()
        reused = self._reuse_prefix(seq, cache)
        self._lora_for([seq])
        out = self._forward(
            input_ids=torch.tensor([seq.prompt_ids[reused:]], dtype=torch.long, device=device),
            position_ids=torch.arange(reused, length, device=device).view(1, length - reused),
            cache=cache,
            logits_to_keep=1,
        )
        kv = self._cache_tensors(cache)
        if self._store is None:
            k0 = kv[0][0]
            self._store = _KVStore(
                len(kv), k0.shape[1], k0.shape[3], self.max_num_seqs, k0.dtype, k0.device, ATTENTION_CHUNK
            )
            self._cache = _make_store_cache(self._store)
        row = self._store.append_rows(kv, length)
        self._keep_prefix(seq, kv)
        seq.position = length
        self._active.append(seq)
        self._stats["prefill_tokens"] += length - reused
        self._stats["requests"] += 1
        if self._sample(out.logits[:, -1, :].float(), [seq], outbox):
            self._remove_rows([row])

    def _reuse_prefix(self, seq: _Sequence, cache: Any) -> int:
        """Fill `cache` with the K/V of the longest kept prefix of `seq`'s prompt (on the same
        adapter); returns its length (0: none). At least one prompt token is left to run."""
        if not self._kept:
            return 0
        for key in [k for k in self._kept if k[0] is not None and k[0].retired]:  # unloaded adapters' prompts
            self._kept_tokens -= len(key[1])
            del self._kept[key]
        prompt = seq.prompt_ids
        limit = len(prompt) - 1
        best, best_key = 0, None
        for key in self._kept:
            if key[0] is not seq.adapter:
                continue
            tokens = key[1]
            n = min(len(tokens), limit)
            if n < max(best + 1, self.MIN_PREFIX_TOKENS) or tokens[0] != prompt[0]:
                continue
            common = common_prefix(tokens, prompt, n)
            if common > best:
                best, best_key = common, key
        if best < self.MIN_PREFIX_TOKENS or best_key is None:
            return 0
        self._kept.move_to_end(best_key)
        for layer, (k, v) in enumerate(self._kept[best_key]):
            cache.update(k[:, :, :best], v[:, :, :best], layer)
        self._stats["prefix_hit_tokens"] += best
        return best

    def _keep_prefix(self, seq: _Sequence, kv: list[tuple[Any, Any]]) -> None:
        """Keep this prompt's K/V for later prompts (LRU within `prefix_cache_tokens`)."""
        n = len(seq.prompt_ids)
        if not self.prefix_cache_tokens or n < self.MIN_PREFIX_TOKENS or n > self.prefix_cache_tokens:
            return
        key = (seq.adapter, tuple(seq.prompt_ids))
        if key in self._kept:
            self._kept.move_to_end(key)
            return
        while self._kept and self._kept_tokens + n > self.prefix_cache_tokens:
            _, old = self._kept.popitem(last=False)
            self._kept_tokens -= old[0][0].shape[2]
        self._kept[key] = [(k[:, :, :n], v[:, :, :n]) for k, v in kv]
        self._kept_tokens += n

    @staticmethod
    def _cache_tensors(cache: Any) -> list[tuple[Any, Any]]:
        layers = getattr(cache, "layers", None)
        if layers is not None:
            return [(layer.keys, layer.values) for layer in layers]
        return list(zip(cache.key_cache, cache.value_cache))  # older transformers

    def _decode_step(self, outbox: Outbox) -> None:
        """One forward for every active row: each writes its K/V at its own column."""
        import torch

        store = self._store
        assert store is not None
        active = self._active
        b, device = len(active), self.device
        positions = torch.tensor([s.position for s in active], dtype=torch.long, device=device)
        longest = width = max(s.position for s in active) + 1
        if self._chunked_attention:
            width = -(-width // ATTENTION_CHUNK) * ATTENTION_CHUNK  # whole chunks (see the attention)
        store.ensure_cols(width)
        store.step_rows = torch.arange(b, device=device)
        store.step_cols = positions
        store.step_width = width
        # Row r sees columns [0, position_r]; later columns are padding or a longer row's data.
        mask = torch.arange(width, device=device).view(1, width) <= positions.view(b, 1)
        ids = torch.tensor([[s.last_token] for s in active], dtype=torch.long, device=device)
        self._lora_for(active)
        out = self._forward(
            input_ids=ids,
            attention_mask=mask.view(b, 1, 1, width),
            position_ids=positions.view(b, 1),
            cache=self._cache,
        )
        store.used_cols = longest
        for seq in active:
            seq.position += 1
        self._stats["decode_steps"] += 1
        self._stats["decode_rows"] += b
        finished = self._sample(out.logits[:, -1, :].float(), active, outbox)
        if finished:
            self._remove_rows(finished)

    def _remove_rows(self, rows: list[int]) -> None:
        """Take finished/aborted rows out of the batch and the cache."""
        store = self._store
        assert store is not None
        gone = set(rows)
        survivors = {i: s for i, s in enumerate(self._active) if i not in gone}
        used = max((s.position for s in survivors.values()), default=0)
        for src, dst in store.remove_rows(rows, used):
            survivors[dst] = survivors.pop(src)
        self._active = [survivors[i] for i in range(len(survivors))]

    def _vocab_size(self) -> int:
        embeddings = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        return int(weight.shape[0]) if weight is not None else int(self.model.config.vocab_size)

    def _sample(self, logits: "torch.Tensor", seqs: Sequence[_Sequence], outbox: Outbox) -> list[int]:
        """Choose one token per row (penalties and bias first, for the rows that have them), account
        it with its logprobs when asked, and return the rows that finished."""
        processors = [s.logits_processor for s in seqs]
        if any(p is not None for p in processors):
            logits = apply_logits_processors(logits, processors)
        mask_logits(logits, [s.grammar for s in seqs])  # response_format rows only (structured output)
        tokens = sample_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs], self._generator)
        top_k = [s.params.logprobs for s in seqs]
        rows: list[Any] = [None] * len(seqs)
        if any(k is not None for k in top_k):
            rows = token_logprobs(logits, tokens, top_k)
        finished = []
        for i, (seq, token, row) in enumerate(zip(seqs, tokens, rows)):
            if seq.logits_processor is not None:
                seq.logits_processor.observe(token)
            if self._on_token(seq, token, outbox, row):
                finished.append(i)
        return finished
