"""Small LoRA adapters for the bundled chat model, written by the tests themselves (no download)."""

from __future__ import annotations

import numpy as np

from shoal.llm.models import resolve_model_source

CHAT = "SmolLM2-135M-Instruct"


def write_lora(path: str, seed: int, rank: int = 8, strength: float = 0.12,
               targets: tuple[str, ...] = ("attn_q", "attn_v", "ffn_up")) -> None:
    """A GGUF LoRA adapter for the bundled model: `lora_a` [rank, in] and `lora_b` [out, rank] (numpy
    order) next to each target weight of every block, as llama.cpp's loader expects them."""
    import gguf

    base = gguf.GGUFReader(str(resolve_model_source(CHAT).path))
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for tensor in base.tensors:
        parts = tensor.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in targets and parts[3] == "weight":
            n_in, n_out = int(tensor.shape[0]), int(tensor.shape[1])  # ggml order: ne0 is the input
            writer.add_tensor(tensor.name + ".lora_a", rng.normal(0, strength, (rank, n_in)).astype(np.float32))
            writer.add_tensor(tensor.name + ".lora_b", rng.normal(0, strength, (n_out, rank)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


_HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_v": "self_attn.v_proj", "ffn_up": "mlp.up_proj"}


def write_peft_lora(directory: str, seed: int, rank: int = 8, strength: float = 0.12,
                    targets: tuple[str, ...] = ("attn_q", "attn_v", "ffn_up")) -> None:
    """The same kind of adapter as a PEFT directory (``adapter_config.json`` and
    ``adapter_model.safetensors``), for the transformers engine."""
    import json
    import os

    import gguf
    import torch
    from safetensors.torch import save_file

    base = gguf.GGUFReader(str(resolve_model_source(CHAT).path))
    rng = np.random.default_rng(seed)
    tensors = {}
    for tensor in base.tensors:
        parts = tensor.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in targets and parts[3] == "weight":
            n_in, n_out = int(tensor.shape[0]), int(tensor.shape[1])
            key = f"base_model.model.model.layers.{parts[1]}.{_HF_NAMES[parts[2]]}"
            tensors[key + ".lora_A.weight"] = torch.from_numpy(rng.normal(0, strength, (rank, n_in)).astype(np.float32))
            tensors[key + ".lora_B.weight"] = torch.from_numpy(rng.normal(0, strength, (n_out, rank)).astype(np.float32))
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": rank,
                   "target_modules": sorted({_HF_NAMES[t].split(".")[-1] for t in targets})}, f)
