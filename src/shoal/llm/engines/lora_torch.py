"""LoRA adapters for the transformers engine: PEFT adapter directories applied per batch row.

A PEFT LoRA directory holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``) and
``adapter_model.safetensors`` (``...<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]).
It is read here with `safetensors` (no `peft` dependency, and the engine's int8 layers are not
`nn.Linear`, which peft would need). Each targeted module is wrapped once in a `LoraLinear`, which
adds ``scale * (x @ A.T) @ B.T`` to the rows of the batch whose sequence uses an adapter with
weights for that module. Which rows use which adapter is set by the engine before each forward
(`LoraRows.set`): a batch with no adapter costs one attribute check per wrapped module.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from .base import LoraAdapterBase

__all__ = ["LoraRows", "TorchLoraAdapter", "load_peft_adapter", "wrap_targets"]


class TorchLoraAdapter(LoraAdapterBase):
    """One loaded adapter: module name -> (A [r, in], B [out, r]) and its scale (alpha / r)."""

    def __init__(self, name: str, path: str, weights: dict[str, tuple[Any, Any]], scale: float) -> None:
        super().__init__(name, path)
        self.weights = weights
        self.scale = scale


class LoraRows:
    """The current forward's rows per adapter: ``[(adapter, row index tensor or None for all)]``."""

    __slots__ = ("groups",)

    def __init__(self) -> None:
        self.groups: list[tuple[TorchLoraAdapter, Any]] = []

    def set(self, adapters: Sequence[Any], device: Any) -> None:
        """Row i of the next forward uses `adapters[i]` (None: the base model)."""
        import torch

        if all(a is None for a in adapters):
            self.groups = []
            return
        groups: dict[int, tuple[TorchLoraAdapter, list[int]]] = {}
        for i, adapter in enumerate(adapters):
            if adapter is not None:
                groups.setdefault(id(adapter), (adapter, []))[1].append(i)
        n = len(adapters)
        self.groups = [(a, None if len(rows) == n else torch.tensor(rows, device=device)) for a, rows in groups.values()]


def _make_lora_linear_class() -> type:
    from torch import nn

    class LoraLinear(nn.Module):
        """`base(x)` plus each active adapter's low-rank update on its rows."""

        def __init__(self, base: nn.Module, name: str, rows: LoraRows) -> None:
            super().__init__()
            self.base = base
            self.lora_name = name
            self.rows = rows

        def forward(self, x: Any) -> Any:
            y = self.base(x)
            groups = self.rows.groups
            if not groups:
                return y
            name = self.lora_name
            for adapter, index in groups:
                pair = adapter.weights.get(name)
                if pair is None:
                    continue
                a, b = pair
                part = x if index is None else x.index_select(0, index)
                delta = _low_rank(part.to(a.dtype), a, b).mul_(adapter.scale).to(y.dtype)
                y = y + delta if index is None else y.index_add(0, index, delta)
            return y

    return LoraLinear


def _low_rank(x: Any, a: Any, b: Any) -> Any:
    """``x @ a.T @ b.T``. One token per row (a decode step) is computed with broadcast products and
    sums, whose per-row result does not depend on how many rows run together (a matmul's blocking
    does, which would make greedy output depend on the batch); longer inputs (a prefill, which
    runs alone) use matmuls."""
    if x.shape[-2] != 1:
        return x @ a.t() @ b.t()
    h = (x.unsqueeze(-1) * a.t()).sum(-2)  # [rows, 1, r]
    return (h.unsqueeze(-1) * b.t()).sum(-2)  # [rows, 1, out]


_LORA_LINEAR: Any = None


def wrap_targets(model: Any, names: Sequence[str], rows: LoraRows) -> int:
    """Wrap the modules named `names` (full dotted names in `model`) that are not wrapped yet;
    returns how many were wrapped."""
    global _LORA_LINEAR
    if _LORA_LINEAR is None:
        _LORA_LINEAR = _make_lora_linear_class()
    wrapped = 0
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, _LORA_LINEAR):
            continue
        setattr(parent, child, _LORA_LINEAR(module, name, rows))
        wrapped += 1
    return wrapped


def _module_name(key: str, model_names: set[str]) -> str | None:
    """The model's module for a PEFT weight key (``base_model.model.<module>.lora_A.weight``)."""
    stem = key.removeprefix("base_model.model.")
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        return None
    for candidate in (stem, stem.removeprefix("model.")):
        if candidate in model_names:
            return candidate
    return None


def load_peft_adapter(model: Any, name: str, path: str, device: Any, dtype: Any) -> TorchLoraAdapter:
    """Read a PEFT LoRA directory for `model` (ValueError naming what is wrong)."""
    from safetensors.torch import load_file

    config_path = os.path.join(path, "adapter_config.json")
    weights_path = os.path.join(path, "adapter_model.safetensors")
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise ValueError(f"LoRA adapter {name!r}: {path} must hold adapter_config.json and "
                         "adapter_model.safetensors (a PEFT LoRA adapter) for the transformers engine")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"LoRA adapter {name!r}: peft_type is {config.get('peft_type')!r}, not LORA")
    rank = int(config.get("r") or 8)
    scale = float(config.get("lora_alpha") or rank) / rank
    tensors = load_file(weights_path)
    model_names = {n for n, _ in model.named_modules()}
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        module = _module_name(key, model_names)
        if module is None:
            raise ValueError(f"LoRA adapter {name!r}: weight {key!r} matches no module of the model")
        pairs.setdefault(module, {})["A" if ".lora_A." in key else "B"] = tensor
    weights = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {name!r}: module {module} lacks lora_A or lora_B")
        a, b = pair["A"].to(device=device, dtype=dtype), pair["B"].to(device=device, dtype=dtype)
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA adapter {name!r}: {module}: lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)} disagree on the rank")
        target = model.get_submodule(module)
        target = getattr(target, "base", target)  # already wrapped by an earlier adapter
        n_in, n_out = getattr(target, "in_features", a.shape[1]), getattr(target, "out_features", b.shape[0])
        if (a.shape[1], b.shape[0]) != (n_in, n_out):
            raise ValueError(f"LoRA adapter {name!r}: {module} maps {n_in} -> {n_out} features, the adapter "
                             f"{a.shape[1]} -> {b.shape[0]} (an adapter for another model?)")
        weights[module] = (a.contiguous(), b.contiguous())
    if not weights:
        raise ValueError(f"LoRA adapter {name!r}: {weights_path} holds no LoRA weights")
    return TorchLoraAdapter(name, path, weights, scale)
