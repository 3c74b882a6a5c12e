"""``vllm-norms``: observe the residual-stream norm; change nothing."""

from .engine import Method

KEYS: dict = {}
METHOD = Method
