"""`EmbeddingEngine`: sentence embeddings with sentence-transformers."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..models import DEFAULT_EMBEDDING_MODEL, ModelSourceError, resolve_model_source
from .base import Delta, EmbeddingOutput, GenerationRequest

__all__ = ["EmbeddingEngine"]


class EmbeddingEngine:
    """Sentence embeddings with sentence-transformers (all-MiniLM-L6-v2 by default).

    Encoding runs in one dedicated worker thread, one call at a time (torch already uses every
    core); concurrent calls queue there.
    """

    def __init__(
        self,
        model_source: str = DEFAULT_EMBEDDING_MODEL,
        *,
        model_id: str | None = None,
        device: str | None = None,
        normalize: bool = True,
        batch_size: int = 32,
    ) -> None:
        self.model_source = model_source
        self.model_id = model_id or model_source
        self._device_option = device
        self.normalize = normalize
        self.batch_size = batch_size
        self.model: Any = None
        self.dimension = 0
        # One dedicated thread for loading and encoding: one OpenMP pool (see TransformersEngine.start).
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def start(self) -> None:
        if self.model is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"shoal-embed-{self.model_id}"
            )
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        resolved = resolve_model_source(self.model_source)
        device = self._device_option or ("cuda" if torch.cuda.is_available() else "cpu")
        if resolved.format == "gguf":
            raise ModelSourceError(
                f"{self.model_source!r} is a GGUF file; embeddings need a sentence-transformers model"
            )
        self.model = SentenceTransformer(str(resolved.path), device=device, local_files_only=True)
        dim_fn = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        self.dimension = int(dim_fn() or 0)

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        raise NotImplementedError(f"{self.model_id} is an embedding model; it cannot generate text")

    async def embed(self, texts: Sequence[str]) -> EmbeddingOutput:
        if self.model is None:
            raise RuntimeError("engine is not started; await engine.start() first")
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            return EmbeddingOutput([], 0)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._embed, items)

    def _embed(self, texts: list[str]) -> EmbeddingOutput:
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=self.normalize, convert_to_numpy=True,
            show_progress_bar=False,
        )
        tokenizer = self.model.tokenizer
        limit = getattr(self.model, "max_seq_length", None)
        counts = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        tokens = sum(min(c, limit) if limit else c for c in counts)
        return EmbeddingOutput([v.tolist() for v in vectors], tokens)

    async def shutdown(self) -> None:
        self.model = None
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
