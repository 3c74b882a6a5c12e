# The README's two commands: `make eval` (main job on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
unexport VLLM_CPU_KVCACHE_SPACE

.PHONY: setup lint test test-fast eval signals clean
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

# the signal study on the shipped model (README "The signal study"): results/signals.md and its plots
signals: setup
	$(VENV)/bin/telltale signals --model lm_eval_telltale/arith/telltale-arith-tiny --tasks telltale_arith \
		--limit 25 --dtype float32 --kv-cache-memory-bytes 268435456 --out .cache/signals $(SIGNALS_ARGS)
	cp .cache/signals/signals.md .cache/signals/signals_corr.png .cache/signals/signals_think.png results/

clean:
	rm -rf $(VENV) build dist *.egg-info
