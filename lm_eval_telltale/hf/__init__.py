"""Transformers adapter: the engine-agnostic core driven through hooks on the stock decoder layers
of a ``*ForCausalLM`` and its own generation loop (:mod:`.runtime`). The ``hf-*`` lm-eval model
types over lm-eval's HF model build on it (:mod:`lm_eval_telltale.harness.hf`). Import-light:
transformers is imported by the submodules; nothing here imports vLLM or lm-eval."""
