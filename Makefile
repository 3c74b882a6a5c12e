# The README's two commands: `make eval` (main job on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
unexport VLLM_CPU_KVCACHE_SPACE

.PHONY: setup lint test test-fast eval clean
setup:
	@bash scripts/setup_env.sh

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -ra --durations=30 $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest -ra -m "not engine and not e2e" $(PYTEST_ARGS)

eval: setup
	$(PY) -m lm_eval_telltale.tools.demo $(EVAL_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
