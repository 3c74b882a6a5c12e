"""Transformers adapter: the engine-agnostic core driven from a Hugging Face causal LM.

The ``hf-*`` model types (:mod:`lm_eval_telltale.harness.hf`) generate with :class:`HFRuntime`, a
batched generation loop over the stock ``*ForCausalLM`` with a :class:`TelltaleCache` (a
``DynamicCache``) and forward hooks on the patched decoder layers. It hands the core the same
(h, r) as the vLLM adapter; the method logic is the core's (``lm_eval_telltale/core/``).

**The residual decomposition.** vLLM's decoder layers return (h, r): r is the residual stream
after the attention add (the MLP's input residual) and h the MLP output; the stream after the
layer is x = h + r (docs/methods.md §0). A transformers 5.x decoder layer (Qwen2, Qwen3, Llama,
Mistral; ``modeling_qwen3.py: Qwen3DecoderLayer.forward``) computes::

    residual = x_in
    a = self_attn(input_layernorm(x_in), ...)
    r = residual + a                       # → post_attention_layernorm(r)
    h = mlp(post_attention_layernorm(r))
    return r + h                           # x

so r is exactly the input of ``post_attention_layernorm`` (a forward pre-hook) and h exactly the
output of ``mlp`` (a forward hook); the layer's output equals ``r + h`` bit for bit (checked on a
layer's first step: :class:`HookWiringError` otherwise). After patched layer j the layer hook
hands ``core.layer(j, h, r, rerun)`` the step's real tokens flattened to [N, hidden] and returns
``r' + h'`` as the layer output: suppression (both scaled), ERSS (h ← h + β(v − r)) and ALRR (the
re-run's (h2, r2)) act on the same decomposition as on vLLM.

**The token → request map, per token.** A step's batch is [B, T] with left padding. The real
tokens are the attention mask's ones; their positions come from the mask (prefill:
cumsum − 1) and from each row's count of fed tokens (decode: one token per row, position =
prompt length + generated − 1, the cache position). They are flattened row-major (N tokens,
``query_start_loc`` = the rows' cumulative counts) and the core's step map
(:meth:`~lm_eval_telltale.core.engine.CoreEngine.start`) gives each its request slot, ``decode``
(position ≥ its prompt length), ``new`` and ``act``.
Padding never reaches the core; prompt tokens get τ = NaN. A request's slot is keyed by the
request (not its row) and its seed is :func:`~lm_eval_telltale.core.rng.request_seed` of the
engine seed, the request's identity and its sampling seed — the vLLM adapter's formula — so
seeded random suppression and ERSS draw the same numbers on both engines. A finished row leaves
the batch (its cache rows are dropped); the last sampled token is never fed back.

**ALRR's re-run and the KV cache.** transformers' attention calls ``past_key_values.update(k, v,
layer_idx)``, which appends to the layer's cache in place and returns the keys/values the
attention reads. :class:`TelltaleCache` remembers, for the patched layers, what that update returned
in the current step (pass 0's keys/values, the current tokens' own included); the re-run runs the
layer again on x1 = h1 + r1 inside :func:`kv_replay`, where ``update`` returns those stored pass-0
keys/values and writes nothing. So the cache keeps what pass 0 wrote and the re-run's query
attends to pass-0 keys and values including its own token's — vLLM's cache-read semantics
(docs/methods.md §2).

**LRS confidence.** The logits of each step's last position (the distribution each row's next
token is drawn from) go to the method's ``observe_logits``; ``read_slot`` is read before a slot
is released.
"""

from __future__ import annotations

import itertools
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import DynamicCache

from ..core.collect import empty_rows, request_record, take_rows
from ..core.engine import HookWiringError, build_core
from ..core.rng import prompt_identity, request_seed

logger = logging.getLogger("lm_eval_telltale")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers`` for Qwen2/Qwen3/Llama/Mistral)."""
    dec = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(dec, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise HookWiringError(f"telltale: cannot find the decoder layers of {type(model).__name__}")
    return layers


class TelltaleCache(DynamicCache):
    """A ``DynamicCache`` that remembers, for the ``watch`` layers, the keys/values its ``update``
    returned in the current forward (what that layer's attention read), so that a re-run of the
    layer can read them again without writing (:func:`kv_replay`)."""

    def __init__(self, config=None, watch: Sequence[int] = ()):
        super().__init__(config=config)
        self._watch = set(watch)
        self._seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.replay: int | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.replay is not None and layer_idx == self.replay:
            return self._seen[layer_idx]
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx in self._watch:
            self._seen[layer_idx] = out
        return out

    def end_forward(self) -> None:
        self._seen.clear()


@contextmanager
def kv_replay(cache: TelltaleCache, layer_idx: int):
    """Within: the layer's cache update returns the keys/values pass 0 read and writes nothing."""
    if not isinstance(cache, TelltaleCache) or layer_idx not in cache._seen:
        raise HookWiringError(f"telltale: no pass-0 keys/values recorded for layer {layer_idx}")
    cache.replay = layer_idx
    try:
        yield
    finally:
        cache.replay = None


@dataclass
class GenRequest:
    """One request of :meth:`HFRuntime.generate`."""

    prompt: list[int]
    max_new_tokens: int
    tag: str | None = None
    #: the request's identity for random draws (lm-eval types: ``core.rng.request_identity``);
    #: None → its prompt (``core.rng.prompt_identity``), as on vLLM
    identity: Any = None
    sampling_seed: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: Sequence[str] = ()
    #: teacher forcing: feed these tokens instead of sampling (the logits are still observed)
    forced: Sequence[int] | None = None
    enabled: bool = True
    #: generate ``max_new_tokens`` whatever the tokens (benchmarks)
    ignore_eos: bool = False
    #: per-request method settings, under the keys vLLM requests carry in ``SamplingParams.extra_args``
    #: (online LRS's threshold, stop token and end-of-thinking token: ``core.lrs.*_KEY``)
    extra_args: dict = field(default_factory=dict)


@dataclass
class GenResult:
    tag: str | None
    token_ids: list[int]
    finish_reason: str          # "stop" (EOS or a stop string) or "length"
    stop_str: str | None        # the stop string that ended it
    stats: dict[str, Any] = field(default_factory=dict)  # core.collect.request_record


class HFRuntime:
    """The core over a transformers causal LM: hooks on the patched layers, a generation loop."""

    def __init__(self, model: torch.nn.Module, cfg, *, engine_seed: int = 0, tokenizer=None,
                 eos_token_ids: Sequence[int] | None = None, capacity: int = 8):
        self.model = model
        self.cfg = cfg
        self.engine_seed = int(engine_seed)
        self.tokenizer = tokenizer
        layers = decoder_layers(model)
        self.layers = [layers[l] for l in cfg.layers]
        for l, layer in zip(cfg.layers, self.layers):
            for part in ("post_attention_layernorm", "mlp", "self_attn"):
                if not isinstance(getattr(layer, part, None), torch.nn.Module):
                    raise HookWiringError(f"telltale: layer {l} ({type(layer).__name__}) has no {part}; the hf adapter "
                                          "needs the Qwen2/Qwen3/Llama decoder-layer layout")
        self.attn_idx = [int(getattr(layer.self_attn, "layer_idx", l)) for l, layer in zip(cfg.layers, self.layers)]
        self.device = next(model.parameters()).device
        self.core = build_core(cfg, capacity, self.device)
        self.table, self.method = self.core.table, self.core.method
        eos = set(int(t) for t in (eos_token_ids or ()))
        gc = getattr(model, "generation_config", None)
        ge = getattr(gc, "eos_token_id", None)
        eos |= set(ge if isinstance(ge, (list, tuple)) else ([ge] if ge is not None else []))
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos = eos
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_id = int(pad if pad is not None else (min(eos) if eos else 0))
        self._keys = itertools.count()
        self._log: list[dict[str, torch.Tensor]] = []
        self._active = False
        self._rerunning = False
        self._valid: torch.Tensor | None = None
        self._dense = True
        self._cache: TelltaleCache | None = None
        self._h: torch.Tensor | None = None
        self._r: torch.Tensor | None = None
        self._call: dict[int, tuple] = {}
        self._checked: set[int] = set()
        self.steps = 0

    # -- hooks -------------------------------------------------------------------------------------
    @contextmanager
    def hooks(self):
        """The patched layers' hooks, installed for the duration (generation only: lm-eval's
        log-likelihood forwards run the stock model, where no method acts on prompt tokens anyway)."""
        handles = []
        try:
            for j, layer in enumerate(self.layers):
                handles.append(layer.register_forward_pre_hook(self._pre_layer(j), with_kwargs=True))
                handles.append(layer.post_attention_layernorm.register_forward_pre_hook(self._capture_r))
                handles.append(layer.mlp.register_forward_hook(self._capture_h))
                handles.append(layer.register_forward_hook(self._post_layer(j)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _capture_r(self, module, args):
        if self._active:
            self._r = args[0]

    def _capture_h(self, module, args, output):
        if self._active:
            self._h = output[0] if isinstance(output, tuple) else output

    def _pre_layer(self, j: int):
        def pre(module, args, kwargs):
            if self._active and not self._rerunning:
                self._call[j] = (args, kwargs)
                self._h = self._r = None
        return pre

    def _post_layer(self, j: int):
        def post(module, args, output):
            if not self._active or self._rerunning:
                return None
            x = output[0] if isinstance(output, tuple) else output
            h, r = self._h, self._r
            if h is None or r is None:
                raise HookWiringError(f"telltale: layer {self.cfg.layers[j]}: the post-attention norm or the MLP "
                                      "was not called inside the layer")
            if j not in self._checked:
                if not torch.equal(x, r + h):
                    raise HookWiringError(f"telltale: layer {self.cfg.layers[j]} ({type(module).__name__}) does not "
                                          "return post_attention_layernorm's input + mlp's output; the hf adapter "
                                          "cannot hand the core vLLM's (h, r) for it")
                self._checked.add(j)
            valid, dense = self._valid, self._dense
            hid = x.shape[-1]
            hf = h.reshape(-1, hid) if dense else h[valid]
            rf = r.reshape(-1, hid) if dense else r[valid]
            h2, r2 = self.core.layer(j, hf, rf, self._rerun_fn(j, module, x, valid))
            if h2 is hf and r2 is rf:
                return None
            if dense:
                x2 = (r2 + h2).view_as(x)
            else:
                x2 = x.clone()
                x2[valid] = r2 + h2
            return (x2, *output[1:]) if isinstance(output, tuple) else x2
        return post

    def _rerun_fn(self, j: int, layer, x: torch.Tensor, valid: torch.Tensor):
        dense = self._dense

        def rerun(h_in: torch.Tensor, r_in: torch.Tensor):
            args, kwargs = self._call[j]
            # the stream the re-run starts from (vLLM: residual = h + r); no mask where every position
            # is a real token (a boolean mask's positions are a host sync)
            if dense:
                x_in = (h_in + r_in).view_as(x)
            else:
                x_in = x.clone()
                x_in[valid] = h_in + r_in
            self._rerunning = True
            try:
                with kv_replay(self._cache, self.attn_idx[j]):
                    layer(x_in, *args[1:], **kwargs)
            finally:
                self._rerunning = False
            h2, r2 = self._h, self._r
            hid = x.shape[-1]
            return (h2.reshape(-1, hid), r2.reshape(-1, hid)) if dense else (h2[valid], r2[valid])
        return rerun

    # -- one forward -------------------------------------------------------------------------------
    def _forward(self, ids, attn, pos, valid, row_slot, cache, dense: bool):
        """One forward of the batch; ``dense``: every position is a real token (no left padding —
        a host fact of the loop, so the hooks never ask the device)."""
        counts = valid.sum(1)
        qsl = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=ids.device)
        qsl[1:] = counts.cumsum(0)
        # every position of a dense step is a real token: no boolean mask (its positions are a host sync)
        pos_t, ids_t = (pos.reshape(-1), ids.reshape(-1)) if dense else (pos[valid], ids[valid])
        self.core.start(qsl, row_slot, pos_t, ids_t)
        self._valid, self._dense, self._cache, self._active = valid, dense, cache, True
        try:
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        finally:
            self._active = False
            self._valid = self._h = self._r = None
            self._call.clear()
            cache.end_forward()
        if self.core.layer_calls != len(self.layers):
            raise HookWiringError(f"telltale: {self.core.layer_calls} of {len(self.layers)} layer hooks ran in a step")
        self.core.end()
        self.steps += 1
        logits = out.logits[:, -1, :]
        if self.method.wants_logits:
            self.method.observe_logits(row_slot, logits, torch.ones_like(row_slot, dtype=torch.bool))
        return logits

    # -- the generation loop ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult]:
        """Generate every request in one left-padded batch; per request its tokens, finish reason
        and statistics (:func:`~lm_eval_telltale.core.collect.request_record`)."""
        if not requests:
            return []
        if any(len(r.prompt) == 0 for r in requests):
            raise ValueError("telltale: empty prompt")
        infos = []
        try:
            for r in requests:
                ident = r.identity if r.identity is not None else prompt_identity(r.prompt)
                infos.append(self.table.acquire(
                    f"hf{next(self._keys)}", prompt_len=len(r.prompt),
                    seed=request_seed(self.engine_seed, ident, r.sampling_seed), tag=r.tag,
                    meta={"prompt_len": len(r.prompt)}, enabled=r.enabled, values=self.method.slot_values(r.extra_args)))
            with self.hooks():
                tokens, reasons, stops = self._loop(requests, infos)
            return self._results(requests, infos, tokens, reasons, stops)
        finally:
            serials = {i.serial for i in infos}
            self._log.extend(self.core.drain())
            _, self._log = take_rows(self._log, serials)
            for i in infos:
                self.table.release(i.key)

    def _loop(self, requests, infos):
        dev = self.device
        B = len(requests)
        T0 = max(len(r.prompt) for r in requests)
        ids = torch.full((B, T0), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, T0), dtype=torch.long)
        for b, r in enumerate(requests):
            ids[b, T0 - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
            attn[b, T0 - len(r.prompt):] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        valid = attn.bool()
        row_slot = torch.tensor([i.slot for i in infos], dtype=torch.int64, device=dev)
        live = list(range(B))
        dense = all(len(r.prompt) == T0 for r in requests)  # then (decode steps) always
        gens = [None if r.forced is not None or r.temperature < 1e-5
                else torch.Generator().manual_seed(int(r.sampling_seed if r.sampling_seed is not None else 0))
                for r in requests]
        stop_len = [{s: len(self.tokenizer.encode(s, add_special_tokens=False)) + 2 for s in r.stop if s}
                    if (r.stop and self.tokenizer is not None) else {} for r in requests]
        out: list[list[int]] = [[] for _ in range(B)]
        reasons: list[str | None] = [None] * B
        stops: list[str | None] = [None] * B
        watch = self.attn_idx if self.cfg.method == "alrr" else ()
        cache = TelltaleCache(config=getattr(self.model, "config", None), watch=watch)
        while True:
            logits = self._forward(ids, attn, pos, valid, row_slot, cache, dense)
            nxt = self._choose(logits, [requests[b] for b in live], [gens[b] for b in live], [len(out[b]) for b in live])
            keep = []
            for i, b in enumerate(live):
                out[b].append(nxt[i])
                reasons[b], stops[b] = self._finished(requests[b], out[b], stop_len[b])
                if reasons[b] is None:
                    keep.append(i)
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch
                idx = torch.tensor(keep, dtype=torch.long, device=dev)
                cache.batch_select_indices(idx)
                attn, row_slot = attn[idx], row_slot[idx]
                live = [live[i] for i in keep]
            n = len(live)
            ids = torch.tensor([[out[b][-1]] for b in live], dtype=torch.long, device=dev)
            pos = torch.tensor([[len(requests[b].prompt) + len(out[b]) - 1] for b in live], dtype=torch.long, device=dev)
            attn = torch.cat([attn, attn.new_ones(n, 1)], dim=1)
            valid = torch.ones((n, 1), dtype=torch.bool, device=dev)
            dense = True
        return out, reasons, stops

    def _choose(self, logits: torch.Tensor, reqs, gens, done: list[int]) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        picks = []
        for i, (r, g) in enumerate(zip(reqs, gens)):
            if r.forced is not None:
                picks.append(int(r.forced[done[i]]))
            elif g is None:
                picks.append(int(greedy[i]))
            else:
                picks.append(sample(logits[i], r, g))
        return picks

    def _finished(self, r: GenRequest, toks: list[int], stop_len: dict[str, int]) -> tuple[str | None, str | None]:
        if toks[-1] in self.eos and not r.ignore_eos:
            return "stop", None
        for s, n in stop_len.items():
            if s in self.tokenizer.decode(toks[-n:], skip_special_tokens=False):
                return "stop", s
        if len(toks) >= r.max_new_tokens or (r.forced is not None and len(toks) >= len(r.forced)):
            return "length", None
        return None, None

    def _results(self, requests, infos, tokens, reasons, stops) -> list[GenResult]:
        self._log.extend(self.core.drain())
        rows, self._log = take_rows(self._log, {i.serial for i in infos})
        layers = self.cfg.layers
        res = []
        for r, info, toks, why, s in zip(requests, infos, tokens, reasons, stops):
            info.meta.update(self.method.read_slot(info.slot))
            rr = rows.get(info.serial)
            if rr is None:
                rr = empty_rows(len(layers), self.method.columns)
            res.append(GenResult(r.tag, toks, why or "length", s,
                                 request_record(info, rr, layers, self.method, self.cfg.record_tokens)))
        return res


def sample(logits: torch.Tensor, r: GenRequest, gen: torch.Generator) -> int:
    """One token from ``logits`` [vocab] with temperature, top-k, top-p and min-p (vLLM's order),
    drawn with the request's own generator."""
    x = logits.float().cpu() / r.temperature
    if r.top_k and 0 < r.top_k < x.shape[-1]:
        kth = x.topk(r.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if r.top_p < 1.0:
        srt, idx = x.sort(descending=True)
        p = srt.softmax(-1)
        drop = (p.cumsum(-1) - p) > r.top_p  # keep the smallest prefix whose mass reaches top_p
        x[idx[drop]] = float("-inf")
    if r.min_p > 0.0:
        p = x.softmax(-1)
        x = x.masked_fill(p < r.min_p * p.max(), float("-inf"))
    return int(torch.multinomial(x.softmax(-1), 1, generator=gen))
