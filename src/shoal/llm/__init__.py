"""OpenAI-compatible LLM serving for shoal (the counterpart of `ray.serve.llm`)."""
