"""lm-eval model types over lm-eval's HF model: ``hf-norms``, ``hf-suppress``, ``hf-alrr``,
``hf-erss``, ``hf-lrs`` — the same methods as the ``vllm-*`` types, on transformers.

Like lm-eval's ``steered`` model, each type is the stock ``hf`` backend (``HFLM``) plus a small
surface: ``__init__`` takes the telltale model_args out (the same keys, presets and validation as
``vllm-*``: :mod:`lm_eval_telltale.harness.common`), and ``_model_generate`` — the one call of
``HFLM.generate_until`` that produces tokens — runs :class:`~lm_eval_telltale.hf.runtime.HFRuntime`'s
generation loop instead of ``model.generate`` (it needs each step's logits, per-row request state
and ALRR's cache replay). lm-eval's batching, sorting, stop sequences, truncation, chat template and
decoding are untouched. Each finished answer's row goes to the same JSONL sidecar, and
``config.telltale`` into the results JSON, as for ``vllm-*``: ``telltale table/view/profile`` read
HF runs unchanged.

Differences from lm-eval's ``hf`` type, all in the generation loop: a row stops at its own stop
sequence or EOS (``hf`` keeps a row generating until every row of the batch stopped, and cuts its
text afterwards — the scored text is the same) and is dropped from the batch; decoding is greedy
or temperature/top-k/top-p/min-p sampling (other generation kwargs are refused); ``seed`` (default
1234, lm-eval's vLLM default) is the telltale engine seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..config import ConfigError, all_keys
from ..core.rng import candidate_seed, request_identity
from ..harness.common import LrsSelection, TelltaleLM, Unit, define_model_type
from ..spec import METHODS
from .runtime import GenRequest, HFRuntime

logger = logging.getLogger("lm_eval_telltale")

#: generation kwargs the loop implements (anything else would be silently ignored: refused)
GEN_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    @classmethod
    def from_kwargs(cls, model_type: str, gen: dict[str, Any]) -> "Sampling":
        bad = sorted(k for k in gen if k not in GEN_KEYS)
        if bad:
            raise ValueError(f"telltale: {model_type}: generation kwarg(s) {bad} are not supported by the telltale "
                             f"generation loop (supported: {', '.join(GEN_KEYS)}, until, max_gen_toks)")
        t = float(gen.get("temperature") or 0.0)
        if gen.get("do_sample") is False or str(gen.get("do_sample")).lower() == "false":
            t = 0.0
        return cls(temperature=t, top_p=float(gen.get("top_p") if gen.get("top_p") is not None else 1.0),
                   top_k=int(gen.get("top_k") or 0), min_p=float(gen.get("min_p") or 0.0))


def _output(text: str, token_ids: list[int], finish_reason: str):
    """A vLLM-shaped output (``.outputs[0].text/token_ids/finish_reason``): what the shared row
    and LRS code read."""
    return SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=token_ids, finish_reason=finish_reason)])


class TelltaleHF(TelltaleLM, HFLM):
    METHOD = "norms"
    ENGINE = "hf"

    def __init__(self, pretrained: str, **kwargs: Any):
        if not isinstance(pretrained, str):
            raise ConfigError("pretrained", "the hf-* types load the model themselves: give a path or a Hugging Face id")
        tt_args, preset = self._tt_take_args(kwargs)
        mml = kwargs.pop("max_model_len", None)  # a preset's vLLM name for HFLM's max_length
        if mml is not None and kwargs.get("max_length") is None:
            kwargs["max_length"] = int(mml)
        self._tt_check_unknown(kwargs)
        seed = int(kwargs.pop("seed", 1234) or 0)
        cfg, arch = self._tt_resolve(pretrained, kwargs, tt_args, preset, seed=seed)
        if cfg.batch_invariant:
            raise ConfigError("batch_invariant", "a vLLM setting (its batch-invariant kernels); the hf-* types run "
                                                 "transformers' kernels — for batch-independent results use --batch_size 1")
        self._tt_configure(cfg, kwargs)
        self._tt_set_stats_path(cfg, pretrained)
        self._tt_init_state(cfg, arch)
        self._tt_seen: dict = {}
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise ConfigError("backend", f"{self._tt_model_type()} needs a causal (decoder-only) model")
        if self.world_size > 1:
            logger.warning("telltale: %d data-parallel processes append to one sidecar; its rows interleave",
                           self.world_size)
        self._tt_think = self._tt_think_marker()
        self._tt_rt = HFRuntime(self.model, cfg, engine_seed=seed, tokenizer=self.tokenizer,
                                eos_token_ids=[self.eot_token_id])
        if self._tt_writer is None:
            logger.warning("telltale: no --output_path and no stats_path=: per-sample statistics are not written")

    def _tt_think_marker(self) -> tuple[int | None, str | None]:
        """(token id, text) of the end-of-thinking marker. A marker that is one token which decoding
        drops (a special token: the shipped tiny models' ``</think>``) is handed to HFLM as its id,
        so that lm-eval strips the thinking by token as it does for an integer ``think_end_token``;
        the answers' texts keep the marker (:meth:`_tt_text`), as vLLM's do."""
        te, tok = self.think_end_token, self.tokenizer
        if te is None or te == "":
            return None, None
        if isinstance(te, int):
            return te, tok.decode([te], skip_special_tokens=False)
        ids = tok.encode(te, add_special_tokens=False)
        if len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) != te:
            self.think_end_token = ids[0]
            return ids[0], te
        return None, te

    def _tt_think_end(self) -> str | None:
        return self._tt_think[1]

    def _tt_text(self, token_ids: list[int]) -> str:
        """An answer's text as lm-eval decodes it (special tokens dropped), the end-of-thinking
        marker kept."""
        tid, marker = self._tt_think
        if tid is None or tid not in token_ids:
            return self.tok_decode(token_ids)
        parts, cur = [], []
        for t in token_ids:
            if t == tid:
                parts.append(cur)
                cur = []
            else:
                cur.append(t)
        parts.append(cur)
        return marker.join(self.tok_decode(p) for p in parts)

    # -- hooks for subclasses -------------------------------------------------------------------
    def _tt_configure(self, cfg, kwargs: dict[str, Any]) -> None:
        """Method types check their settings here (before the model is loaded)."""

    @classmethod
    def _tt_check_unknown(cls, kwargs: dict[str, Any]) -> None:
        """A telltale setting of another method is a mistake, not a ``from_pretrained`` argument
        (HFLM hands unknown model_args to transformers, which would store them silently)."""
        mine = all_keys(cls.METHOD)
        other = set().union(*(all_keys(m) for m in METHODS)) - mine
        for k in kwargs:
            if k in other:
                raise ConfigError(k, f"not a setting of {cls._tt_model_type()} (allowed: {sorted(mine)})")

    # -- the engine's side of the shared code ---------------------------------------------------------
    def _tt_encode(self, strings: list[str]) -> list[list[int]]:
        # the encoding generate_until uses (tok_batch_encode: its BOS rule), one string at a time
        return [self.tok_batch_encode([s])[0][0].tolist() for s in strings]

    def _tt_until(self, gen_kwargs: dict) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        return handle_stop_sequences(kw.pop("until", None), eos=self.tok_decode(self.eot_token_id, skip_special_tokens=False))

    # -- generation -----------------------------------------------------------------------------
    def _tt_request(self, prompt: list[int], sampling: Sampling, max_new: int, stop: list[str],
                    sampling_seed: int | None = None) -> GenRequest:
        key = tuple(prompt)
        k = self._tt_seen[key] = self._tt_seen.get(key, -1) + 1
        return GenRequest(prompt=list(prompt), max_new_tokens=max_new, tag=f"tt{next(self._tt_counter)}",
                          identity=request_identity(key, k), sampling_seed=sampling_seed,
                          temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                          min_p=sampling.min_p, stop=list(stop))

    def _tt_unit(self, prompt: list[int], sampling: Sampling, max_new: int, stop: list[str], answer) -> Unit:
        """One answer = one request (``hf-lrs`` makes N)."""
        req = self._tt_request(prompt, sampling, max_new, stop)
        return Unit(prompt, answer, [req.tag], [req])

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        attn = generation_kwargs.pop("attention_mask", None)
        if attn is None:
            attn = torch.ones_like(context)
        sampling = Sampling.from_kwargs(self._tt_model_type(), generation_kwargs)
        T0 = context.shape[1]
        max_new = int(max_length) - T0
        plan = self._tt_plan
        prompts = [context[b][attn[b].bool()].tolist() for b in range(context.shape[0])]
        units = [self._tt_unit(p, sampling, max_new, list(stop), plan.take(p) if plan is not None else None)
                 for p in prompts]
        results = {r.tag: r for r in self._tt_rt.generate([q for u in units for q in u.params])}
        rows = []
        for u in units:
            for tag in u.tags:
                res = results[tag]
                text = self._tt_text(res.token_ids)
                if res.stop_str:  # like vLLM's text: up to the stop string
                    text = text.split(res.stop_str)[0]
                u.outputs[tag] = _output(text, res.token_ids, res.finish_reason)
                u.stats[tag] = res.stats
            row = self._tt_answer(u)
            if row is not None:
                rows.append(row)
        self._tt_emit(rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        width = max([T0] + [T0 + len(u.chosen.outputs[0].token_ids) for u in units])
        out = torch.full((len(units), width), int(pad), dtype=context.dtype, device=context.device)
        out[:, :T0] = context
        for b, u in enumerate(units):
            toks = u.chosen.outputs[0].token_ids
            out[b, T0:T0 + len(toks)] = torch.tensor(toks, dtype=context.dtype)
        return out


HFNorms = define_model_type(TelltaleHF, "norms", "HFNorms", "Observe the residual-stream norm at the patched layers; "
                            "outputs those of greedy ``hf``.")
HFSuppress = define_model_type(TelltaleHF, "suppress", "HFSuppress", "High-norm suppression (and the random / "
                               "rate-matched controls), docs/methods.md §5.")
HFAlrr = define_model_type(TelltaleHF, "alrr", "HFAlrr", "Adaptive Layer-wise Reasoning Recursion, docs/methods.md §2.")
HFErss = define_model_type(TelltaleHF, "erss", "HFErss", "Endogenous Reasoning State Steering, docs/methods.md §3.")


@register_model("hf-lrs")
class HFLrs(LrsSelection, TelltaleHF):
    """ℓ2-guided Response Selection among N sampled candidates, docs/methods.md §4 (the selection and
    the row: :class:`~lm_eval_telltale.harness.common.LrsSelection`, shared with ``vllm-lrs``)."""

    METHOD = "lrs"

    def _tt_configure(self, cfg, kwargs: dict[str, Any]) -> None:
        self._tt_check_sampling_early(cfg)

    def _tt_sampling(self, sampling: Sampling) -> Sampling:
        """Greedy decoding with N > 1 candidates: the preset's sampling section, else an error."""
        n = self.tt_cfg.params["n_candidates"]
        if n > 1 and sampling.temperature < 1e-5:
            preset = (self._tt_preset or {}).get("sampling")
            if not preset:
                raise self._tt_greedy_error(n)
            return Sampling.from_kwargs(self._tt_model_type(), {k: v for k, v in preset.items() if k in GEN_KEYS})
        return sampling

    def _tt_unit(self, prompt, sampling, max_new, stop, answer) -> Unit:
        sampling = self._tt_sampling(sampling)
        key = tuple(prompt)
        occ = self._tt_seen[("lrs", key)] = self._tt_seen.get(("lrs", key), -1) + 1
        reqs = [self._tt_request(prompt, sampling, max_new, stop,
                                 sampling_seed=candidate_seed(self.tt_cfg.seed, key, occ, k, None))
                for k in range(self.tt_cfg.params["n_candidates"])]
        return Unit(prompt, answer, [r.tag for r in reqs], reqs)
