"""The teacher-forced pass of ``telltale signals``: every generation (prompt + generated tokens) run
once through transformers (float32, eager attention), hooks reading the chosen decoder layers.

A generation's rows are the forwards of its generated tokens that the engine ran (position p is
the forward of generated token p − n_prompt; the last generated token is never fed), the rows of a
vLLM or hf ``norms`` trace. Per row it records, at each layer: the residual stream h (float32, kept
for the SAE), its norm, the hidden-state and logit-lens entropies, the attention entropy; and once
the output entropy. Memory: rows × layers × hidden × 4 bytes for h.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...hf.runtime import decoder_layers
from .measures import attention_entropy, hidden_entropy, l2_norm, logits_entropy

#: rows per chunk of the vocabulary projections (logit lens, output entropy)
CHUNK = 256


def load_model(model: str, device: str | None, trust_remote_code: bool = False):
    """The model for the pass: float32, eager attention (the attention weights are read)."""
    from transformers import AutoModelForCausalLM

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager",
                                              trust_remote_code=trust_remote_code)
    return lm.to(dev).eval()


class SignalPass:
    def __init__(self, lm, layers: list[int], attention: bool = True):
        self.lm, self.layers, self.attention = lm, list(layers), attention
        self.decoder = lm.get_decoder()
        self.final_norm = getattr(self.decoder, "norm", None)
        self.head = lm.get_output_embeddings()
        if self.final_norm is None or self.head is None:
            raise ValueError(f"{type(lm).__name__}: no final norm or output embedding to read the logit lens with")
        self.blocks = decoder_layers(lm)
        self._rows: torch.Tensor | None = None
        self._h: dict[int, torch.Tensor] = {}
        self._attn: dict[int, torch.Tensor] = {}

    def _hooks(self):
        handles = []
        for l in self.layers:
            def on_layer(mod, args, out, l=l):
                h = out[0] if isinstance(out, tuple) else out
                self._h[l] = h[0, self._rows].float()
            handles.append(self.blocks[l].register_forward_hook(on_layer))
            if self.attention:
                def on_attn(mod, args, out, l=l):
                    w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
                    if w is None:
                        raise RuntimeError("the attention module returned no weights: the model must run with "
                                           "attn_implementation='eager' (or pass --no-attention)")
                    self._attn[l] = attention_entropy(w[0][:, self._rows])
                handles.append(self.blocks[l].self_attn.register_forward_hook(on_attn))
        return handles

    @torch.no_grad()
    def run(self, prompt_ids: list[int], token_ids: list[int]) -> dict[str, Any]:
        """The rows of one generation: ``position`` [R] and per-row arrays (``h`` [L, R, d] a tensor)."""
        dev = self.head.weight.device
        n_p, n_g = len(prompt_ids), len(token_ids)
        pos = list(range(n_p, n_p + max(0, n_g - 1)))
        L = len(self.layers)
        if not pos:
            z = np.zeros((0, L))
            return {"position": [], "h": torch.zeros(L, 0, self.head.weight.shape[1]), "norm": z,
                    "hidden_entropy": z, "lens_entropy": z, "attn_entropy": z if self.attention else None,
                    "output_entropy": np.zeros(0)}
        ids = torch.tensor([list(prompt_ids) + list(token_ids[:-1])], device=dev)
        self._rows = torch.tensor(pos, device=dev)
        self._h, self._attn = {}, {}
        handles = self._hooks()
        try:
            out = self.decoder(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        last = out.last_hidden_state[0, self._rows]
        h = torch.stack([self._h[l] for l in self.layers])                       # [L, R, d]
        lens = torch.cat([logits_entropy(self.head(self.final_norm(h[:, i:i + CHUNK])))
                          for i in range(0, h.shape[1], CHUNK)], dim=1)
        outp = torch.cat([logits_entropy(self.head(last[i:i + CHUNK])) for i in range(0, last.shape[0], CHUNK)])
        res = {"position": pos, "h": h.cpu(), "norm": l2_norm(h).T.cpu().double().numpy(),
               "hidden_entropy": hidden_entropy(h).T.cpu().double().numpy(),
               "lens_entropy": lens.T.cpu().double().numpy(),
               "attn_entropy": (torch.stack([self._attn[l] for l in self.layers]).T.cpu().double().numpy()
                                if self.attention else None),
               "output_entropy": outp.cpu().double().numpy()}
        self._h, self._attn = {}, {}
        return res
