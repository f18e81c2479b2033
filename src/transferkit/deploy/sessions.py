"""ONNX Runtime sessions over files a stranger may have sent: ONNX files are data (no code runs), yet a graph can
build tensors its bytes do not pay for (ConstantOfShape), and count its own work (graph.py finds its loops)."""

from __future__ import annotations

import functools
from pathlib import Path

from transferkit.errors import TransferkitError


@functools.cache
def bounded_arena() -> int:
    """The bytes ONNX Runtime's arena may hold in this process, half of what it may use (memory_limit is a quarter):
    past it an allocation fails with an error, where it would have the process killed for memory."""
    import onnxruntime as ort

    from transferkit.data.memory import memory_limit

    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(2 * memory_limit(), -1, -1, -1))
    return 2 * memory_limit()


def ort_session(path: Path | str, threads: int):
    import onnxruntime as ort

    bounded_arena()
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.use_env_allocators", "1")  # the arena bounded_arena registered
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # fatal only: an error reaches the user once, as transferkit's own line
    try:
        # folding a graph's constants runs its nodes as the session is made, before any bound on a run applies
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=["ConstantFolding"])
    except Exception as e:  # onnxruntime raises its own exception types for broken files
        raise TransferkitError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e}). "
                               f"Fix: write it again: `dvc repro` for the pipeline's own (export, quantize), "
                               f"`transferkit export MODEL.pt` for one you exported.") from e
