"""The one module of the scorer that reads the process's state: the think tags
(``TELLTALE_THINK_START`` / ``TELLTALE_THINK_END``), ``TELLTALE_REQUIRE_THINK_END``, the value a
model class set (:func:`set_prompt_opens_think`) and the ``lm_eval`` command line's chat template
(``--apply_chat_template`` with the ``--model_args`` tokenizer, a ``config=`` preset's
``think_end_token`` / ``enable_thinking``). :func:`think_rule` turns them into a
:class:`~.text.ThinkRule`, which the entry points hand to the pure functions."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from ... import cmdline
from ...spec import parse_bool
from .text import ThinkRule

_log = logging.getLogger("lm_eval_telltale")


def think_tags() -> tuple[str, str]:
    """(think-start, think-end) tags: ``<think>`` / ``</think>`` unless the environment says otherwise."""
    return (
        os.environ.get("TELLTALE_THINK_START", "<think>"),
        os.environ.get("TELLTALE_THINK_END", "</think>"),
    )


def think_rule() -> ThinkRule:
    """This process's think rule: the tags, and whether a response must close a think block that
    the prompt opened (``TELLTALE_REQUIRE_THINK_END`` when set, both ways; else
    :func:`auto_require_think_end`; else no)."""
    start, end = think_tags()
    env = parse_bool(os.environ.get("TELLTALE_REQUIRE_THINK_END", ""))
    require = env if env is not None else bool(auto_require_think_end())
    return ThinkRule(start=start, end=end, require_end=require)


#: the decision a model class set explicitly (:func:`set_prompt_opens_think`); None = not set
_PROMPT_OPENS_THINK: bool | None = None


def set_prompt_opens_think(value: bool | None) -> None:
    """Tell the scorer whether the prompts of this process end inside an open think block.

    For API (non-CLI) use, where :func:`auto_require_think_end` cannot read the model from
    ``sys.argv``: a model class that knows its chat template calls this once (True for
    DeepSeek-R1-style templates). ``None`` clears it. ``TELLTALE_REQUIRE_THINK_END`` still wins.
    """
    global _PROMPT_OPENS_THINK
    _PROMPT_OPENS_THINK = None if value is None else bool(value)


def prompt_opens_think(tokenizer: Any, **template_kwargs: Any) -> bool:
    """Does ``tokenizer``'s chat template end the generation prompt inside an open think block?

    Renders a one-message user conversation with ``add_generation_prompt=True`` and compares the
    positions of the last think-start and think-end tags: True for DeepSeek-R1-distill templates
    (the prompt ends with ``<think>\\n``), False for Qwen3 (the model writes ``<think>`` itself;
    ``enable_thinking=False`` closes an empty block inside the prompt) and for plain templates.
    ``template_kwargs`` go to ``apply_chat_template`` (e.g. ``enable_thinking``). Errors of the
    template propagate.
    """
    start, end = think_tags()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 1?"}], tokenize=False, add_generation_prompt=True,
        **template_kwargs,
    )
    if not isinstance(text, str):
        text = str(text)
    return bool(start) and text.rfind(start) > (text.rfind(end) if end else -1)


def auto_require_think_end() -> bool | None:
    """Whether this process's prompts end inside an open think block, detected once.

    The value given to :func:`set_prompt_opens_think` when there is one; else, when the process
    is an ``lm_eval ... --apply_chat_template`` run, the chat template of the ``tokenizer=`` (or
    ``pretrained=``) of ``--model_args``, loaded from local files only (the run has already
    downloaded it). None when it cannot tell (no chat template applied, no tokenizer, any error)
    and when a ``think_end_token`` model arg (or preset value) makes lm-eval strip the thinking
    itself: every response then lacks ``</think>`` and requiring it would call all of them
    truncated (a warning says so). Cached; ``auto_require_think_end.cache_clear()`` forgets it.
    """
    if _PROMPT_OPENS_THINK is not None:
        return _PROMPT_OPENS_THINK
    return _detect_from_argv()


@functools.lru_cache(maxsize=1)
def _detect_from_argv() -> bool | None:
    if not cmdline.applies_chat_template():
        return None
    return opens_think_for(cmdline.model_args())


def opens_think_for(model_args: dict[str, Any]) -> bool | None:
    """Whether a run with these ``--model_args`` and a chat template applied has prompts that end
    inside an open think block (see :func:`auto_require_think_end`; also for a finished run's
    recorded model_args, by ``telltale rescore``). None when it cannot tell."""
    args = dict(model_args or {})
    name = None
    try:
        if not args:
            return None
        if args.get("config"):  # a telltale preset: explicit model_args win over its values
            try:
                from lm_eval_telltale.config import load_preset

                preset = load_preset(str(args["config"]))
                args = {**{k: preset[k] for k in ("think_end_token", "enable_thinking") if k in preset}, **args}
            except Exception:
                pass
        name = args.get("tokenizer") or args.get("pretrained")
        if not name:
            return None
        from transformers import AutoTokenizer

        kw: dict[str, Any] = {"local_files_only": True}
        if args.get("revision") and not args.get("tokenizer"):
            kw["revision"] = str(args["revision"])
        if parse_bool(args.get("trust_remote_code", False)):
            kw["trust_remote_code"] = True
        tok = AutoTokenizer.from_pretrained(str(name), **kw)
        tkw: dict[str, Any] = {}
        thinking = parse_bool(args["enable_thinking"]) if "enable_thinking" in args else None
        if thinking is not None:
            tkw["enable_thinking"] = thinking
        opens = prompt_opens_think(tok, **tkw)
    except Exception as e:  # never let the detection break scoring
        _log.debug("telltale: think-block detection failed: %s", e)
        return None
    if opens and str(args.get("think_end_token") or "").strip():
        _log.warning(
            "telltale: the chat template of %s opens <think> in the prompt, but think_end_token=%s "
            "strips the thinking from every response, so truncated reasoning cannot be detected. "
            "Drop think_end_token to let the scorer see %s (or set TELLTALE_REQUIRE_THINK_END).",
            name, args.get("think_end_token"), think_tags()[1],
        )
        return None
    return opens


auto_require_think_end.cache_clear = _detect_from_argv.cache_clear  # type: ignore[attr-defined]
