"""Per-step cost of the shared sampling path (`shoal.llm.engines.sampling`) on a 16-row batch of
logits the size of the bundled model's vocabulary, CPU: plain greedy rows, rows with penalties and
bias, rows with logprobs. Run: PYTHONPATH=src python benchmarks/llm_sampling_cost.py"""
import time, torch
from shoal.llm.engines.base import SamplingParams
from shoal.llm.engines.sampling import apply_logits_processors, sample_tokens, token_logprobs, make_logits_processor
torch.manual_seed(0)
V, B = 49152, 16
logits = torch.randn(B, V)
class S:  # a sequence as the engine sees it
    def __init__(self, p): self.params = p; self.generator = None; self.logits_processor = make_logits_processor(p, V, "cpu")
def old(logits, seqs):  # main's _sample: argmax, per-row sampling for temperature > 0
    chosen = logits.argmax(dim=-1).tolist()
    return chosen
def new(logits, seqs):
    processors = [s.logits_processor for s in seqs]
    if any(p is not None for p in processors):
        apply_logits_processors(logits, processors)
    tokens = sample_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs], None)
    top_k = [s.params.logprobs for s in seqs]
    if any(k is not None for k in top_k):
        token_logprobs(logits, tokens, top_k)
    for s, t in zip(seqs, tokens):
        if s.logits_processor is not None: s.logits_processor.observe(t)
    return tokens
def bench(fn, seqs, n=300):
    fn(logits.clone(), seqs)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n // 5): fn(logits, seqs)
        best = min(best, (time.perf_counter() - t) / (n // 5))
    return best * 1e6
plain = [S(SamplingParams(temperature=0)) for _ in range(B)]
pen = [S(SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=0.5, logit_bias={5: 2.0})) for _ in range(B)]
lp = [S(SamplingParams(temperature=0, logprobs=5)) for _ in range(B)]
print(f"greedy, 16 rows x {V}: main's path {bench(old, plain):.0f} us/step, new path {bench(new, plain):.0f} us/step")
print(f"all 16 rows with penalties+bias: {bench(new, pen):.0f} us/step; all 16 rows with logprobs(5): {bench(new, lp):.0f} us/step")
