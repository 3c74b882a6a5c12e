"""Transformers adapter: the ``hf-*`` model types (:mod:`.harness`) over lm-eval's HF model, driving
the same engine-agnostic core as the vLLM adapter through hooks on the stock decoder layers and
their own generation loop (:mod:`.runtime`). Import-light: transformers and lm-eval are imported
by the submodules; nothing here imports vLLM."""
