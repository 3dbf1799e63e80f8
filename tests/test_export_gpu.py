"""How many layers of a GGUF export hands llama.cpp's GPU (kmed/ggufio.py), without a GPU here: the layer
arithmetic, the GGUF's shape read from its metadata, and the offload of a file on a faked card."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmed import ggufio
from kmed.ggufio import GGUF_RESERVE, gguf_layers, gpu_offload, offload_layers

GIB = 2**30
QWEN_32B_KV = 2 * 64 * 8 * 128 * 2  # f16 K and V of 64 layers, 8 KV heads of 128 a token


def test_a_32b_f16_gguf_goes_in_part_on_a_24_gib_card() -> None:
    reserve = int(GGUF_RESERVE + QWEN_32B_KV * 1024)
    n = offload_layers(int(65.5e9), 64, 24 * GIB, reserve)
    assert n == int((24 * GIB - reserve) // (65.5e9 / 65)) == 23  # ~1.0 GB a layer


def test_a_32b_q4_k_m_gguf_goes_whole_on_an_80_gib_card() -> None:
    assert offload_layers(int(19.9e9), 64, 80 * GIB, int(GGUF_RESERVE + QWEN_32B_KV * 1024)) == -1


def test_no_free_memory_offloads_nothing() -> None:
    assert offload_layers(int(19.9e9), 64, 0, int(GGUF_RESERVE)) == 0
    assert offload_layers(int(19.9e9), 64, int(GGUF_RESERVE), int(GGUF_RESERVE)) == 0
    # Room for every block but not the embeddings and output head: all blocks, not -1.
    assert offload_layers(6500, 64, 6400, 0) == 64


def test_shape_of_the_embedded_gguf() -> None:
    from kmed.modeling import embedded_gguf

    # SmolLM2-135M: 30 layers, 3 KV heads of 64 (hidden 576 over 9 heads).
    assert gguf_layers(embedded_gguf()) == (30, 2 * 30 * 3 * 64 * 2)


def test_gpu_offload_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f16 = tmp_path / "model-f16.gguf"
    f16.write_bytes(b"\0" * 6500)
    monkeypatch.setattr(ggufio, "gguf_layers", lambda path: (64, 0))
    monkeypatch.setattr(ggufio, "GGUF_RESERVE", 0)
    assert gpu_offload(f16, backend=False) == 0  # llama-cpp-python without a GPU backend: CPU
    monkeypatch.setattr(ggufio, "free_gpu_bytes", lambda: None)
    assert gpu_offload(f16, backend=True) == -1  # free memory unknown: all, as before
    monkeypatch.setattr(ggufio, "free_gpu_bytes", lambda: 3300)
    assert gpu_offload(f16, backend=True) == 33  # 100 bytes a layer
    monkeypatch.setattr(ggufio, "free_gpu_bytes", lambda: 6500)
    assert gpu_offload(f16, backend=True) == -1


def test_llama_cpp_work_runs_in_a_process_of_its_own_and_a_crash_there_is_one_sentence() -> None:
    """export hands every llama.cpp call to `isolated` (llama.cpp's CUDA backend and torch's crash in one process on
    the GPU machine): the result comes back, and a worker that dies (here: SIGABRT) is a StageError, not a hang."""
    import math
    import os

    from kmed.io import StageError

    assert ggufio.isolated(math.sqrt, 16.0) == 4.0
    assert ggufio.isolated(os.getpid) != os.getpid()
    with pytest.raises(StageError, match="llama.cpp crashed in its worker process while running abort"):
        ggufio.isolated(os.abort)


def test_the_gpu_memory_cap_is_read_in_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    from kmed.io import gpu_free_planned

    monkeypatch.delenv("KMED_GPU_MEM_GB", raising=False)
    assert gpu_free_planned(80 * GIB, reserved=GIB) == 80 * GIB  # no cap: what CUDA reports
    monkeypatch.setenv("KMED_GPU_MEM_GB", "24")
    assert gpu_free_planned(80 * GIB, reserved=GIB) == 23 * GIB  # the cap, less what torch already holds
    assert gpu_free_planned(10 * GIB) == 10 * GIB  # a cap above the free memory changes nothing


def test_a_quantized_gguf_decodes_a_batch_on_any_cpu() -> None:
    """open_gguf turns llama.cpp's extra CPU buffers off: a natively built llama.cpp on an AMX CPU
    (this suite's Sapphire Rapids machines) segfaulted here in the first batched decode of a quantized
    GGUF (ggml-org/llama.cpp#20824). On CPUs without AMX the decode works either way, so the worker also
    checks the model params llama.cpp was handed: extra buffer types (repacking) off, where the default
    has them on."""
    from kmed.modeling import embedded_gguf

    assert ggufio.isolated(_decode_32, embedded_gguf()) == 32 * 49152  # the shipped GGUF is Q4_1


def _decode_32(path: Path) -> int:
    """In the worker, as export runs it: 32 tokens in one batch; the wrap of the defaults is undone after."""
    import llama_cpp.llama as llama_module
    import numpy as np

    defaults = llama_module.llama_cpp.llama_model_default_params
    llm = ggufio.open_gguf(path, logits_all=True)
    assert llama_module.llama_cpp.llama_model_default_params is defaults
    assert defaults().use_extra_bufts is True and llm.model_params.use_extra_bufts is False
    try:
        llm.eval(list(range(100, 132)))
        scores = np.asarray(llm.scores[:32])
        assert np.isfinite(scores).all()
        return int(scores.size)
    finally:
        llm.close()


@pytest.mark.integration
def test_the_converter_reports_its_own_peak_not_the_parents(tmp_path: Path, smol_tokenizer) -> None:  # noqa: ANN001
    """A child's ru_maxrss carries the parent's RSS across fork+exec, so export once recorded its own
    size as the converter's; convert_f16 returns the converter's VmHWM instead."""
    import resource

    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "tiny_llama"  # SmolLM2's architecture: the converter knows its tokenizer
    smol_tokenizer.save_pretrained(model_dir)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True)).save_pretrained(model_dir)

    ballast = bytearray(1500 * 2**20)  # the parent at 1.5 GB+, as export is with a model loaded
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page
    out = tmp_path / "m.gguf"
    peak = ggufio.convert_f16(model_dir, out)
    assert out.stat().st_size > 0
    assert peak is not None and 100 < peak < 1200, peak
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 > 1500
    del ballast
