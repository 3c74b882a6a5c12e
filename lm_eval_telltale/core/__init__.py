"""Engine-agnostic core: pure torch, unit-testable on crafted tensors.

Nothing here knows about vLLM or lm-eval. The adapters (``lm_eval_telltale.vllm``,
``lm_eval_telltale.hf``) build a :class:`~lm_eval_telltale.core.step.StepMap` per forward step
and call :class:`~lm_eval_telltale.core.engine.CoreEngine` once per patched layer.
"""
