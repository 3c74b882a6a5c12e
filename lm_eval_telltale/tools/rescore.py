"""``telltale rescore`` and ``telltale audit``: the logged samples of finished lm-eval runs, scored
again with the current scorer, or examined for how their answers were found.

::

    telltale rescore RUN_DIR... [--out DIR] [--include_path DIR]
    telltale audit   RUN_DIR... [--out FILE] [--json FILE] [--show N] [--include_path DIR]

Both need runs made with ``--log_samples`` (the samples files hold each doc, its responses and its
metrics) of tasks whose YAML has a ``process_results`` (the packaged ``telltale_*`` tasks; a task
scored by a metric function is reported and left alone).

**rescore** calls each task's current ``process_results`` on the logged filtered responses (the
filters are not applied again) under the run's think rule (its recorded ``model_args`` and chat
template, :func:`~lm_eval_telltale.tasksupport.scoring.process.opens_think_for`), aggregates the
metrics as the task's YAML says (groups: size-weighted means, as the packaged groups), and writes
a new run directory — ``<RUN_DIR>.rescored-<time>`` beside the old one, or ``--out`` — with the
results file (its ``telltale_rescore`` entry names the source) and the samples with their new
metrics. The old files are never written to. It prints, per task, the verdicts (``exact_match``
per sample) that changed.

**audit** reads each sample's ``extraction`` record (how its answer was found: boxed, phrase,
option_text, fallback, none; ambiguous or not); a run that predates the record is scored in
memory with the current scorer (the report says so). The report: per task, the count of each
rule, of ambiguous and of unanswered responses, and up to ``--show`` samples of each of those
kinds (the answer read, the gold, the end of the response).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..cmdline import parse_args_string
from ..tasksupport.scoring import RULES
from .runs import NoResultsError, read_samples, results_files, samples_path


@dataclass
class TaskSamples:
    """One task of one run: its logged samples and the scorer that made them."""

    run: Path  # the results file
    task: str
    path: Path  # the samples file
    samples: list[dict]
    cfg: dict | None = None  # the task's YAML config (functions resolved), None when not found

    @property
    def process_results(self) -> Callable | None:
        pr = (self.cfg or {}).get("process_results")
        return pr if callable(pr) else None


@dataclass
class RunSamples:
    results_path: Path
    res: dict
    tasks: list[TaskSamples] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # leaf tasks without a samples file


def _leaf_tasks(res: dict) -> list[str]:
    groups = set((res.get("group_subtasks") or {}))
    return [t for t in (res.get("configs") or res.get("results") or {}) if t not in groups]


def _task_config(task: str, include_path: str | None) -> dict | None:
    from lm_eval.tasks._yaml_loader import load_yaml

    from ..harness.taskindex import index_entry

    entry = index_entry(task, include_path)
    if entry is None or not entry.yaml_path:
        return None
    return load_yaml(entry.yaml_path, resolve_func=True)


def load_run_samples(targets: list[str], include_path: str | None, warn) -> list[RunSamples]:
    """Every results file under ``targets`` with its tasks' logged samples and scorers."""
    runs: list[RunSamples] = []
    for target in targets:
        for f in results_files(target):
            try:
                res = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                warn(f"skipping {f}: unreadable ({e.__class__.__name__})")
                continue
            run = RunSamples(f, res)
            for task in _leaf_tasks(res):
                sp = samples_path(f, task)
                if sp is None:
                    run.missing.append(task)
                    continue
                run.tasks.append(TaskSamples(f, task, sp, read_samples(sp), _task_config(task, include_path)))
            if run.missing and not run.tasks:
                warn(f"{f}: no logged samples (was the run made with --log_samples?); skipped")
                continue
            runs.append(run)
    return runs


@contextlib.contextmanager
def run_think_rule(res: dict):
    """Score as the run was scored: its prompts' think block decided from its recorded
    ``model_args`` when it applied a chat template (``TELLTALE_REQUIRE_THINK_END`` still wins)."""
    from ..tasksupport.scoring import process

    cfg = res.get("config") or {}
    applied = bool(res.get("chat_template") or res.get("chat_template_sha"))
    opens = process.opens_think_for(parse_args_string(cfg.get("model_args"))) if applied else False
    process.set_prompt_opens_think(bool(opens))
    try:
        yield
    finally:
        process.set_prompt_opens_think(None)


# -- rescore -----------------------------------------------------------------------------------------

def _aggregate(cfg: dict, per_sample: list[dict]) -> dict[str, Any]:
    """The task's metrics over ``per_sample`` as lm-eval aggregates them (``metric,none`` and
    ``metric_stderr,none``)."""
    from lm_eval.api.metrics import stderr_for_metric
    from lm_eval.api.registry import get_aggregation

    out: dict[str, Any] = {}
    aggs = {m["metric"]: m.get("aggregation", "mean") for m in cfg.get("metric_list") or []}
    for name in dict.fromkeys(k for s in per_sample for k in s):
        items = [s[name] for s in per_sample if name in s]
        agg = aggs.get(name, "mean")
        fn = agg if callable(agg) else get_aggregation(agg)
        out[f"{name},none"] = fn(items)
        se = stderr_for_metric(fn, bootstrap_iters=100000)
        out[f"{name}_stderr,none"] = se(items) if se and len(items) > 1 else "N/A"
    return out


def _regroup(res: dict, new: dict[str, dict]) -> None:
    """Groups re-aggregated from their rescored subtasks as lm-eval aggregates the packaged groups
    (``weight_by_size``): its size-weighted mean and pooled stderr."""
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr

    ns = res.get("n-samples") or {}
    for group, subs in (res.get("group_subtasks") or {}).items():
        if not subs or not all(s in new for s in subs):
            continue
        entry = dict((res.get("results") or {}).get(group) or {})
        for key in [k for k in entry if "," in k and "_stderr," not in k]:
            if not all(key in new[s] and isinstance(new[s][key], (int, float)) for s in subs):
                continue
            sizes = [int((ns.get(s) or {}).get("effective") or 0) or 1 for s in subs]
            vals = [float(new[s][key]) for s in subs]
            entry[key] = aggregate_subtask_metrics(vals, sizes, weight_by_size=True)
            m, f = key.split(",", 1)
            ses = [new[s].get(f"{m}_stderr,{f}") for s in subs]
            if all(isinstance(x, (int, float)) for x in ses):
                entry[f"{m}_stderr,{f}"] = pooled_sample_stderr(ses, sizes)
        new[group] = entry
        if group in (res.get("groups") or {}):
            res["groups"][group] = {k: v for k, v in entry.items()}


def _verdict(s: dict) -> float | None:
    v = s.get("exact_match")
    return float(v) if isinstance(v, (int, float)) else None


def _tail(s: dict, i: int = -1, n: int = 160) -> str:
    """The end of a sample's ``i``-th response (its filtered responses flattened, as the scorer
    reads them: one per request, or the ``repeats`` list)."""
    from ..tasksupport.scoring.entry import responses

    resps = responses(s.get("filtered_resps") or s.get("resps") or [])
    text = " ".join(resps[i if -len(resps) <= i < len(resps) else -1].split())
    return text if len(text) <= n else "…" + text[-n:]


def rescore_run(run: RunSamples, out_dir: Path, warn) -> dict[str, list[dict]]:
    """Score ``run``'s samples again into ``out_dir``; per task, the samples whose verdict changed."""
    from tqdm.auto import tqdm

    res = json.loads(json.dumps(run.res))  # a copy to change
    changed: dict[str, list[dict]] = {}
    new_results: dict[str, dict] = {}
    out_dir.mkdir(parents=True)
    with run_think_rule(run.res):
        for ts in run.tasks:
            pr = ts.process_results
            dest = out_dir / ts.path.name
            if pr is None:
                warn(f"{ts.task}: {'not found in the task index' if ts.cfg is None else 'scored by a metric function'}"
                     "; its samples are copied unchanged")
                dest.write_bytes(ts.path.read_bytes())
                continue
            rows, per_sample, diff = [], [], []
            for s in tqdm(ts.samples, desc=f"rescore {ts.task}", unit="sample", disable=None, leave=False):
                metrics = pr(s.get("doc") or {}, s.get("filtered_resps") or [])
                old = _verdict(s)
                row = {k: v for k, v in s.items() if k not in set(s.get("metrics") or [])}
                row.update(metrics)
                row["metrics"] = list(metrics)
                rows.append(row)
                per_sample.append(metrics)
                new = _verdict(row)
                if old != new:
                    ext = metrics.get("extraction") or [{}]
                    diff.append({"doc_id": s.get("doc_id"), "old": old, "new": new, "target": s.get("target"),
                                 "answer": [e.get("answer") for e in ext], "rule": [e.get("rule") for e in ext]})
            with dest.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            new_results[ts.task] = {**(res["results"].get(ts.task) or {}), **_aggregate(ts.cfg or {}, per_sample)}
            changed[ts.task] = diff
    _regroup(res, new_results)
    res["results"].update(new_results)
    res["telltale_rescore"] = {"source": str(run.results_path.resolve()), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "changed": {t: len(d) for t, d in changed.items()}}
    (out_dir / run.results_path.name).write_text(json.dumps(res, indent=2, ensure_ascii=False, default=str) + "\n",
                                                encoding="utf-8")
    return changed


def _parser_rescore() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="telltale rescore", description="Score the logged samples of finished lm-eval "
                                 "runs again with the current scorer; write the results beside the old ones and print "
                                 "the verdicts that changed.")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="an lm-eval --output_path directory or results file "
                                                                "(made with --log_samples)")
    ap.add_argument("--out", help="directory for the rescored run (default: <RUN_DIR>.rescored-<time> beside it); "
                                  "must not exist. With several RUN_DIRs, one subdirectory per results file")
    ap.add_argument("--include_path", help="the --include_path the runs were made with (tasks not packaged here)")
    return ap


def main_rescore(argv=None) -> int:
    ap = _parser_rescore()
    a = ap.parse_args(argv)
    from ..files import unwritable

    stamp = time.strftime("%Y%m%dT%H%M%S")
    plans: list[tuple[str, Path]] = []
    for r in a.runs:
        p = Path(r).expanduser()
        if not p.exists():
            ap.error(f"{r}: no such file or directory")
        base = Path(a.out).expanduser() if a.out else p.parent / f"{(p if p.is_dir() else p.parent).name}.rescored-{stamp}"
        if a.out and len(a.runs) > 1:
            base = base / p.name
        plans.append((r, base))
    for _, base in plans:
        if base.exists():
            ap.error(f"--out {base}: exists; rescoring never writes over earlier files — give a new directory")
        why = unwritable(base, is_dir=True)
        if why:
            ap.error(f"--out {base}: {why}")

    def warn(m):
        print(f"telltale rescore: warning: {m}", file=sys.stderr)

    total = 0
    for r, base in plans:
        try:
            runs = load_run_samples([r], a.include_path, warn)
        except NoResultsError as e:
            print(f"telltale rescore: error: {e}", file=sys.stderr)
            return 2
        if not runs:
            print(f"telltale rescore: error: {r}: no run with logged samples (--log_samples)", file=sys.stderr)
            return 2
        src = Path(r).expanduser()
        src_root = src if src.is_dir() else src.parent
        used: set[Path] = set()
        for run in runs:
            # the run's layout kept (<model>/results_*.json); two results files of one directory apart
            out_dir = base / run.results_path.parent.relative_to(src_root)
            if out_dir in used:
                out_dir = out_dir / run.results_path.stem
            used.add(out_dir)
            changed = rescore_run(run, out_dir, warn)
            print(f"telltale rescore: {run.results_path} → {out_dir / run.results_path.name}")
            for task, diff in changed.items():
                old = run.res["results"].get(task, {}).get("exact_match,none")
                new = json.loads((out_dir / run.results_path.name).read_text())["results"][task].get("exact_match,none")
                print(f"  {task}: {len(diff)} verdict(s) changed; exact_match {_num(old)} → {_num(new)}")
                for d in diff:
                    print(f"    doc {d['doc_id']}: {_num(d['old'])} → {_num(d['new'])} (gold {d['target']!r}, "
                          f"answer {d['answer'] if len(d['answer']) > 1 else d['answer'][0]!r}, "
                          f"rule {'/'.join(map(str, dict.fromkeys(d['rule'])))})")
                total += len(diff)
    print(f"telltale rescore: {total} verdict(s) changed in all")
    return 0


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else str(v)


# -- audit -------------------------------------------------------------------------------------------

KINDS = ("ambiguous", "unanswered", "fallback")


def audit(runs: list[RunSamples], show: int = 5) -> dict[str, Any]:
    """Per run and task: the count of each rule, ambiguous and unanswered responses (rule none,
    not truncated), truncated ones, and up to ``show`` samples of each kind in :data:`KINDS`."""
    out: dict[str, Any] = {"runs": []}
    for run in runs:
        rr = {"results": str(run.results_path), "model": (run.res.get("config") or {}).get("model"),
              "tasks": [], "missing": run.missing}
        with run_think_rule(run.res):
            for ts in run.tasks:
                counts = dict.fromkeys(RULES, 0)
                counts.update(ambiguous=0, unanswered=0, truncated=0, responses=0)
                examples: dict[str, list] = {k: [] for k in KINDS}
                scored_now = 0
                for s in ts.samples:
                    recs, trunc = s.get("extraction"), s.get("truncated")
                    if not isinstance(recs, list) and ts.process_results is not None:
                        m = ts.process_results(s.get("doc") or {}, s.get("filtered_resps") or [])
                        recs, trunc = m.get("extraction"), m.get("truncated")
                        scored_now += 1
                    if not isinstance(recs, list):
                        continue
                    n = len(recs)
                    n_trunc = round(float(trunc or 0) * n)
                    counts["truncated"] += n_trunc
                    for i, r in enumerate(recs):
                        counts["responses"] += 1
                        rule = r.get("rule") if r.get("rule") in RULES else "none"
                        counts[rule] += 1
                        kinds = []
                        if r.get("ambiguous"):
                            counts["ambiguous"] += 1
                            kinds.append("ambiguous")
                        if rule == "none" and n_trunc < n:
                            kinds.append("unanswered")
                        if rule == "fallback":
                            kinds.append("fallback")
                        for k in kinds:
                            if len(examples[k]) < show:
                                examples[k].append({"doc_id": s.get("doc_id"), "response": i, "target": s.get("target"),
                                                    "answer": r.get("answer"), "rule": rule,
                                                    "exact_match": s.get("exact_match"), "end": _tail(s, i)})
                counts["unanswered"] = counts["none"] - counts["truncated"]  # no answer, though not truncated
                rr["tasks"].append({"task": ts.task, "samples": len(ts.samples), "counts": counts,
                                    "scored_now": scored_now, "examples": examples,
                                    "scorer": ts.process_results is not None})
        out["runs"].append(rr)
    return out


def render_audit(rep: dict) -> str:
    lines = ["# Extraction audit", "",
             "How each response's answer was found (`boxed`, answer `phrase`, `option_text`, the task's `fallback` "
             "search, `none`), and the responses a reviewer should read: ambiguous ones (several candidate answers, "
             "or a hedge, which scores wrong), unanswered ones (no answer found, not truncated) and those read by "
             "the fallback.", ""]
    for rr in rep["runs"]:
        lines += [f"## {rr['results']}", "", f"model type `{rr['model']}`", ""]
        if rr["missing"]:
            lines += [f"no logged samples for: {', '.join(rr['missing'])}", ""]
        head = ["task", "responses", *RULES, "ambiguous", "unanswered", "truncated"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" + "--:|" * (len(head) - 1)]
        for t in rr["tasks"]:
            c = t["counts"]
            lines.append("| " + " | ".join([t["task"], str(c["responses"]), *(str(c[r]) for r in RULES),
                                            str(c["ambiguous"]), str(c["unanswered"]), str(c["truncated"])]) + " |")
        lines.append("")
        for t in rr["tasks"]:
            if t["scored_now"]:
                lines.append(f"- {t['task']}: {t['scored_now']} samples predate the extraction record and were "
                             "scored now with the current scorer (`telltale rescore` writes them)")
            if not t["scorer"]:
                lines.append(f"- {t['task']}: no `process_results` scorer found; counted from the logged records only")
            for kind in KINDS:
                ex = t["examples"][kind]
                if not ex:
                    continue
                lines += ["", f"### {t['task']}: {kind} ({len(ex)} shown)", "",
                          "| doc | answer read | gold | rule | exact_match | end of the response |",
                          "|--:|---|---|---|--:|---|"]
                for e in ex:
                    cells = [str(e["doc_id"]), repr(e["answer"]), repr(e["target"]), e["rule"], str(e["exact_match"]),
                             e["end"]]
                    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def render_audit_html(rep: dict) -> str:
    """The audit as an HTML fragment (``telltale view``'s index page): the counts per task, and
    the samples to read."""
    import html

    parts = []
    for rr in rep["runs"]:
        head = ["task", "responses", *RULES, "ambiguous", "unanswered", "truncated"]
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in
                                         [t["task"], t["counts"]["responses"], *(t["counts"][r] for r in RULES),
                                          t["counts"]["ambiguous"], t["counts"]["unanswered"], t["counts"]["truncated"]])
                       + "</tr>" for t in rr["tasks"])
        items = "".join(f"<li>{html.escape(t['task'])}, {kind}: doc {e['doc_id']} — answer read "
                        f"<code>{html.escape(repr(e['answer']))}</code>, gold <code>{html.escape(repr(e['target']))}</code>"
                        f" ({e['rule']}): <q>{html.escape(e['end'])}</q></li>"
                        for t in rr["tasks"] for kind in KINDS for e in t["examples"][kind])
        parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{rows}</table>"
                     + (f"<ul>{items}</ul>" if items else ""))
    return "<h2>Extraction audit</h2>" + "".join(parts)


def main_audit(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="telltale audit", description="How the answers of finished lm-eval runs were "
                                 "extracted: per task, the count of each rule, ambiguous and unanswered responses, "
                                 "and the samples themselves.")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="lm-eval --output_path directories or results files "
                                                                "(made with --log_samples)")
    ap.add_argument("--out", help="write the Markdown report here (default: print it)")
    ap.add_argument("--json", help="also write the report as JSON here")
    ap.add_argument("--show", type=int, default=5, help="samples shown per task and kind (default 5)")
    ap.add_argument("--include_path", help="the --include_path the runs were made with (tasks not packaged here)")
    a = ap.parse_args(argv)
    if a.show < 0:
        ap.error(f"--show must be >= 0, got {a.show}")
    from ..files import unwritable
    from .runs import Inputs

    inputs = Inputs()
    for r in a.runs:
        p = Path(r).expanduser()
        if not p.exists():
            ap.error(f"{r}: no such file or directory")
        inputs.files.update(f.resolve() for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    for flag, dest in (("--out", a.out), ("--json", a.json)):
        if dest:
            why = unwritable(dest) or inputs.conflict(Path(dest).expanduser())
            if why:
                ap.error(f"{flag} {dest}: {why}")

    def warn(m):
        print(f"telltale audit: warning: {m}", file=sys.stderr)

    try:
        runs = load_run_samples(a.runs, a.include_path, warn)
    except NoResultsError as e:
        print(f"telltale audit: error: {e}", file=sys.stderr)
        return 2
    if not runs:
        print("telltale audit: error: no run with logged samples (--log_samples)", file=sys.stderr)
        return 2
    rep = audit(runs, a.show)
    md = render_audit(rep)
    if a.out:
        Path(a.out).expanduser().write_text(md + "\n", encoding="utf-8")
        print(f"telltale audit: wrote {a.out}", file=sys.stderr)
    else:
        print(md)
    if a.json:
        Path(a.json).expanduser().write_text(json.dumps(rep, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"telltale audit: wrote {a.json}", file=sys.stderr)
    return 0
