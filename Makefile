# On a fresh machine (python3 and pip present), one command each:
#   make demo   set up (venv, torch, build the extension), pretrain a small GPT on the bundled corpus, sample
#   make test   the same set-up, then the test suite (what CI runs, via .ci/run)
# Other targets: make setup | make bench | make ptxas | make clean
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY         := $(VENV)/bin/python
DEPS       := numpy ninja pybind11 "setuptools>=64" wheel pytest transformers accelerate tokenizers tqdm safetensors matplotlib

.PHONY: setup demo test bench ptxas clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(DEPS)
	touch $@

# Rebuild the extension whenever a kernel, a binding or the build files change.
$(VENV)/.built: $(VENV)/.deps setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -m gptkernels info
	touch $@

setup: $(VENV)/.built

# Pretrain a small GPT on the bundled corpus (the Python standard library's top-level modules),
# then sample from it: a few minutes on a 2-core CPU.
demo: setup
	$(PY) -m gptkernels info
	$(PY) -m gptkernels train --preset demo --out-dir runs/demo
	$(PY) -m gptkernels generate runs/demo --prompt "def " --max-new-tokens 120 --seed 0

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m gptkernels bench --quick

ptxas:
	$(PYTHON) tools/ptxas_report.py --archs "$${GPTKERNELS_CUDA_ARCHS:-80;90a}"

clean:
	rm -rf build *.egg-info gptkernels/_C*.so
