"""Per-request logits processing, token choice and logprobs over a batch of logits (torch).

Shared by the engines that produce one row of logits per running sequence (the transformers engine,
and any engine that can hand over its logits as a tensor). A step does, for the rows of a batch:

1. `apply_logits_processors`: OpenAI's penalties over each request's generated tokens
   (``logit -= frequency_penalty * count + presence_penalty * (count > 0)``) and its `logit_bias`
   (added to the logits), only for the rows whose request asked for them;
2. `sample_tokens`: argmax for greedy rows, else temperature / top-p sampling with the request's own
   generator (a seeded request) or the engine's;
3. `token_logprobs`: the chosen token's log-probability and the `k` most likely alternatives, for the
   rows whose request asked for logprobs (log-softmax of the processed logits, before temperature).
   `row_logprobs` is the same for one row in numpy, for the llama.cpp engine, which has no torch.

A request that uses none of these costs one attribute check per row and step. Each request's state
lives in a `LogitsProcessor` (its bias and token counts, sparse), made by `make_logits_processor`
when it needs one; an engine calls its `observe` with each chosen token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "LogitsProcessor",
    "RowLogprobs",
    "apply_logits_processors",
    "make_logits_processor",
    "row_logprobs",
    "sample_tokens",
    "token_logprobs",
    "validate_logit_bias",
]


def validate_logit_bias(logit_bias: Optional[dict[int, float]], vocab_size: int) -> None:
    """``ValueError`` unless every key is a token id of the vocabulary and every bias in [-100, 100]."""
    for token_id, bias in (logit_bias or {}).items():
        if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
            raise ValueError(f"logit_bias: token id {token_id!r} is not in the vocabulary (0..{vocab_size - 1})")
        if not -100 <= bias <= 100:
            raise ValueError(f"logit_bias: the bias of token {token_id} must be in [-100, 100], got {bias}")


class LogitsProcessor:
    """One request's penalties and bias, and the counts of the tokens it has generated so far.

    Everything is kept sparse (token id -> value), so a step touches only the biased and already
    generated tokens of the row, never the whole vocabulary."""

    __slots__ = ("presence", "frequency", "bias", "counts")

    def __init__(
        self,
        vocab_size: int,
        device: Any = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Optional[dict[int, float]] = None,
    ) -> None:
        self.presence = float(presence_penalty)
        self.frequency = float(frequency_penalty)
        self.bias: dict[int, float] = {int(k): float(v) for k, v in (logit_bias or {}).items()}
        #: Generated token -> how many times (None: the request has no penalty).
        self.counts: Optional[dict[int, int]] = {} if (self.presence or self.frequency) else None

    def observe(self, token: int) -> None:
        """Count a generated token (call once per token, after it is chosen)."""
        counts = self.counts
        if counts is not None:
            counts[token] = counts.get(token, 0) + 1

    def adjustments(self) -> dict[int, float]:
        """Token id -> what to add to its logit now (bias minus penalties)."""
        if not self.counts:
            return self.bias
        out = dict(self.bias)
        frequency, presence = self.frequency, self.presence
        for token, count in self.counts.items():
            out[token] = out.get(token, 0.0) - (frequency * count + presence)
        return out


def make_logits_processor(params: Any, vocab_size: int, device: Any = None) -> Optional[LogitsProcessor]:
    """A processor for `params` (a `SamplingParams`), or None when it asks for no penalty or bias."""
    presence = getattr(params, "presence_penalty", 0.0) or 0.0
    frequency = getattr(params, "frequency_penalty", 0.0) or 0.0
    bias = getattr(params, "logit_bias", None) or None
    if not (presence or frequency or bias):
        return None
    validate_logit_bias(bias, vocab_size)
    return LogitsProcessor(vocab_size, device, presence, frequency, bias)


def apply_logits_processors(
    logits: "torch.Tensor", processors: Sequence[Optional[LogitsProcessor]]
) -> "torch.Tensor":
    """Apply each row's processor (None: untouched) to `logits` ``[rows, vocab]``, as one sparse add
    over the whole batch; returns the result (`logits` itself, changed in place, when contiguous)."""
    import torch

    if not logits.is_contiguous():
        logits = logits.contiguous()
    width = logits.shape[1]
    flat: list[int] = []
    values: list[float] = []
    for row, processor in enumerate(processors):
        if processor is None:
            continue
        base = row * width
        for token, value in processor.adjustments().items():
            if 0 <= token < width:
                flat.append(base + token)
                values.append(value)
    if flat:
        index = torch.tensor(flat, dtype=torch.long, device=logits.device)
        delta = torch.tensor(values, dtype=logits.dtype, device=logits.device)
        logits.view(-1).index_add_(0, index, delta)
    return logits


def sample_tokens(
    logits: "torch.Tensor",
    params: Sequence[Any],
    generators: Sequence[Any],
    default_generator: Any = None,
) -> list[int]:
    """One token per row: argmax where ``temperature`` is ~0, else temperature / top-k / top-p
    sampling with the row's generator (None: `default_generator`). `params` are the rows'
    `SamplingParams`."""
    import torch

    chosen = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.temperature <= 1e-5:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        generator = generators[i] if generators[i] is not None else default_generator
        top_k = p.top_k if getattr(p, "top_k", None) is not None and p.top_k > 0 else 0
        if p.top_p < 1.0 or top_k:
            sorted_probs, order = probs.sort(descending=True)
            if top_k:
                sorted_probs[top_k:] = 0.0
            cumulative = sorted_probs.cumsum(0)
            mass = p.top_p * (cumulative[-1] if top_k else 1.0)  # of what top-k kept
            sorted_probs[(cumulative - sorted_probs) >= mass] = 0.0
            pick = torch.multinomial(sorted_probs, 1, generator=generator)
            chosen[i] = int(order[pick].item())
        else:
            chosen[i] = int(torch.multinomial(probs, 1, generator=generator).item())
    return chosen


@dataclass
class RowLogprobs:
    """A chosen token's log-probability and the `k` most likely tokens ``[(id, logprob)]``, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(
    logits: "torch.Tensor", chosen: Sequence[int], top_k: Sequence[Optional[int]]
) -> list[Optional[RowLogprobs]]:
    """For each row whose `top_k` is not None: log-softmax of its logits, the chosen token's value
    and its `top_k` best alternatives (one transfer from the device for the whole batch)."""
    import torch

    rows = [i for i, k in enumerate(top_k) if k is not None]
    out: list[Optional[RowLogprobs]] = [None] * len(top_k)
    if not rows:
        return out
    device = logits.device
    index = torch.tensor(rows, dtype=torch.long, device=device)
    lp = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    picked = torch.tensor([chosen[i] for i in rows], dtype=torch.long, device=device).view(-1, 1)
    chosen_lp = lp.gather(1, picked).view(-1).tolist()
    k_max = max(int(top_k[i] or 0) for i in rows)
    top_vals: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if k_max > 0:
        values, ids = lp.topk(min(k_max, lp.shape[1]), dim=-1)
        top_vals, top_ids = values.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        k = int(top_k[i] or 0)
        out[i] = RowLogprobs(chosen[i], chosen_lp[j], list(zip(top_ids[j][:k], top_vals[j][:k])))
    return out


def row_logprobs(logits: Any, chosen: int, k: int) -> RowLogprobs:
    """`token_logprobs` for one row of logits in numpy (a 1-D float32 array, left unchanged): the
    llama.cpp engine's replicas never import torch (hundreds of MB and seconds at a first logprobs
    request)."""
    import numpy as np

    shifted = logits - logits.max()
    lp = shifted - np.log(np.exp(shifted).sum(dtype=np.float32))
    top: list[tuple[int, float]] = []
    if k > 0:
        k = min(k, lp.shape[0])
        kth = -np.partition(-lp, k - 1)[k - 1]  # the k-th best value
        ids = np.flatnonzero(lp >= kth)  # every token that good (ties included)
        ids = ids[np.lexsort((ids, -lp[ids]))][:k]  # best first; equal values by id
        top = [(int(i), float(lp[i])) for i in ids]
    return RowLogprobs(int(chosen), float(lp[chosen]), top)
