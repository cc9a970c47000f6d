"""AMX for the llama.cpp engine (shoal.llm.engines.llama_amx): the crash probe runs in a child and
is remembered per build, released file pages are dropped from this process yet still readable,
and the engine falls back to llama.cpp's generic kernels where the AMX kernels fault.

Real child processes, a real mapped file, the bundled GGUF; nothing asserts on timings.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from pathlib import Path

import pytest

from shoal.llm.engines import llama_amx

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_probe_in_child_tells_a_crash_from_a_clean_run() -> None:
    crash = "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"
    assert llama_amx.probe_in_child(Path("unused"), code=crash) is False
    assert llama_amx.probe_in_child(Path("unused"), code="import sys\nprint('ok')\nsys.exit(1)\n") is False
    assert llama_amx.probe_in_child(Path("unused"), code="print('loading')\nprint('ok')\n") is True


def test_the_answer_is_remembered_per_build_and_model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "cache"))
    probes: list[Path] = []

    def fake_probe(model_path: Path, code: str = llama_amx.PROBE_CODE) -> bool:
        probes.append(model_path)
        return False

    monkeypatch.setattr(llama_amx, "probe_in_child", fake_probe)
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(64))
    assert llama_amx.amx_kernels_work(model) is False
    assert llama_amx.amx_kernels_work(model) is False
    assert probes == [model]  # the second answer came from the cache file
    assert (tmp_path / "cache" / "llama-amx-probe.json").is_file()
    model.write_bytes(b"GGUF" + bytes(128))  # another file: asked again
    assert llama_amx.amx_kernels_work(model) is False
    assert probes == [model, model]


def _resident_kib(path: Path) -> int:
    """Rss of this process's mappings of `path`, from /proc/self/smaps."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" not in fields[0]:
                inside = len(fields) >= 6 and fields[5] == target
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_released_pages_leave_the_resident_set_and_read_back_unchanged(tmp_path: Path) -> None:
    data = bytes(range(256)) * (4 * 4096)  # 4 MiB
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert mapped[:] == data  # every page read: resident
        before = _resident_kib(path)
        assert before >= 4096
        assert llama_amx.release_file_pages(path) >= len(data)
        assert _resident_kib(path) < before // 4
        assert mapped[:] == data  # faulted back in from the page cache


def test_the_engine_runs_without_repacked_weights_where_the_amx_kernels_fault(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from shoal.llm.engines import GenerationRequest, LlamaCppEngine, SamplingParams
    from shoal.llm.engines import llama_cpp as engine_module

    monkeypatch.setattr(engine_module, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(engine_module, "amx_kernels_work", lambda path: False)
    engine = LlamaCppEngine(max_num_seqs=2, warmup=False)

    async def answer() -> str:
        await engine.start()
        try:
            request = GenerationRequest(prompt="The capital of France is",
                                        sampling=SamplingParams(temperature=0, max_tokens=4))
            return "".join([d.text async for d in engine.generate(request)])
        finally:
            await engine.shutdown()

    text = asyncio.run(answer())
    assert engine.extra_buffers is False
    assert text.strip()


@pytest.mark.skipif(not llama_amx.cpu_has_amx(), reason="the CPU has no AMX")
def test_make_install_builds_llama_cpp_whose_amx_kernels_run() -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from shoal.llm.models import resolve_model_source

    path = resolve_model_source("SmolLM2-135M-Instruct").path
    assert llama_amx.probe_in_child(path), (
        "llama.cpp's AMX kernels fault in the installed llama-cpp-python: was it built without the "
        "Makefile's LLAMA_CMAKE_ARGS (-fno-tree-dse -fno-dse), e.g. from pip's wheel cache?"
    )
