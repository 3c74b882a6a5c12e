"""lm-eval's task index without lm-eval's whole catalogue, where the tasks asked for allow it.

A bare ``TaskManager()`` indexes every built-in task of lm-eval 0.4.13 (about 14,750 names; about
15 s on a 2-core CPU) before it can answer anything, while the telltale tasks and an
``--include_path`` directory index in well under a second. The package's own lookups (LRS's
scorer and early greedy check, ``telltale profile``) therefore build the small index first —
``include_defaults=False``; the start-up hook adds the telltale task directory — and build the full
one only when a name is not in it. lm-eval lets include paths override built-in names, so a name
found in the small index is the entry the full index would give.

The ``lm_eval`` command line builds its own ``TaskManager``; ``TELLTALE_TASKS_ONLY=1`` makes the
start-up hook (:mod:`lm_eval_telltale._lmeval_hook`) build that one without the built-in tasks too
(only the telltale tasks and ``--include_path``), which ``make eval`` and the tests use.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=8)
def _manager(include_path: str | None, defaults: bool, metadata: str | None):
    from lm_eval.tasks import TaskManager

    kw: dict[str, Any] = {"include_path": include_path, "include_defaults": defaults}
    if metadata is not None:
        kw["metadata"] = json.loads(metadata)
    return TaskManager(**kw)


def task_manager(include_path: str | None = None, *, defaults: bool = False, metadata: dict | None = None):
    """A (cached) ``TaskManager``: the telltale tasks and ``include_path``, plus lm-eval's built-in
    tasks when ``defaults``."""
    return _manager(include_path, defaults, None if metadata is None else json.dumps(metadata, sort_keys=True))


def index_entry(name: str, include_path: str | None = None):
    """lm-eval's index entry of ``name`` (None when no index has it): the small index first, the
    full one only on a miss."""
    entry = task_manager(include_path).task_index.get(name)
    if entry is None:
        entry = task_manager(include_path, defaults=True).task_index.get(name)
    return entry


def load_tasks(names: list[str], include_path: str | None = None, metadata: dict | None = None) -> dict:
    """``TaskManager.load(names)`` (lm-eval >= 0.4.12): from the small index when it holds every
    name and group member, else from the full one."""
    try:
        return task_manager(include_path, metadata=metadata).load(list(names))
    except Exception:  # noqa: BLE001 - a name outside the small index: lm-eval's whole catalogue
        return task_manager(include_path, defaults=True, metadata=metadata).load(list(names))
