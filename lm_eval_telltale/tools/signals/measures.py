"""The per-token signals of ``telltale signals``, as torch operations on crafted or captured tensors.

Every entropy is in nats, computed in float32. ``docs/methods.md`` §9 defines each with its source:

- ``norm``: ‖h_l(t)‖₂, the residual stream after decoder layer l (the package's one norm,
  :func:`lm_eval_telltale.core.engine.residual_norm`);
- ``hidden_entropy``: the entropy of the energy distribution of h over its dimensions,
  p_i = h_i² / ‖h‖² (scale-free: it does not move when only the norm does);
- ``lens_entropy``: the logit-lens entropy, H(softmax(W_U · norm_final(h_l)));
- ``attn_entropy``: the entropy of token t's attention row at layer l, averaged over heads;
- ``output_entropy``: H(softmax(logits_t)), the model's next-token distribution (one per token,
  the same at every layer).
"""

from __future__ import annotations

import torch

from ...core.engine import residual_norm

#: the signals compared with the SAE's reasoning-feature score, in report order
SIGNALS = ("norm", "hidden_entropy", "lens_entropy", "attn_entropy", "output_entropy")
#: the entropy signals (the paper's alternatives to the norm)
ENTROPIES = SIGNALS[1:]


def l2_norm(h: torch.Tensor) -> torch.Tensor:
    """[..., d] → [...]: ‖h‖₂ in float32."""
    return residual_norm(h, None)[1]


def entropy_of(p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """−Σ p log p over the last dimension, with 0·log 0 = 0."""
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def logits_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] → [...]: the entropy of softmax(logits)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return entropy_of(logp.exp(), logp)


def hidden_entropy(h: torch.Tensor) -> torch.Tensor:
    """[..., d] → [...]: the entropy of p_i = h_i² / ‖h‖² (0 for a one-hot h, log d for a flat one)."""
    e = h.float().square()
    p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return entropy_of(p, torch.log(p.clamp_min(torch.finfo(torch.float32).tiny)))


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """[heads, T_q, T_k] attention probabilities (rows sum to 1) → [T_q]: the mean over heads of
    each query row's entropy."""
    w = weights.float()
    return entropy_of(w, torch.log(w.clamp_min(torch.finfo(torch.float32).tiny))).mean(0)
