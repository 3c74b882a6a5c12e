"""The task index without lm-eval's built-in catalogue: ``TELLTALE_TASKS_ONLY`` (start-up hook) and
:mod:`lm_eval_telltale.harness.taskindex` (small index first, the full one only on a miss).

Indexing lm-eval's ~14,750 built-in tasks takes ~15 s, so the index builder is spied on: it records
the directories it is asked to index and skips lm-eval's own (answering for it with one stand-in
entry, ``gsm8k``); the telltale directory is indexed for real."""

from __future__ import annotations

from pathlib import Path

import pytest

import lm_eval_telltale
from lm_eval_telltale.harness import taskindex


class _Calls(list):
    builtin: Path


@pytest.fixture
def builds(monkeypatch):
    """[[directory, ...] per index build]; lm-eval's built-in directory is not really indexed."""
    import lm_eval.tasks.manager as manager

    builtin = Path(manager.__file__).parent
    orig = manager.TaskIndex.build
    calls = _Calls()

    def build(paths, *a, **kw):
        paths = [Path(p) for p in paths]
        calls.append(paths)
        out = orig([p for p in paths if p != builtin], *a, **kw)
        if builtin in paths:  # the stand-in for lm-eval's catalogue
            ours = next(iter(orig([lm_eval_telltale.tasks_dir() / "gsm8k"]).values()))
            out = {"gsm8k": ours, **out}
        return out

    monkeypatch.setattr(manager.TaskIndex, "build", staticmethod(build))
    taskindex._manager.cache_clear()
    calls.builtin = builtin
    yield calls
    taskindex._manager.cache_clear()


@pytest.mark.parametrize("env", ["1", "0", None])
def test_tasks_only_switch_leaves_out_lm_evals_own_tasks(builds, monkeypatch, env):
    from lm_eval.tasks import TaskManager

    if env is None:
        monkeypatch.delenv("TELLTALE_TASKS_ONLY", raising=False)
    else:
        monkeypatch.setenv("TELLTALE_TASKS_ONLY", env)
    tm = TaskManager()  # as the lm_eval command line builds it
    assert "telltale_gsm8k" in tm.task_index  # the hook's directory, always
    assert ("gsm8k" in tm.task_index) == (env != "1")
    assert (builds.builtin in builds[-1]) == (env != "1")
    # an explicit include_defaults is the caller's word
    assert "gsm8k" in TaskManager(include_defaults=True).task_index


def test_hook_reads_the_callers_arguments_by_lm_evals_signature(builds, monkeypatch, tmp_path):
    """Positional arguments (verbosity, include_path, include_defaults, metadata) work as keywords do."""
    from lm_eval.tasks import TaskManager

    from lm_eval_telltale.tasksupport.localtask import write_local_task

    local = str(write_local_task(tmp_path / "task"))
    monkeypatch.setenv("TELLTALE_TASKS_ONLY", "1")
    tm = TaskManager(None, local)  # include_path given positionally
    assert {"telltale_gsm8k", "telltale_local"} <= set(tm.task_index) and "gsm8k" not in tm.task_index
    tm = TaskManager(None, [local], True)  # include_defaults too
    assert {"telltale_gsm8k", "telltale_local", "gsm8k"} <= set(tm.task_index)
    assert TaskManager(include_path=local).include_path == [str(lm_eval_telltale.tasks_dir()), local]


def test_index_entry_builds_the_full_index_only_for_a_name_outside_the_small_one(builds):
    e = taskindex.index_entry("telltale_gsm8k")
    assert lm_eval_telltale.tasks_dir() in Path(e.yaml_path).parents
    assert len(builds) == 1 and builds.builtin not in builds[0]
    assert taskindex.index_entry("telltale_bbh_navigate") is not None and len(builds) == 1  # cached
    assert taskindex.index_entry("gsm8k") is not None
    assert len(builds) == 2 and builds.builtin in builds[1]
    assert taskindex.index_entry("no_such_task") is None and len(builds) == 2


def test_load_tasks_falls_back_to_the_full_index(builds, tmp_path):
    from lm_eval_telltale.tasksupport.localtask import write_local_task

    local = str(write_local_task(tmp_path / "task"))
    out = taskindex.load_tasks(["telltale_local"], local)
    assert set(out["tasks"]) == {"telltale_local"} and len(builds) == 1 and builds.builtin not in builds[0]
    with pytest.raises(KeyError):  # lm-eval's own error for an unknown name, from the full index
        taskindex.load_tasks(["no_such_task"], local)
    assert len(builds) == 3 and builds.builtin in builds[-1]
    # any other failure of a known task (here: its dataset, offline) is the answer: no second index
    with pytest.raises(Exception) as err:  # noqa: B017
        taskindex.load_tasks(["telltale_aime24"], local)
    assert not isinstance(err.value, KeyError) and len(builds) == 4 and builds.builtin not in builds[-1]
