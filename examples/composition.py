"""Model composition: a pipeline that retrieves documents, then generates an answer from them.

Run it with `shoal run examples.composition:app` and ask over HTTP
(`curl 'http://127.0.0.1:8000/?query=what+do+fish+eat'`), or from Python:

    from shoal import serve
    from examples.composition import app
    handle = serve.run(app)
    print(handle.remote("what do fish eat?").result())

The same file runs on Ray Serve by changing the import to `from ray import serve`.
"""

from shoal import serve

DOCUMENTS = [
    "Fish eat plankton, insects and smaller fish.",
    "Ray Serve composes deployments with handles.",
    "shoal runs Ray Serve applications without a cluster.",
]


@serve.deployment
class Retriever:
    def retrieve(self, query: str) -> list[str]:
        words = set(query.lower().split())
        ranked = sorted(DOCUMENTS, key=lambda d: -len(words & set(d.lower().rstrip(".").split())))
        return ranked[:2]


@serve.deployment
class Generator:
    async def generate(self, docs: list[str], query: str) -> str:
        return f"Q: {query}\nA (from {len(docs)} documents): {docs[0]}"


@serve.deployment
class RAGPipeline:
    def __init__(self, retriever, generator):
        self.retriever = retriever
        self.generator = generator

    async def __call__(self, query) -> str:
        if hasattr(query, "query_params"):  # over HTTP: GET /?query=...
            query = query.query_params.get("query", "")
        docs = await self.retriever.retrieve.remote(query)
        return await self.generator.generate.remote(docs, query)


app = RAGPipeline.bind(Retriever.bind(), Generator.bind())
