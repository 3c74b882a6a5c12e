"""lm-eval model types over lm-eval's HF model: ``hf-norms``, ``hf-suppress``, ``hf-alrr``,
``hf-erss``, ``hf-lrs`` — the same methods as the ``vllm-*`` types, on transformers.

Like lm-eval's ``steered`` model, each type is the stock ``hf`` backend (``HFLM``) plus a small
surface: ``__init__`` takes the telltale model_args out (the same keys, presets and validation as
``vllm-*``: :mod:`lm_eval_telltale.harness.common`), and ``_model_generate`` — the one call of
``HFLM.generate_until`` that produces tokens — runs :class:`~lm_eval_telltale.hf.runtime.HFRuntime`'s
generation loop instead of ``model.generate`` (it needs each step's logits, per-row request state
and ALRR's cache replay). lm-eval's batching, sorting, stop sequences, truncation and chat template
are untouched. The responses are decoded as lm-eval's vLLM type decodes them (special tokens such
as ``<think>`` kept: :meth:`TelltaleHF._tt_text`), so that an unfinished thinking block is scored
as such and the two engines' tables agree. Each finished answer's row goes to the same JSONL
sidecar, and ``config.telltale`` into the results JSON, as for ``vllm-*``: ``telltale
table/view/profile`` read HF runs unchanged.

Differences from lm-eval's ``hf`` type, all in the generation loop: a row stops at its own stop
sequence or EOS (``hf`` keeps a row generating until every row of the batch stopped, and cuts its
text afterwards — the scored text is the same) and is dropped from the batch; decoding is greedy
or temperature/top-k/top-p/min-p sampling (other generation kwargs are refused); ``seed`` (default
1234, lm-eval's vLLM default) is the telltale engine seed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Sequence

import torch
from lm_eval.models.huggingface import HFLM

from ..config import ConfigError, all_keys
from ..core.rng import candidate_seed, request_identity
from ..hf.runtime import GenRequest, HFRuntime
from ..spec import METHODS, parse_bool
from .common import LrsSelection, TelltaleLM, Unit, define_model_type, unknown_model_arg

logger = logging.getLogger("lm_eval_telltale")

#: generation kwargs the loop implements (anything else would be silently ignored: refused)
GEN_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p")


@dataclass(frozen=True)
class Sampling:
    """The hf loop's decoding settings of one answer (what vLLM's ``SamplingParams`` is to the
    ``vllm-*`` types): sampling, the token budget and the stop sequences."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_new_tokens: int = 0
    stop: tuple[str, ...] = ()

    @classmethod
    def from_kwargs(cls, model_type: str, gen: dict[str, Any], max_new_tokens: int = 0,
                    stop: Sequence[str] = ()) -> "Sampling":
        bad = sorted(k for k in gen if k not in GEN_KEYS)
        if bad:
            raise ValueError(f"telltale: {model_type}: generation kwarg(s) {bad} are not supported by the telltale "
                             f"generation loop (supported: {', '.join(GEN_KEYS)}, until, max_gen_toks)")
        t = float(gen.get("temperature") or 0.0)
        if parse_bool(gen.get("do_sample")) is False:  # lm-eval's rule, as harness.common.greedy reads it
            t = 0.0
        return cls(temperature=t, top_p=float(gen.get("top_p") if gen.get("top_p") is not None else 1.0),
                   top_k=int(gen.get("top_k") or 0), min_p=float(gen.get("min_p") or 0.0),
                   max_new_tokens=int(max_new_tokens), stop=tuple(stop))


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
        self._tt_check_loadable(pretrained, kwargs)
        if cfg.batch_invariant:
            raise ConfigError("batch_invariant", "a vLLM setting (its batch-invariant kernels); the hf-* types run "
                                                 "transformers' kernels — for batch-independent results use --batch_size 1")
        self._tt_configure(cfg, kwargs)
        self._tt_set_stats_path(cfg, pretrained)
        self._tt_init_state(cfg, arch)
        super().__init__(pretrained=pretrained, **kwargs)
        if self.backend != "causal":
            raise ConfigError("backend", f"{self._tt_model_type()} needs a causal (decoder-only) model")
        if self.world_size > 1:
            logger.warning("telltale: %d data-parallel processes append to one sidecar; its rows interleave",
                           self.world_size)
        self._tt_think = self._tt_think_marker()
        self._tt_responses: dict[tuple[int, int], str] = {}
        self._tt_rt = HFRuntime(self.model, cfg, engine_seed=seed, tokenizer=self.tokenizer,
                                eos_token_ids=[self.eot_token_id])
        if self._tt_writer is None:
            logger.warning("telltale: no --output_path and no stats_path=: per-sample statistics are not written")

    def _tt_think_marker(self) -> str | None:
        """The end-of-thinking marker as text (``think_end_token``; an integer is a token id)."""
        te = self.think_end_token
        if te is None or te == "":
            return None
        return self.tokenizer.decode([te], skip_special_tokens=False) if isinstance(te, int) else te

    def _tt_think_end(self) -> str | None:
        return self._tt_think

    def _tt_text(self, token_ids: list[int], eos_stop: bool) -> str:
        """An answer's text as vLLM gives it to lm-eval (``skip_special_tokens=False``: the think
        markers stay, also where the tokenizer marks them special; the EOS token that ended the
        answer is not part of the text). lm-eval's ``hf`` type decodes with special tokens dropped:
        an unfinished ``<think>`` block would then read as an answer, and the tables of the two
        engines would disagree."""
        ids = token_ids[:-1] if eos_stop and token_ids else token_ids
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def generate_until(self, requests, disable_tqdm: bool = False):
        """lm-eval's ``hf`` loop (batching, chat template, stop sequences), with each response the one
        the sidecar records: lm-eval's post-processing of the vLLM-like text (:meth:`_tt_text`), not
        of ``HFLM``'s own decode."""
        self._tt_responses: dict[tuple[int, int], str] = {}
        try:
            res = super().generate_until(requests, disable_tqdm)
            # lm-eval sends the repeats of a document as the same Instance, in request order: the
            # k-th occurrence is the answer the plan numbered repeat k
            k: dict[int, int] = defaultdict(int)
            out = []
            for inst, r in zip(requests, res):
                out.append(self._tt_responses.get((id(inst), k[id(inst)]), r))
                k[id(inst)] += 1
            return out
        finally:
            self._tt_responses = {}

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

    @classmethod
    def _tt_check_loadable(cls, pretrained: str, kwargs: dict[str, Any]) -> None:
        """Every remaining model_arg must be taken by someone before the model loads: lm-eval's
        ``HFLM``, transformers' ``from_pretrained`` (its parameters, and every name its installed
        source quotes: the keyword arguments it takes out of ``**kwargs``, deprecated ones
        included — generous on purpose, a valid argument must never be refused), or the model's
        config (which takes its own fields). Anything else would end in a ``TypeError`` from the
        model's constructor after the config was read — the same check and message as ``vllm-*``."""
        import inspect
        import re

        from transformers import AutoConfig, PreTrainedModel

        fp = PreTrainedModel.from_pretrained
        known = set(inspect.signature(HFLM.__init__).parameters) | set(inspect.signature(fp).parameters)
        try:
            known |= set(re.findall(r"[\"']([A-Za-z_]\w*)[\"']", inspect.getsource(fp)))
        except (OSError, TypeError):  # no source (a frozen install): the config check below still runs
            pass
        rest = {k: v for k, v in kwargs.items() if k not in known}
        if not rest:
            return
        try:
            _, unused = AutoConfig.from_pretrained(pretrained, revision=kwargs.get("revision") or "main",
                                                   trust_remote_code=bool(kwargs.get("trust_remote_code")),
                                                   return_unused_kwargs=True, **rest)
        except Exception:  # noqa: BLE001  (the config cannot be read: the model load reports why)
            return
        for k in rest:
            if k in unused:
                raise unknown_model_arg(cls._tt_model_type(), cls.METHOD, k, "an lm-eval HFLM argument, a "
                                        "transformers from_pretrained argument or a field of the model's config")

    # -- the engine's side of the shared code ---------------------------------------------------------
    def _tt_encode(self, strings: list[str]) -> list[list[int]]:
        # the encoding generate_until uses (tok_batch_encode: its BOS rule), one string at a time
        return [self.tok_batch_encode([s])[0][0].tolist() for s in strings]

    def _tt_until(self, gen_kwargs: dict) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        return handle_stop_sequences(kw.pop("until", None), eos=self.tok_decode(self.eot_token_id, skip_special_tokens=False))

    # -- generation -----------------------------------------------------------------------------
    def _tt_request(self, prompt: list[int], sampling: Sampling, sampling_seed: int | None = None) -> GenRequest:
        key = tuple(prompt)
        k = self._tt_occurrence(key)
        return GenRequest(prompt=list(prompt), max_new_tokens=sampling.max_new_tokens,
                          tag=f"tt{next(self._tt_counter)}", identity=request_identity(key, k),
                          sampling_seed=sampling_seed, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k, min_p=sampling.min_p, stop=list(sampling.stop))

    def _tt_unit(self, prompt: list[int], params: Sampling, answer) -> Unit:
        """One answer = one request (``hf-lrs`` makes N)."""
        req = self._tt_request(prompt, params)
        return Unit(prompt, answer, [req.tag], [req])

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        attn = generation_kwargs.pop("attention_mask", None)
        if attn is None:
            attn = torch.ones_like(context)
        T0 = context.shape[1]
        sampling = Sampling.from_kwargs(self._tt_model_type(), generation_kwargs, int(max_length) - T0, stop)
        plan = self._tt_plan
        prompts = [context[b][attn[b].bool()].tolist() for b in range(context.shape[0])]
        units = [self._tt_unit(p, sampling, plan.take(p) if plan is not None else None) for p in prompts]
        # online LRS: the warm-up candidates first, then the later ones with their prompt's threshold
        todo = [(u, q) for u in units for _, q in self._tt_first(u)]
        while todo:
            results = {r.tag: r for r in self._tt_rt.generate([q for _, q in todo])}
            for u, q in todo:
                res = results[q.tag]
                text = self._tt_text(res.token_ids, res.finish_reason == "stop" and res.stop_str is None)
                if res.stop_str:  # like vLLM's text: up to the stop string
                    text = text.split(res.stop_str)[0]
                u.outputs[q.tag] = _output(text, res.token_ids, res.finish_reason)
                u.stats[q.tag] = res.stats
            todo = [(u, q) for u in units for _, q in self._tt_later(u)]
        rows = []
        for u in units:
            row = self._tt_answer(u)
            if row is not None:
                rows.append(row)
                self._tt_responses[(id(u.answer.inst), u.answer.repeat)] = row["response"]  # what generate_until returns
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
            return Sampling.from_kwargs(self._tt_model_type(), {k: v for k, v in preset.items() if k in GEN_KEYS},
                                        sampling.max_new_tokens, sampling.stop)
        return sampling

    def _tt_with_extra(self, req: GenRequest, extra: dict) -> GenRequest:
        return replace(req, extra_args={**req.extra_args, **extra})

    def _tt_unit(self, prompt, params, answer) -> Unit:
        sampling = self._tt_sampling(params)
        key = tuple(prompt)
        occ = self._tt_occurrence(("lrs", key))
        reqs = [self._tt_request(prompt, sampling, sampling_seed=candidate_seed(self.tt_cfg.seed, key, occ, k, None))
                for k in range(self.tt_cfg.params["n_candidates"])]
        return Unit(prompt, answer, [r.tag for r in reqs], reqs)
