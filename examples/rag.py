"""Retrieval-augmented generation: embed documents, find the relevant ones, answer from them.

Three deployments composed with handles:

- `Retriever` embeds a small bundled document set (data/rag_documents.json) with all-MiniLM-L6-v2
  into an in-memory vector index (normalized vectors; search is one matrix product).
- `Generator` runs SmolLM2-135M-Instruct on shoal's continuous-batching engine and answers from the
  passages it is given, streaming tokens when asked.
- `RAGPipeline` is the HTTP ingress: ``GET /?question=...`` (add ``&stream=true`` for plain-text
  token streaming) returns ``{"answer": ..., "sources": [...]}``.

Run it with `shoal run examples.rag:app`, then
    curl 'http://127.0.0.1:8000/?question=What+is+the+capital+of+Veloria%3F'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from shoal import serve
from shoal.handle import DeploymentHandle

DOCUMENTS = Path(__file__).with_name("data") / "rag_documents.json"
SYSTEM_PROMPT = "Answer the question in one sentence, using only the context."


@serve.deployment
class Retriever:
    def __init__(self, documents_path: str = str(DOCUMENTS), model: str = "all-MiniLM-L6-v2") -> None:
        from shoal.llm.engines import EmbeddingEngine

        self.documents: list[str] = json.loads(Path(documents_path).read_text())
        self.engine = EmbeddingEngine(model)
        self.index = None  # built on first use, inside the replica's event loop

    async def _ensure_index(self) -> None:
        if self.index is None:
            import numpy as np

            await self.engine.start()
            vectors = (await self.engine.embed(self.documents)).embeddings
            self.index = np.asarray(vectors, dtype=np.float32)  # rows are unit vectors

    async def search(self, question: str, k: int = 2) -> list[str]:
        import numpy as np

        await self._ensure_index()
        query = np.asarray((await self.engine.embed([question])).embeddings[0], dtype=np.float32)
        scores = self.index @ query
        return [self.documents[i] for i in np.argsort(-scores)[:k]]


@serve.deployment(max_ongoing_requests=32)
class Generator:
    async def __init__(self, model: str = "SmolLM2-135M-Instruct") -> None:
        from shoal.llm.engines import TransformersEngine

        self.engine = TransformersEngine(model)
        await self.engine.start()

    async def answer(self, question: str, passages: list[str], max_tokens: int = 48) -> AsyncIterator[str]:
        from shoal.llm.engines import GenerationRequest, SamplingParams

        context = "\n".join(f"- {p}" for p in passages)
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"},
        ]
        request = GenerationRequest(messages=messages, sampling=SamplingParams(max_tokens=max_tokens, temperature=0))
        async for delta in self.engine.generate(request):
            if delta.text:
                yield delta.text


@serve.deployment(max_ongoing_requests=64)
class RAGPipeline:
    def __init__(self, retriever: DeploymentHandle, generator: DeploymentHandle) -> None:
        self.retriever = retriever
        self.generator = generator.options(stream=True)

    async def __call__(self, request: Request):
        question = request.query_params.get("question", "").strip()
        if not question:
            return JSONResponse({"error": "add a question: /?question=..."}, status_code=400)
        sources = await self.retriever.search.remote(question)
        tokens = self.generator.answer.remote(question, sources)
        if request.query_params.get("stream") == "true":
            return StreamingResponse(tokens, media_type="text/plain")
        answer = "".join([t async for t in tokens]).strip()
        return JSONResponse({"question": question, "answer": answer, "sources": sources})


app = RAGPipeline.bind(Retriever.bind(), Generator.bind())
