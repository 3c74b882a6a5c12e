"""The packaged telltale_* tasks load and build, offline, on the local-data override.

* in process: TaskManager(include_path=tasks_dir(), metadata={"telltale_data_dir": fixtures})
  indexes and builds every task and group; configs follow the conventions (no stop strings,
  long budgets, process_results with exact_match + truncated, filter "none", group aggregates);
* from an installed copy: the wheel's layout (pyproject's force-include) rebuilt in a temporary
  site directory, where `lm_eval validate` and a bare TaskManager() (start-up hook) find them;
* the loader itself: local layout, TELLTALE_DATA_DIR, missing files, real HF ids otherwise;
* the fixture files have each real dataset's schema.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import BUDGET, GROUPS, LEAVES, TOP_LEVEL

import lm_eval_telltale
from lm_eval_telltale.tasksupport import taskdata

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def telltale_data(tmp_path_factory) -> Path:
    return taskdata.write_fixtures(tmp_path_factory.mktemp("telltale-data"))


@pytest.fixture(scope="module")
def task_manager(telltale_data):
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=str(lm_eval_telltale.tasks_dir()),
        metadata={"telltale_data_dir": str(telltale_data)},
    )


@pytest.fixture(scope="module")
def built(task_manager):
    """({name: Task} for every leaf task, {name: Group} for every group, {group: [children]})."""
    out = task_manager.load(TOP_LEVEL)
    return out["tasks"], out["groups"], out["group_map"]


def test_every_name_is_indexed_from_our_directory(task_manager):
    ours = lm_eval_telltale.tasks_dir().resolve()
    index = task_manager.task_index
    for name in [*TOP_LEVEL, *LEAVES]:
        assert name in index, name
        path = index[name].yaml_path
        assert path is not None and ours in Path(path).resolve().parents, (name, path)
    assert set(GROUPS) <= set(task_manager.all_groups)
    # nothing else in these families' folders (a stray YAML would be a task nobody tests)
    families = ("gsm8k", "gsm_plus", "aime", "bbh", "mmlu_pro")
    yamls = {p.stem for f in families for p in (ours / f).rglob("*.yaml")}
    expected = set(LEAVES) | {f"_{g}" for g in GROUPS}
    assert yamls == expected


def test_builds_every_task_and_group(built):
    tasks, groups, group_map = built
    assert set(tasks) == set(LEAVES)
    assert set(groups) == set(GROUPS)
    for g, children in group_map.items():
        assert sorted(children) == sorted(GROUPS[g])


def test_group_aggregates(built):
    _, groups, _ = built
    for g, group in groups.items():
        agg = {a.metric: a for a in group.aggregate_metric_list}
        assert set(agg) == {"exact_match", "truncated"}, g
        for a in agg.values():
            assert a.filter_list == ["none"] and a.weight_by_size, g


@pytest.mark.parametrize("name", LEAVES)
def test_task_config(built, name):
    task = built[0][name]
    cfg = task.config
    docs = list(task.test_docs())
    assert docs, f"{name}: no docs from the local fixtures"
    # zero-shot chat-style prompt asking for the final answer in \boxed{} (Dyck: an Answer: line)
    assert cfg.num_fewshot == 0
    prompt = task.doc_to_text(docs[0])
    assert isinstance(prompt, str) and prompt.strip()
    assert ("\\boxed{}" in prompt) or ("Answer:" in prompt and "dyck" in name), prompt
    # not a base-model few-shot format
    assert not prompt.rstrip().endswith(("Answer:", "A:")) and "Let's think step by step" not in prompt
    # nothing that could cut a thinking block; budget sized for long reasoning
    gk = cfg.generation_kwargs
    assert gk["until"] == []
    assert gk["max_gen_toks"] == BUDGET[name]
    # one scorer, two metrics, one filter name across all tasks
    assert callable(cfg.process_results)
    assert cfg.process_results.__module__.startswith("lm_eval_telltale.tasksupport.scoring")
    metrics = {m["metric"]: m for m in cfg.metric_list}
    assert {"exact_match", "truncated"} <= set(metrics)
    assert metrics["truncated"]["higher_is_better"] is False
    assert [f.name for f in task._filters] == ["none"]
    # the real dataset stays named in the config
    kw = cfg.dataset_kwargs
    assert kw["hf_path"] in {"openai/gsm8k", "qintongli/GSM-Plus", "Maxwell-Jia/AIME_2024", "SaylorTwift/bbh",
                             "TIGER-Lab/MMLU-Pro"}
    # the scorer runs on this doc: a truncated response is wrong and counted
    out = task.process_results(docs[0], ["<think>never closed"])
    assert out["exact_match"] == 0.0 and out["truncated"] == 1.0


def test_dataset_ids_and_filters(built):
    tasks = built[0]
    kw = {n: t.config.dataset_kwargs for n, t in tasks.items()}
    assert kw["telltale_gsm8k"] == {"hf_path": "openai/gsm8k", "hf_name": "main", "splits": ["test"]}
    assert kw["telltale_aime24"]["hf_path"] == "Maxwell-Jia/AIME_2024" and kw["telltale_aime24"]["splits"] == ["train"]
    for slug, ptype in taskdata.GSM_PLUS_TYPES.items():
        assert kw[f"telltale_gsm_plus_{slug}"]["where"] == {"perturbation_type": ptype}
        assert kw[f"telltale_gsm_plus_{slug}"]["splits"] == ["test"]
        assert kw[f"telltale_gsm_plus_mini_{slug}"]["splits"] == ["testmini"]
        assert all(d["perturbation_type"] == ptype for d in tasks[f"telltale_gsm_plus_{slug}"].test_docs())
    for slug, cat in taskdata.MMLU_PRO_SUBJECTS.items():
        assert kw[f"telltale_mmlu_pro_{slug}"]["where"] == {"category": cat}
        assert all(d["category"] == cat for d in tasks[f"telltale_mmlu_pro_{slug}"].test_docs())
    from lm_eval_telltale.tasksupport.scoring import BBH_KINDS

    for sub, kind in BBH_KINDS.items():
        t = tasks[f"telltale_bbh_{sub}"]
        assert t.config.dataset_kwargs["hf_name"] == sub
        assert t.config.process_results.__name__ == f"process_results_bbh_{kind}"


def test_aime_k8(built):
    task = built[0]["telltale_aime24_k8"]
    cfg = task.config
    assert cfg.repeats == 8
    assert cfg.generation_kwargs["do_sample"] is True and cfg.generation_kwargs["temperature"] > 0
    assert {m["metric"] for m in cfg.metric_list} == {"exact_match", "truncated", "extraction", "pass_at_k", "maj_at_k"}
    doc = next(iter(task.test_docs()))
    gold = doc["Answer"]
    out = task.process_results(doc, [[f"<think>x</think>\\boxed{{{gold}}}"] * 6 + ["<think>x"] * 2])
    assert [r["rule"] for r in out.pop("extraction")] == ["boxed"] * 6 + ["none"] * 2
    assert out == {"exact_match": 0.75, "truncated": 0.25, "pass_at_k": 1.0, "maj_at_k": 1.0}


# --------------------------------------------------------------------------------------------
# installed copy
# --------------------------------------------------------------------------------------------


def _install_copy(site: Path) -> Path:
    """Lay the package out as the wheel does (pyproject: packages + force-include)."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    wheel = cfg["tool"]["hatch"]["build"]["targets"]["wheel"]
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in wheel["packages"]:
        shutil.copytree(REPO / pkg, site / pkg, ignore=ignore)
    for src, dst in wheel.get("force-include", {}).items():
        s, d = REPO / src, site / dst
        if s.is_dir():
            shutil.copytree(s, d, ignore=ignore, dirs_exist_ok=True)
        else:
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, d)
    assert (site / "lm_eval_telltale" / "tasks" / "README.md").is_file(), "wheel must ship tasks/"
    return site


_BUILD_ALL = r"""
import json, sys
import lm_eval_telltale
from lm_eval.tasks import TaskManager
names = sys.argv[1].split(",")
tm = TaskManager(metadata={"telltale_data_dir": sys.argv[2]})   # no include_path: start-up hook
built = tm.load(names)
out = {"tasks_dir": str(lm_eval_telltale.tasks_dir()), "module": lm_eval_telltale.__file__,
       "n_docs": {k: len(list(t.test_docs())) for k, t in built["tasks"].items()},
       "groups": sorted(built["groups"])}
print("RESULT " + json.dumps(out))
"""


def test_installed_copy(tmp_path, telltale_data):
    site = _install_copy(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("TELLTALE_NO_TASKS", None)
    env.pop("TELLTALE_TASKS_ONLY", None)  # as a user's environment: lm-eval's built-in tasks indexed too
    env.pop("TELLTALE_DATA_DIR", None)
    names = ",".join(TOP_LEVEL)

    r = subprocess.run([str(BIN / "lm_eval"), "validate", "--tasks", names], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "All tasks found and valid" in r.stdout, r.stdout + r.stderr

    r = subprocess.run([sys.executable, "-c", _BUILD_ALL, names, str(telltale_data)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert Path(out["tasks_dir"]) == site / "lm_eval_telltale" / "tasks"
    assert Path(out["module"]).parent == site / "lm_eval_telltale"
    assert set(out["n_docs"]) == set(LEAVES)
    assert all(n > 0 for n in out["n_docs"].values()), out["n_docs"]
    assert out["groups"] == sorted(GROUPS)


# --------------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------------


def test_loader_local_layout_and_env(telltale_data, monkeypatch):
    monkeypatch.delenv("TELLTALE_DATA_DIR", raising=False)
    ds = taskdata.load("openai/gsm8k", "main", ["test"], telltale_data_dir=str(telltale_data))
    assert list(ds) == ["test"] and len(ds["test"]) >= 2
    monkeypatch.setenv("TELLTALE_DATA_DIR", str(telltale_data))
    ds2 = taskdata.load("qintongli/GSM-Plus", None, ["testmini"], where={"perturbation_type": "critical thinking"},
                        pretrained="ignored", version=1.0)  # lm-eval also passes model_args/metadata
    assert len(ds2["testmini"]) >= 1 and set(ds2["testmini"]["answer"]) == {"None"}


def test_loader_missing_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TELLTALE_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="openai/gsm8k/main/test"):
        taskdata.load("openai/gsm8k", "main", ["test"])


def test_loader_uses_the_real_dataset_without_override(monkeypatch, telltale_data):
    import datasets

    monkeypatch.delenv("TELLTALE_DATA_DIR", raising=False)
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        local = taskdata.local_file(telltale_data, path, name, split)
        return datasets.Dataset.from_list([json.loads(x) for x in local.read_text().splitlines()])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for hf_path, hf_name, splits in taskdata.datasets_used():
        ds = taskdata.load(hf_path, hf_name, list(splits))
        assert list(ds) == list(splits)
    assert ("openai/gsm8k", "main", "test") in calls
    assert ("SaylorTwift/bbh", "word_sorting", "test") in calls
    assert ("TIGER-Lab/MMLU-Pro", None, "test") in calls


def test_fixture_schemas(telltale_data):
    def rows(path, name, split):
        return [json.loads(x) for x in taskdata.local_file(telltale_data, path, name, split).read_text().splitlines()]

    for r in rows("openai/gsm8k", "main", "test"):
        assert set(r) == {"question", "answer"} and "\n#### " in r["answer"]
    plus = rows("qintongli/GSM-Plus", None, "test")
    assert {r["perturbation_type"] for r in plus} == set(taskdata.GSM_PLUS_TYPES.values())
    for r in plus:
        assert set(r) == {"question", "solution", "answer", "perturbation_type", "seed_question", "seed_solution",
                          "seed_answer"}
        assert isinstance(r["answer"], str) and r["solution"].rstrip().endswith(f"#### {r['answer']}")
    for r in rows("Maxwell-Jia/AIME_2024", None, "train"):
        assert set(r) == {"ID", "Problem", "Solution", "Answer"} and isinstance(r["Answer"], int)
    from lm_eval_telltale.tasksupport.scoring import BBH_KINDS

    for sub in BBH_KINDS:
        for r in rows("SaylorTwift/bbh", sub, "test"):
            assert set(r) == {"input", "target"} and all(isinstance(v, str) for v in r.values())
    mmlu = rows("TIGER-Lab/MMLU-Pro", None, "test")
    assert {r["category"] for r in mmlu} == set(taskdata.MMLU_PRO_SUBJECTS.values())
    for r in mmlu:
        assert set(r) == {"question_id", "question", "options", "answer", "answer_index", "cot_content", "category", "src"}
        assert r["answer"] == "ABCDEFGHIJ"[r["answer_index"]] and len(r["options"]) <= 10
