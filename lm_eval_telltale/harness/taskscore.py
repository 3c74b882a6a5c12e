"""Score any candidate response with the task's OWN extraction and metric (for LRS's ``maj``
selector and "accuracy if selector X had been used").

The model class sees lm-eval ``Instance`` objects (task name, doc), not tasks. This module reads
the task's YAML config through lm-eval's task index (:mod:`.taskindex`; no dataset is loaded), builds the
task's first filter pipeline with lm-eval's own ``build_filter_ensemble`` and calls the task's
``process_results`` (or its first metric with the YAML's kwargs, against ``doc_to_target``).

The answer used for voting is, in this order: the task's ``process_results.telltale_extract(doc,
response)`` when the scorer provides one (the packaged telltale tasks do), else the filtered
response when the filters extract something (e.g. a regex), else none (``maj`` then falls back to
the first candidate, and the sidecar says so).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from ..cmdline import option_value
from .taskindex import index_entry

logger = logging.getLogger("lm_eval_telltale")


class TaskScorer:
    def __init__(self, cfg: dict[str, Any]):
        from lm_eval.filters import build_filter_ensemble

        self.cfg = cfg
        self.process_results = cfg.get("process_results") if callable(cfg.get("process_results")) else None
        fl = cfg.get("filter_list")
        if fl:
            f0 = fl[0]
            comps = [[f["function"], {k: v for k, v in f.items() if k != "function"}] for f in f0["filter"]]
            self.filters = build_filter_ensemble(f0["name"], comps)
        else:
            self.filters = build_filter_ensemble("none", [["take_first", None]])
        ml = cfg.get("metric_list") or [{"metric": "exact_match"}]
        self.metric = ml[0]["metric"]
        self.metric_kwargs = {k: v for k, v in ml[0].items() if k not in ("metric", "aggregation", "higher_is_better")}

    def filtered(self, doc: dict, text: str) -> Any:
        resps = [[text]]
        for f in self.filters.filters:
            resps = f().apply(resps, [doc])
            resps = list(resps)
        out = resps[0]
        return out[0] if isinstance(out, list) and out else out

    def target(self, doc: dict) -> Any:
        t = self.cfg.get("doc_to_target")
        if callable(t):
            return t(doc)
        if isinstance(t, str):
            if t in doc:
                return doc[t]
            from lm_eval import utils

            return utils.apply_template(t, doc)
        return t

    def answer(self, doc: dict, text: str) -> str | None:
        ext = getattr(self.process_results, "telltale_extract", None)
        if ext is not None:
            return ext(doc, text)
        f = self.filtered(doc, text)
        if isinstance(f, str) and f != text and f not in ("", "[invalid]"):
            return f.strip()
        return None

    def correct(self, doc: dict, text: str) -> float | None:
        f = self.filtered(doc, text)
        if self.process_results is not None:
            res = self.process_results(doc, [f])
            v = res.get(self.metric, next(iter(res.values()), None))
            return None if v is None else float(v)
        from lm_eval.api.registry import get_metric

        fn = get_metric(self.metric)
        try:
            res = fn(references=[str(self.target(doc))], predictions=[str(f)], **self.metric_kwargs)
        except TypeError:
            return None
        v = res.get(self.metric) if isinstance(res, dict) else res
        return None if v is None else float(v)


@lru_cache(maxsize=256)
def scorer_for(task_name: str) -> TaskScorer | None:
    """The scorer of an indexed task (None, with a warning, if it cannot be built)."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        entry = index_entry(task_name, option_value("--include_path"))
        if entry is None or not entry.yaml_path:
            raise LookupError(f"task {task_name!r} not found in lm-eval's index")
        return TaskScorer(load_yaml(entry.yaml_path, resolve_func=True))
    except Exception as e:  # noqa: BLE001
        logger.warning("telltale: cannot score candidates of %s with the task's scorer (%s); "
                       "maj falls back to the first candidate and correctness is not recorded", task_name, e)
        return None


def task_generation_kwargs(names: list[str]) -> list[dict[str, Any]] | None:
    """The ``generation_kwargs`` of every leaf task under ``names`` (groups expanded through their
    YAML's ``task`` list), read from lm-eval's task index without loading any dataset; None when
    any name cannot be resolved that way (the caller then cannot decide early)."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        include_path = option_value("--include_path")
        out: list[dict[str, Any]] = []
        seen: set[str] = set()

        def visit(name: str, depth: int = 0) -> bool:
            if name in seen:
                return True
            seen.add(name)
            entry = index_entry(name, include_path)
            if entry is None or not entry.yaml_path or depth > 8:
                return False
            cfg = load_yaml(entry.yaml_path, resolve_func=False)
            subs = cfg.get("task")
            if isinstance(subs, list):  # a group
                return all(visit(t if isinstance(t, str) else t.get("task"), depth + 1) for t in subs)
            out.append(dict(cfg.get("generation_kwargs") or {}))
            return True

        return out if all(visit(n) for n in names) and out else None
    except Exception as e:  # noqa: BLE001 - an early check must never break a run
        logger.debug("telltale: cannot read the tasks' generation_kwargs early: %s", e)
        return None
