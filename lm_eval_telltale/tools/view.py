"""``telltale view``: a self-contained HTML page per generated answer — "the norm lights up when the
model thinks".

Needs a run made with ``record_tokens=true`` (per-token traces in the sidecar). The page shows:

- the generated text token by token, each token shaded by its residual-stream norm at the chosen
  layer relative to that token's τ (red above τ, blue below; grey dotted = τ still warming up;
  the last generated token is never fed back, so it has no norm);
- the thinking block (``<think>`` … ``</think>``, also when the prompt opened it) framed;
- the τ crossings at the chosen layer (▲ upward, ▼ downward);
- every intervention, at any patched layer (bold at the chosen one): R accepted recursion (ALRR),
  r recursion tried and rejected, I injection (ERSS), S suppression, with counts in the legend;
- a per-layer chart (this answer's mean and p10–p90 norm per patched layer, the clicked token's
  norms and τ) and the token-wise trace at the chosen layer with τ;
- a layer selector (all recorded layers are embedded), the prompt, the target and lm-eval's
  verdict when the run's samples file is there, and for LRS runs the candidates' scores and picks.

Everything (data, CSS, JS) is inline; no network access. The page sets ``data-rendered="ok"`` on
``<body>`` once drawn and reports script errors into ``#tt-errors`` (used by the browser test).

Token text: the run's tokenizer (``config.model_args.pretrained`` of the results JSON, or
``--model``) decodes incrementally, so a multi-byte character belongs to the token that completes
it; control characters are shown as visible symbols. Without a tokenizer, token ids are shown.

The run's files (the sidecar, the results JSON, lm-eval's samples files) are never written over:
an ``--out`` page that would replace one is refused before anything is written.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path
from typing import Any

from ..core.stats import EVENT_NAMES
from ..sidecar import read_sidecar
from ..tasksupport.scoring.process import think_tags

#: the page template (inline CSS and JS): {{TITLE}} and {{DATA}} are filled in by :func:`render_page`
TEMPLATE = Path(__file__).with_name("view.html")


# --------------------------------------------------------------------------------------------
# locating the run
# --------------------------------------------------------------------------------------------

def _load_results(path: Path) -> dict | None:
    try:
        res = json.loads(path.read_text())
        return res if isinstance(res, dict) else None
    except (OSError, json.JSONDecodeError):
        return None


def locate(target: str | Path) -> tuple[Path, dict | None, Path | None]:
    """(sidecar, results JSON or None, results path or None) for a run dir, results file or sidecar."""
    from .runs import NoResultsError, find_sidecar, results_files

    p = Path(target).expanduser()
    if p.is_file() and p.suffix == ".jsonl":
        res_path = None
        for f in sorted(p.parent.glob("results_*.json"), reverse=True):
            r = _load_results(f)
            if r and find_sidecar(f, r) == p:
                return p, r, f
        return p, None, res_path
    files = results_files(p)
    tried = []
    for f in sorted(files, key=lambda f: f.name, reverse=True):
        r = _load_results(f)
        if not r:
            continue
        sc = find_sidecar(f, r)
        if sc is not None:
            return sc, r, f
        tried.append(f.name)
    raise NoResultsError(f"{p}: no telltale sidecar found next to {', '.join(tried) or 'any results file'} "
                         "(was the run made with a telltale model type and --output_path?)")


def samples_for(res_path: Path | None, task: str) -> dict[int, dict]:
    """lm-eval's logged samples of ``task`` for the run of ``res_path`` (same timestamp), by doc_id."""
    from .runs import read_samples, samples_path

    path = samples_path(res_path, task) if res_path is not None else None
    out: dict[int, dict] = {}
    for s in read_samples(path) if path else []:
        out.setdefault(s.get("doc_id"), s)
    return out


# --------------------------------------------------------------------------------------------
# token text
# --------------------------------------------------------------------------------------------

def load_tokenizer(name: str | None):
    if not name:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001
        print(f"telltale view: warning: cannot load the tokenizer of {name!r} ({e.__class__.__name__}); "
              "showing token ids (pass --model)", file=sys.stderr)
        return None


def token_pieces(tok, ids: list[int]) -> list[str]:
    """Incremental detokenization (vLLM's prefix/read offsets): piece i is the text that token i
    completes; a token inside an unfinished multi-byte character gets ""."""
    if tok is None:
        return [f"⟨{i}⟩" for i in ids]
    out, prefix, read = [], 0, 0
    dec = lambda a: tok.decode(a, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
    for i in range(len(ids)):
        prefix_text = dec(ids[prefix:read])
        new_text = dec(ids[prefix:i + 1])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            out.append(new_text[len(prefix_text):])
            prefix, read = read, i + 1
            if read - prefix > 6:
                prefix = read - 6
        else:
            out.append("")
    if out and "".join(out) == "" and ids:
        out = [dec([i]) for i in ids]
    return out


def think_flags(pieces: list[str], starts_open: bool) -> list[int]:
    """Per token: 0 outside, 1 inside the thinking block, 2 a token that completes a think tag (the
    scorer's tags: ``think_tags``). ``starts_open``: the prompt already opened the block (Qwen3
    thinking / R1 templates)."""
    opening, closing = think_tags()
    flags, inside, text = [], starts_open, ""
    for p in pieces:
        start = len(text)
        text += p
        tag_here = False
        for tag in (opening, closing):
            i = text.find(tag, max(0, start - len(tag) + 1))
            while i != -1:
                tag_here = tag_here or i + len(tag) > start
                i = text.find(tag, i + 1)
        o, c = text.rfind(opening), text.rfind(closing)
        if o != -1 or c != -1:
            inside = o > c
        flags.append(2 if tag_here else (1 if inside else 0))
    return flags


def prompt_opens_block(prompt: str | None) -> bool:
    if not prompt:
        return False
    opening, closing = think_tags()
    return prompt.rfind(opening) > prompt.rfind(closing)


def crossings(norm: list[list[float]], tau: list[list[float | None]], j: int) -> tuple[list[int], list[int]]:
    """Rows (trace order) where the norm at layer column j crosses τ upward / downward."""
    up, down, prev = [], [], None
    for k in range(len(norm)):
        t = tau[k][j]
        if t is None:
            prev = None
            continue
        above = norm[k][j] > t
        if prev is not None and above != prev:
            (up if above else down).append(k)
        prev = above
    return up, down


# --------------------------------------------------------------------------------------------
# page data
# --------------------------------------------------------------------------------------------

def sample_data(row: dict, res: dict | None, tok, sample: dict | None) -> dict[str, Any]:
    tt = ((res or {}).get("config") or {}).get("telltale") or {}
    tokens = row.get("tokens")
    if not tokens or "norm" not in tokens:
        raise ValueError(f"{row.get('task')} doc {row.get('doc_id')}: no per-token trace in the sidecar — "
                         "re-run with record_tokens=true in --model_args")
    cfg = tt.get("config") or {}
    layers = [int(l) for l in (cfg.get("layers") or sorted(int(x) for x in (row.get("layers") or {})))]
    ids = list(row.get("token_ids") or [])
    n_prompt = int(row.get("n_prompt_tokens") or (tokens["position"][0] if tokens.get("position") else 0))
    pos = tokens.get("position") or []
    row_of = {p - n_prompt: k for k, p in enumerate(pos)}
    if not ids:
        ids = [-1] * (len(pos) + 1)
    pieces = token_pieces(tok, [i for i in ids if i >= 0]) if ids and ids[0] >= 0 else ["·"] * len(ids)
    prompt = None
    if sample:
        try:
            prompt = sample["arguments"]["gen_args_0"]["arg_0"]
        except (KeyError, TypeError):
            prompt = None
    full = "".join(pieces)
    opening, closing = think_tags()
    starts_open = prompt_opens_block(prompt) or (closing in full and full.find(opening) == -1) \
        or (closing in full and full.find(closing) < full.find(opening))
    flags = think_flags(pieces, starts_open)
    L = len(layers)
    norm = [[float(x) for x in r] for r in tokens["norm"]]
    tau = [[None if x is None else float(x) for x in r] for r in tokens.get("tau") or [[None] * L for _ in norm]]
    event = [[int(x) for x in r] for r in tokens.get("event") or [[0] * L for _ in norm]]
    cross = {str(l): dict(zip(("up", "down"), crossings(norm, tau, j))) for j, l in enumerate(layers)}
    verdict = None
    if sample:
        verdict = {k: sample[k] for k in (sample.get("metrics") or []) if k in sample}
    cands = None
    if isinstance(row.get("candidates"), list):
        picks = row.get("picks") or {}
        cands = [{"i": i, "n_tokens": c.get("n_tokens"), "finish_reason": c.get("finish_reason"),
                  "correct": c.get("correct"), "answer": c.get("answer"),
                  "scores": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in (c.get("scores") or {}).items()},
                  "picked_by": [s for s, idx in picks.items() if idx == i], "returned": i == row.get("chosen_index")}
                 for i, c in enumerate(row["candidates"])]
    return {
        "task": row.get("task"), "doc_id": row.get("doc_id"), "repeat": row.get("repeat", 0),
        "method": row.get("method") or tt.get("method"), "model_type": tt.get("model_type"),
        "model": _pretrained(res),
        "settings": _settings(tt), "finish_reason": row.get("finish_reason"),
        "n_prompt_tokens": n_prompt, "n_generated_tokens": row.get("n_generated_tokens", len(ids)),
        "layers": layers, "tokens": [{"t": p, "id": i, "k": row_of.get(n, -1), "th": f}
                                     for n, (p, i, f) in enumerate(zip(pieces, ids, flags))],
        "norm": norm, "tau": tau, "event": event, "cross": cross,
        "events": {name: bit for name, bit in EVENT_NAMES.items()},
        "prompt": prompt, "target": (sample or {}).get("target"),
        "filtered": (sample or {}).get("filtered_resps"), "verdict": verdict, "response": row.get("response"),
        "candidates": cands, "chosen": row.get("chosen"),
    }


def _pretrained(res: dict | None) -> str | None:
    from ..cmdline import parse_args_string

    return parse_args_string(((res or {}).get("config") or {}).get("model_args")).get("pretrained")


def _settings(tt: dict) -> str:
    if not tt:
        return ""
    try:
        from .runs import telltale_knobs

        k = telltale_knobs(tt)
    except Exception:  # noqa: BLE001
        k = {}
    return ", ".join(f"{a}={b}" for a, b in k.items())


def _json_for_script(obj: Any) -> str:
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("\u2028", "\\u2028") \
        .replace("\u2029", "\\u2029")


def render_page(data: dict, layer: int | None = None) -> str:
    layers = data["layers"]
    if layer is None:
        layer = layers[-1]
    if layer not in layers:
        raise ValueError(f"--layer {layer} was not recorded; recorded layers: {layers}")
    data = {**data, "layer": layer}
    title = f"{data['task']} doc {data['doc_id']}" + (f" (repeat {data['repeat']})" if data.get("repeat") else "") \
        + f" — {data.get('method') or ''}"
    return (TEMPLATE.read_text(encoding="utf-8").replace("{{TITLE}}", html.escape(title))
            .replace("{{DATA}}", _json_for_script(data)))


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def _page_name(r: dict) -> str:
    """The file name of a sample's page in an ``--out`` directory."""
    return _slug(f"{r.get('task')}_doc{r.get('doc_id')}_r{r.get('repeat', 0)}") + ".html"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def _audit_html(res_path: Path | None) -> str:
    """``telltale audit``'s report of the run (its logged samples), for the index page; "" without them."""
    if res_path is None:
        return ""
    from .rescore import audit, load_run_samples, render_audit_html

    try:
        runs = load_run_samples([str(res_path)], None, lambda m: None)
        return render_audit_html(audit(runs, show=3)) if runs else ""
    except Exception as e:  # noqa: BLE001 - the pages matter more than the audit
        print(f"telltale view: warning: no extraction audit ({e.__class__.__name__}: {e})", file=sys.stderr)
        return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="telltale view", description="Self-contained HTML page per generated answer: "
                                 "tokens shaded by the norm, τ crossings, think block, interventions.")
    ap.add_argument("run", metavar="RUN_DIR", help="lm-eval --output_path directory, results JSON or sidecar JSONL")
    ap.add_argument("--doc", type=int, default=None, help="doc_id (default: every sample, or the first for a .html --out)")
    ap.add_argument("--task", default=None, help="task name (when several tasks have the doc)")
    ap.add_argument("--repeat", type=int, default=None, help="repeat index (tasks with repeats)")
    ap.add_argument("--layer", type=int, default=None, help="initial layer (default: the deepest recorded)")
    ap.add_argument("--model", default=None, help="tokenizer to decode tokens (default: the run's pretrained)")
    ap.add_argument("--out", required=True, help="page.html (an existing page is overwritten), or a directory: one "
                                                 "page per sample + index.html (pages of the same names are replaced)")
    a = ap.parse_args(argv)
    from .runs import NoResultsError

    out = Path(a.out).expanduser()
    single = out.suffix.lower() in (".html", ".htm")
    if single and out.is_dir():
        ap.error(f"--out {a.out}: an existing directory with a .html name; give a file name for one page, or "
                 "another directory for one page per sample")
    if not single and out.exists() and not out.is_dir():
        ap.error(f"--out {a.out}: an existing file; one page needs a .html/.htm name (overwritten), one page per "
                 "sample needs a directory")
    anc = out.absolute().parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        ap.error(f"--out {a.out}: cannot create it, {anc} is a file")

    try:
        sidecar, res, res_path = locate(a.run)
    except NoResultsError as e:
        print(f"telltale view: error: {e}", file=sys.stderr)
        return 2
    rows = read_sidecar(sidecar, warn=lambda m: print(f"telltale view: warning: {m}", file=sys.stderr))
    sel = [r for r in rows if (a.task is None or r.get("task") == a.task) and (a.doc is None or r.get("doc_id") == a.doc)
           and (a.repeat is None or r.get("repeat", 0) == a.repeat)]
    if not sel:
        print(f"telltale view: error: no sample matches (task={a.task}, doc={a.doc}, repeat={a.repeat}) in {sidecar}; "
              f"it has {len(rows)} rows, tasks {sorted({r.get('task') for r in rows})}", file=sys.stderr)
        return 2
    traced = [r for r in sel if r.get("tokens")]
    if not traced:
        print(f"telltale view: error: {sidecar} has no per-token traces; re-run with record_tokens=true "
              "(the sidecar grows by ≈ 35–40 bytes of JSON per generated token and patched layer)", file=sys.stderr)
        return 2
    traced.sort(key=lambda r: (str(r.get("task")), r.get("doc_id", 0), r.get("repeat", 0)))
    # inputs are never written to: the run's files (sidecar, results, samples) against every page
    from ..cmdline import parse_args_string
    from .runs import Inputs

    inputs = Inputs(files={f.resolve() for f in (Path(a.run).expanduser(), sidecar, res_path) if f and f.is_file()})
    if res_path is not None:
        inputs.files.update(f.resolve() for f in res_path.parent.glob("samples_*.jsonl"))
    for dest in [out] if single else [out / "index.html", *(out / _page_name(r) for r in traced)]:
        why = inputs.conflict(dest)
        if why:
            ap.error(f"--out: {why}")

    margs = parse_args_string(((res or {}).get("config") or {}).get("model_args"))
    tok = load_tokenizer(a.model or margs.get("tokenizer") or margs.get("pretrained"))
    cache: dict[str, dict] = {}

    def page(r: dict) -> str:
        t = r.get("task")
        if t not in cache:
            cache[t] = samples_for(res_path, t)
        return render_page(sample_data(r, res, tok, cache[t].get(r.get("doc_id"))), a.layer)

    try:
        if single:
            r = traced[0]
            if len(traced) > 1:
                print(f"telltale view: {len(traced)} samples match; showing {r.get('task')} doc {r.get('doc_id')} "
                      f"(choose with --task/--doc/--repeat, or give a directory as --out)", file=sys.stderr)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(page(r), encoding="utf-8")
            print(f"telltale view: wrote {out}", file=sys.stderr)
            return 0
        from tqdm.auto import tqdm

        out.mkdir(parents=True, exist_ok=True)
        links = []
        for r in tqdm(traced, desc="telltale view", unit="page", disable=None):
            name = _page_name(r)
            (out / name).write_text(page(r), encoding="utf-8")
            links.append((name, r))
        items = "\n".join(f'<li><a href="{html.escape(n)}">{html.escape(str(r.get("task")))} doc {r.get("doc_id")} '
                          f'repeat {r.get("repeat", 0)}</a> — {r.get("n_generated_tokens")} tokens, '
                          f'{html.escape(str(r.get("finish_reason")))}</li>' for n, r in links)
        (out / "index.html").write_text(f"<!doctype html><meta charset='utf-8'><title>telltale view</title>"
                                        f"<h1>{html.escape(str(sidecar.name))}</h1><ul>{items}</ul>"
                                        f"{_audit_html(res_path)}\n", encoding="utf-8")
        print(f"telltale view: wrote {len(links)} pages and {out / 'index.html'}", file=sys.stderr)
    except ValueError as e:
        print(f"telltale view: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"telltale view: error: cannot write --out {a.out}: {e.strerror or e} ({e.filename or out})",
              file=sys.stderr)
        return 2
    return 0
