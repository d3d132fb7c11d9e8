# Two entry points, both self-installing into .venv (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test
setup: $(BIN)/telefuser-run

# torch is pinned to the CPU build on the dev/CI machines' disk; an unpinned
# torch would pull a multi-GB CUDA build.
$(BIN)/telefuser-run: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: setup
	mkdir -p out
	$(BIN)/telefuser-compile recipes/tiny.toml -o out/tiny.plan.json
	$(BIN)/telefuser-run out/tiny.plan.json --prompt "a red fox running through fresh snow" -o out/tiny.mp4

test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q
