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

from functools import lru_cache


@lru_cache(maxsize=8)
def _manager(include_path: str | None, defaults: bool):
    return _build(include_path, defaults, None)


def _build(include_path: str | None, defaults: bool, metadata: dict | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults, metadata=metadata)


def index_entry(name: str, include_path: str | None = None):
    """lm-eval's index entry of ``name`` (None when no index has it): the small index first, the
    full one only on a miss (both kept for the process: the lookups come per task and request)."""
    entry = _manager(include_path, False).task_index.get(name)
    if entry is None:
        entry = _manager(include_path, True).task_index.get(name)
    return entry


def load_tasks(names: list[str], include_path: str | None = None, metadata: dict | None = None) -> dict:
    """``TaskManager.load(names)``: from the small index when it holds every name and group member,
    else (lm-eval's ``KeyError`` for a name it does not know) from the full one. Called once per
    command, so nothing is kept."""
    try:
        return _build(include_path, False, metadata).load(list(names))
    except KeyError:
        return _build(include_path, True, metadata).load(list(names))
