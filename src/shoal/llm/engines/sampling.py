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

A request that uses none of these costs one attribute check per row and step. Each request's state
lives in a `LogitsProcessor` (its token counts), made by `make_logits_processor` when it needs one.
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
    """One request's penalties and bias, and the counts of the tokens it has generated so far."""

    __slots__ = ("presence", "frequency", "bias_ids", "bias_values", "counts")

    def __init__(
        self,
        vocab_size: int,
        device: Any,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Optional[dict[int, float]] = None,
    ) -> None:
        import torch

        self.presence = float(presence_penalty)
        self.frequency = float(frequency_penalty)
        self.bias_ids: Optional[torch.Tensor] = None
        self.bias_values: Optional[torch.Tensor] = None
        if logit_bias:
            self.bias_ids = torch.tensor(list(logit_bias), dtype=torch.long, device=device)
            self.bias_values = torch.tensor(list(logit_bias.values()), dtype=torch.float32, device=device)
        self.counts: Optional[torch.Tensor] = None
        if self.presence or self.frequency:
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)

    def observe(self, token: int) -> None:
        """Count a generated token (call once per token, after it is chosen)."""
        if self.counts is not None and 0 <= token < self.counts.shape[0]:
            self.counts[token] += 1


def make_logits_processor(params: Any, vocab_size: int, device: Any) -> Optional[LogitsProcessor]:
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
    """Apply each row's processor (None: untouched) to `logits` ``[rows, vocab]`` in place; returns it."""
    import torch

    penalized = [i for i, p in enumerate(processors) if p is not None and p.counts is not None]
    if penalized:
        rows = torch.tensor(penalized, dtype=torch.long, device=logits.device)
        counts = torch.stack([processors[i].counts for i in penalized])  # type: ignore[union-attr]
        frequency = torch.tensor([processors[i].frequency for i in penalized], device=logits.device)  # type: ignore[union-attr]
        presence = torch.tensor([processors[i].presence for i in penalized], device=logits.device)  # type: ignore[union-attr]
        penalty = frequency.view(-1, 1) * counts + presence.view(-1, 1) * (counts > 0).float()
        width = min(logits.shape[1], penalty.shape[1])
        logits[rows, :width] -= penalty[:, :width].to(logits.dtype)
    for i, p in enumerate(processors):
        if p is not None and p.bias_ids is not None:
            logits[i].index_add_(0, p.bias_ids, p.bias_values.to(logits.dtype))  # type: ignore[union-attr]
    return logits


def sample_tokens(
    logits: "torch.Tensor",
    params: Sequence[Any],
    generators: Sequence[Any],
    default_generator: Any = None,
) -> list[int]:
    """One token per row: argmax where ``temperature`` is ~0, else temperature / top-p sampling with
    the row's generator (None: `default_generator`). `params` are the rows' `SamplingParams`."""
    import torch

    chosen = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.temperature <= 1e-5:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        generator = generators[i] if generators[i] is not None else default_generator
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(0)
            sorted_probs[(cumulative - sorted_probs) >= p.top_p] = 0.0
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
