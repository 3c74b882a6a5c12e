"""The teacher-forced pass of ``telltale signals``: every generation (prompt + generated tokens) run
once through transformers (float32), hooks reading the chosen decoder layers.

A generation's rows are the forwards of its generated tokens that the engine ran (position p is
the forward of generated token p − n_prompt; the last generated token is never fed), the rows of a
vLLM or hf ``norms`` trace. Per row it records, at each layer: its norm, the hidden-state and
logit-lens entropies, the attention entropy (eager attention; sdpa when the attention entropy is
not asked for); and once the output entropy. The residual stream h itself is kept (float32, on the
CPU) only at the layers an SAE reads: rows × those layers × hidden × 4 bytes.

Memory on a device: eager attention materialises each layer's [heads, T, T] weights (transformers'
own cost; ``--no-attention`` avoids it); the pass reduces them to entropies and the vocabulary
projections to entropies in chunks of rows and one layer at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...hf.runtime import decoder_layers
from .measures import attention_entropy, hidden_entropy, l2_norm, logits_entropy

#: rows per chunk of the vocabulary projections and of the attention entropies
CHUNK = 256


def load_model(model: str, device: str | None, trust_remote_code: bool = False, attention: bool = True):
    """The model for the pass: float32; eager attention when its weights are read."""
    from transformers import AutoModelForCausalLM

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32,
                                              attn_implementation="eager" if attention else "sdpa",
                                              trust_remote_code=trust_remote_code)
    return lm.to(dev).eval()


class SignalPass:
    def __init__(self, lm, layers: list[int], attention: bool = True, keep: set[int] | None = None):
        self.lm, self.layers, self.attention = lm, list(layers), attention
        self.keep = set(self.layers if keep is None else keep) & set(self.layers)
        self.decoder = lm.get_decoder()
        self.final_norm = getattr(self.decoder, "norm", None)
        self.head = lm.get_output_embeddings()
        if self.final_norm is None or self.head is None:
            raise ValueError(f"{type(lm).__name__}: no final norm or output embedding to read the logit lens with")
        self.softcap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)
        self.blocks = decoder_layers(lm)
        if attention and any(not hasattr(self.blocks[l], "self_attn") for l in self.layers):
            raise ValueError(f"{type(lm).__name__}: a decoder layer without .self_attn; pass --no-attention")
        self._rows: torch.Tensor | None = None
        self._h: dict[int, torch.Tensor] = {}
        self._attn: dict[int, torch.Tensor] = {}

    def _logits_entropy(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits_entropy(logits)

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
                    rows = self._rows
                    self._attn[l] = torch.cat([attention_entropy(w[0][:, rows[i:i + CHUNK]])
                                               for i in range(0, rows.shape[0], CHUNK)])
                handles.append(self.blocks[l].self_attn.register_forward_hook(on_attn))
        return handles

    @torch.no_grad()
    def run(self, prompt_ids: list[int], token_ids: list[int]) -> dict[str, Any]:
        """The rows of one generation: ``position`` [R], per-row arrays [R, L] (``output_entropy``
        [R]) and ``h``: {layer: [R, d] float32 CPU tensor} for the kept layers."""
        dev = self.head.weight.device
        n_p, n_g = len(prompt_ids), len(token_ids)
        pos = list(range(n_p, n_p + max(0, n_g - 1)))
        L = len(self.layers)
        if not pos:
            z = np.zeros((0, L))
            d = self.head.weight.shape[1]
            return {"position": [], "h": {l: torch.zeros(0, d) for l in self.keep}, "norm": z,
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
        R = len(pos)
        norm, hent, lens = (np.zeros((R, L)) for _ in range(3))
        for j, l in enumerate(self.layers):
            h = self._h[l]
            norm[:, j] = l2_norm(h).double().cpu().numpy()
            hent[:, j] = hidden_entropy(h).double().cpu().numpy()
            lens[:, j] = torch.cat([self._logits_entropy(self.final_norm(h[i:i + CHUNK]))
                                    for i in range(0, R, CHUNK)]).double().cpu().numpy()
        outp = torch.cat([self._logits_entropy(last[i:i + CHUNK]) for i in range(0, R, CHUNK)])
        res = {"position": pos, "h": {l: self._h[l].cpu() for l in self.layers if l in self.keep}, "norm": norm,
               "hidden_entropy": hent, "lens_entropy": lens,
               "attn_entropy": (torch.stack([self._attn[l] for l in self.layers]).T.double().cpu().numpy()
                                if self.attention else None),
               "output_entropy": outp.double().cpu().numpy()}
        self._h, self._attn = {}, {}
        return res
