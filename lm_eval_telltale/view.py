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
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path
from typing import Any

from .core.stats import EVENT_NAMES

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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
    from .report import NoResultsError, find_sidecar, results_files

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


def read_rows(sidecar: Path) -> list[dict]:
    rows = []
    for line in sidecar.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"telltale view: warning: skipping a partial line of {sidecar}", file=sys.stderr)
    return rows


def samples_for(res_path: Path | None, task: str) -> dict[int, dict]:
    """lm-eval's logged samples of ``task`` for the run of ``res_path`` (same timestamp), by doc_id."""
    if res_path is None:
        return {}
    stamp = res_path.stem[len("results_"):] if res_path.stem.startswith("results_") else ""
    pat = re.compile(rf"^samples_{re.escape(task)}_\d{{4}}-\d\d-\d\dT.*\.jsonl$")  # not another task's prefix
    cands = sorted(res_path.parent.glob(f"samples_{task}_{stamp}.jsonl")) or sorted(
        f for f in res_path.parent.glob(f"samples_{task}_*.jsonl") if pat.match(f.name))
    out: dict[int, dict] = {}
    if not cands:
        return out
    for line in cands[-1].read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            s = json.loads(line)
        except json.JSONDecodeError:
            continue
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
    """Per token: 0 outside, 1 inside the thinking block, 2 a token that completes a think tag.
    ``starts_open``: the prompt already opened the block (Qwen3 thinking / R1 templates)."""
    flags, inside, text = [], starts_open, ""
    for p in pieces:
        start = len(text)
        text += p
        tag_here = False
        for tag in (THINK_OPEN, THINK_CLOSE):
            i = text.find(tag, max(0, start - len(tag) + 1))
            while i != -1:
                tag_here = tag_here or i + len(tag) > start
                i = text.find(tag, i + 1)
        o, c = text.rfind(THINK_OPEN), text.rfind(THINK_CLOSE)
        if o != -1 or c != -1:
            inside = o > c
        flags.append(2 if tag_here else (1 if inside else 0))
    return flags


def _prompt_opens_think(prompt: str | None) -> bool:
    if not prompt:
        return False
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


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
    starts_open = _prompt_opens_think(prompt) or (THINK_CLOSE in full and full.find(THINK_OPEN) == -1) \
        or (THINK_CLOSE in full and full.find(THINK_CLOSE) < full.find(THINK_OPEN))
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
    from .report import parse_model_args

    return parse_model_args(((res or {}).get("config") or {}).get("model_args")).get("pretrained")


def _settings(tt: dict) -> str:
    if not tt:
        return ""
    try:
        from .report import telltale_knobs

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
    return (_TEMPLATE.replace("{{TITLE}}", html.escape(title))
            .replace("{{DATA}}", _json_for_script(data)))


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="telltale view", description="Self-contained HTML page per generated answer: "
                                 "tokens shaded by the norm, τ crossings, think block, interventions.")
    ap.add_argument("run", metavar="RUN_DIR", help="lm-eval --output_path directory, results JSON or sidecar JSONL")
    ap.add_argument("--doc", type=int, default=None, help="doc_id (default: every sample, or the first for a .html --out)")
    ap.add_argument("--task", default=None, help="task name (when several tasks have the doc)")
    ap.add_argument("--repeat", type=int, default=None, help="repeat index (tasks with repeats)")
    ap.add_argument("--layer", type=int, default=None, help="initial layer (default: the deepest recorded)")
    ap.add_argument("--model", default=None, help="tokenizer to decode tokens (default: the run's pretrained)")
    ap.add_argument("--out", required=True, help="page.html, or a directory: one page per sample + index.html")
    a = ap.parse_args(argv)
    from .report import NoResultsError

    try:
        sidecar, res, res_path = locate(a.run)
    except NoResultsError as e:
        print(f"telltale view: error: {e}", file=sys.stderr)
        return 2
    rows = read_rows(sidecar)
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
    from .report import parse_model_args

    margs = parse_model_args(((res or {}).get("config") or {}).get("model_args"))
    tok = load_tokenizer(a.model or margs.get("tokenizer") or margs.get("pretrained"))
    out = Path(a.out)
    cache: dict[str, dict] = {}

    def page(r: dict) -> str:
        t = r.get("task")
        if t not in cache:
            cache[t] = samples_for(res_path, t)
        return render_page(sample_data(r, res, tok, cache[t].get(r.get("doc_id"))), a.layer)

    try:
        if out.suffix.lower() in (".html", ".htm"):
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
            name = _slug(f"{r.get('task')}_doc{r.get('doc_id')}_r{r.get('repeat', 0)}") + ".html"
            (out / name).write_text(page(r), encoding="utf-8")
            links.append((name, r))
        items = "\n".join(f'<li><a href="{html.escape(n)}">{html.escape(str(r.get("task")))} doc {r.get("doc_id")} '
                          f'repeat {r.get("repeat", 0)}</a> — {r.get("n_generated_tokens")} tokens, '
                          f'{html.escape(str(r.get("finish_reason")))}</li>' for n, r in links)
        (out / "index.html").write_text(f"<!doctype html><meta charset='utf-8'><title>telltale view</title>"
                                        f"<h1>{html.escape(str(sidecar.name))}</h1><ul>{items}</ul>\n", encoding="utf-8")
        print(f"telltale view: wrote {len(links)} pages and {out / 'index.html'}", file=sys.stderr)
    except ValueError as e:
        print(f"telltale view: error: {e}", file=sys.stderr)
        return 2
    return 0


_TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:12px 18px;background:#fff;border-bottom:1px solid #ddd}
h1{font-size:17px;margin:0 0 4px}
.meta{color:#555;font-size:12.5px}
.meta b{color:#222}
main{display:grid;grid-template-columns:minmax(0,1fr) 360px;gap:16px;padding:14px 18px}
#text{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px 14px;font:13px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
.tok{border-radius:2px;padding:1px 0;cursor:pointer;position:relative}
.tok.warm{text-decoration:underline dotted #aaa}
.tok.nofwd{outline:1px dashed #ccc}
.tok.sel{outline:2px solid #000}
.think{background-image:linear-gradient(#fff0,#fff0);box-shadow:inset 0 -2px 0 #9467bd}
.tag{color:#6a3d9a;font-weight:bold}
.thinkblock{border:1.5px dashed #9467bd;border-radius:6px;padding:2px 4px;margin:2px 0;display:inline}
.mk{font-size:9px;vertical-align:super;font-weight:bold;margin-left:1px}
.mk.o{opacity:.45;font-weight:normal}
.up{color:#c00;font-size:9px;vertical-align:super}.down{color:#06c;font-size:9px;vertical-align:sub}
.R{color:#d62728}.r{color:#ff7f0e}.I{color:#2ca02c}.S{color:#1f77b4}.b{color:#8c564b}
aside .box{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;margin-bottom:12px}
aside h2{font-size:13px;margin:0 0 6px}
.legend span{display:inline-block;margin-right:10px;font-size:12px}
.sw{display:inline-block;width:12px;height:12px;border-radius:2px;vertical-align:middle;margin-right:3px}
details{margin-top:6px}
pre{white-space:pre-wrap;word-break:break-word;font-size:12px;background:#f4f4f4;padding:6px;border-radius:4px;max-height:260px;overflow:auto}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 5px;text-align:right}
#tt-errors{color:#b00;font-weight:bold}
#tip{font-size:12px;color:#333;min-height:3.2em}
svg text{font:10px system-ui,sans-serif;fill:#444}
</style></head>
<body>
<div id="tt-errors"></div>
<header><h1 id="title"></h1><div class="meta" id="meta"></div>
<div class="meta">layer <select id="layer"></select> · <span class="legend" id="legend"></span></div></header>
<main><section><div id="text"></div>
<details id="pd"><summary>prompt</summary><pre id="prompt"></pre></details>
<div id="cands"></div></section>
<aside><div class="box"><h2>token</h2><div id="tip">click or hover a token</div></div>
<div class="box"><h2>norm per layer</h2><svg id="layerchart" width="336" height="190"></svg></div>
<div class="box"><h2 id="tracetitle">trace</h2><svg id="trace" width="336" height="170"></svg></div></aside></main>
<script type="application/json" id="tt-data">{{DATA}}</script>
<script>
"use strict";
(function(){
var errs=[];
function report(msg){errs.push(msg);var e=document.getElementById("tt-errors");if(e){e.textContent="script error: "+errs.join(" | ");}document.body.setAttribute("data-errors",String(errs.length));}
window.addEventListener("error",function(ev){report(String(ev.message||ev));});
try{
var D=JSON.parse(document.getElementById("tt-data").textContent);
var L=D.layers, E=D.events, cur=L.indexOf(D.layer), selTok=-1;
var NS="http://www.w3.org/2000/svg";
function el(tag,attrs,txt){var e=document.createElement(tag);for(var k in (attrs||{}))e.setAttribute(k,attrs[k]);if(txt!==undefined)e.textContent=txt;return e;}
function sv(tag,attrs){var e=document.createElementNS(NS,tag);for(var k in attrs)e.setAttribute(k,attrs[k]);return e;}
function fmt(x){return x===null||x===undefined?"–":(+x).toFixed(3);}
function vis(s){return s.replace(/[\u0000-\u0008\u000b-\u001f\u007f]/g,function(c){var n=c.charCodeAt(0);return String.fromCharCode(n===127?0x2421:0x2400+n);});}
function quant(a,q){if(!a.length)return NaN;var b=a.slice().sort(function(x,y){return x-y;});var i=(b.length-1)*q,lo=Math.floor(i),hi=Math.ceil(i);return b[lo]+(b[hi]-b[lo])*(i-lo);}
document.getElementById("title").textContent=D.task+" · doc "+D.doc_id+(D.repeat?" · repeat "+D.repeat:"")+" · "+(D.model_type||D.method||"");
var meta=[["model",D.model],["method",D.method+(D.settings?" ("+D.settings+")":"")],["finish",D.finish_reason],
 ["generated tokens",D.n_generated_tokens],["prompt tokens",D.n_prompt_tokens],["target",D.target],
 ["extracted",D.filtered?JSON.stringify(D.filtered):null],["verdict",D.verdict?JSON.stringify(D.verdict):null]];
var m=document.getElementById("meta");
meta.forEach(function(kv){if(kv[1]===null||kv[1]===undefined||kv[1]==="")return;m.appendChild(el("span",{},kv[0]+": "));m.appendChild(el("b",{},String(kv[1])));m.appendChild(document.createTextNode("   "));});
if(D.prompt){document.getElementById("prompt").textContent=vis(D.prompt);}else{document.getElementById("pd").style.display="none";}
var sel=document.getElementById("layer");
L.forEach(function(l,j){var o=el("option",{value:String(j)},"L"+l);if(j===cur)o.selected=true;sel.appendChild(o);});
sel.addEventListener("change",function(){cur=+sel.value;draw();});
var MK=[["accepted","R","accepted recursion"],["recursed","r","recursion rejected"],["injected","I","injection"],["suppressed","S","suppression"]];
function marks(k){var out=[];if(k<0)return out;MK.forEach(function(mk){var bit=E[mk[0]];if(!bit)return;
 if(mk[0]==="recursed"&&(E.accepted)){ /* candidate without acceptance only */ }
 for(var j=0;j<L.length;j++){var ev=D.event[k][j];if(ev&bit){if(mk[0]==="recursed"&&(ev&E.accepted))continue;out.push([mk[1],j===cur,mk[2]+" @L"+L[j]]);}}});return out;}
function colorFor(k,j,scale){if(k<0)return null;var n=D.norm[k][j],t=D.tau[k][j];if(t===null)return null;
 var d=Math.max(-1,Math.min(1,(n-t)/scale));if(d>0)return "rgba(220,30,30,"+(0.18+0.62*d).toFixed(3)+")";return "rgba(40,110,220,"+(0.06+0.32*(-d)).toFixed(3)+")";}
function draw(){
 var j=cur,box=document.getElementById("text");box.textContent="";
 var col=D.norm.map(function(r){return r[j];});
 var scale=Math.max(1e-6,(quant(col,0.9)-quant(col,0.1))/2);
 var up={},down={};(D.cross[String(L[j])].up||[]).forEach(function(k){up[k]=1;});(D.cross[String(L[j])].down||[]).forEach(function(k){down[k]=1;});
 var counts={R:0,r:0,I:0,S:0},here={R:0,r:0,I:0,S:0},nup=0;
 var parent=box,block=null;
 D.tokens.forEach(function(t,i){
  if(t.th>0&&!block){block=el("span",{"class":"thinkblock",title:"thinking block"});box.appendChild(block);parent=block;}
  if(t.th===0&&block){block=null;parent=box;}
  var k=t.k;
  if(up[k]){parent.appendChild(el("span",{"class":"up",title:"τ crossed upward"},"▲"));nup++;}
  if(down[k]){parent.appendChild(el("span",{"class":"down",title:"τ crossed downward"},"▼"));}
  var s=el("span",{"class":"tok"+(t.th===2?" tag":"")+(t.th===1?" think":""),"data-i":String(i)});
  var txt=vis(t.t);s.textContent=txt===""?"\u200b":txt;
  if(k<0){s.classList.add("nofwd");}else{var c=colorFor(k,j,scale);if(c)s.style.backgroundColor=c;else s.classList.add("warm");}
  s.addEventListener("mouseenter",function(){tip(i);});s.addEventListener("click",function(){selTok=i;tip(i);drawLayers();highlight();});
  parent.appendChild(s);
  marks(k).forEach(function(mk){counts[mk[0]]++;if(mk[1])here[mk[0]]++;parent.appendChild(el("span",{"class":"mk "+mk[0]+(mk[1]?"":" o"),title:mk[2]},mk[0]));});
 });
 var lg=document.getElementById("legend");lg.textContent="";
 function sw(c,t){var s=el("span");var b=el("i",{"class":"sw"});b.style.background=c;s.appendChild(b);s.appendChild(document.createTextNode(t));lg.appendChild(s);}
 sw("rgba(220,30,30,.7)","above τ");sw("rgba(40,110,220,.35)","below τ");sw("#fff","no τ yet (warm-up) / not fed back");
 lg.appendChild(el("span",{},"▲▼ τ crossings: "+nup+" up"));
 MK.forEach(function(mk){lg.appendChild(el("span",{"class":mk[1]},mk[1]+" "+mk[2]+": "+here[mk[1]]+" here / "+counts[mk[1]]+" all layers"));});
 lg.appendChild(el("span",{"class":"tag"},"⟨think⟩ block framed"));
 drawLayers();drawTrace();highlight();
}
function highlight(){var p=document.querySelectorAll(".tok.sel");for(var a=0;a<p.length;a++)p[a].classList.remove("sel");if(selTok>=0){var q=document.querySelector('.tok[data-i="'+selTok+'"]');if(q)q.classList.add("sel");}}
function tip(i){var t=D.tokens[i],k=t.k,box=document.getElementById("tip");box.textContent="";
 var head="token "+i+" · id "+t.id+" · "+JSON.stringify(t.t)+(t.th===1?" · in thinking block":"")+(t.th===2?" · think tag":"");
 box.appendChild(el("div",{},head));
 if(k<0){box.appendChild(el("div",{},"never fed back (last generated token): no norm"));return;}
 var parts=L.map(function(l,j){return "L"+l+": "+fmt(D.norm[k][j])+" / τ "+fmt(D.tau[k][j]);});
 box.appendChild(el("div",{},"‖h‖ / τ — "+parts.join(", ")));
 var ms=marks(k).map(function(x){return x[2];});if(ms.length)box.appendChild(el("div",{},"events: "+ms.join(", ")));}
function axes(svg,W,H,pad,x0,x1,y0,y1,xl){
 svg.appendChild(sv("line",{x1:pad,y1:H-pad,x2:W-6,y2:H-pad,stroke:"#999"}));svg.appendChild(sv("line",{x1:pad,y1:6,x2:pad,y2:H-pad,stroke:"#999"}));
 var t1=sv("text",{x:2,y:12});t1.textContent=y1.toFixed(1);svg.appendChild(t1);var t0=sv("text",{x:2,y:H-pad});t0.textContent=y0.toFixed(1);svg.appendChild(t0);
 var tx=sv("text",{x:W/2-20,y:H-4});tx.textContent=xl;svg.appendChild(tx);}
function drawLayers(){var svg=document.getElementById("layerchart");while(svg.firstChild)svg.removeChild(svg.firstChild);
 var W=+svg.getAttribute("width"),H=+svg.getAttribute("height"),pad=34;
 var mean=[],lo=[],hi=[],tk=[],tt=[],all=[];
 L.forEach(function(l,j){var c=D.norm.map(function(r){return r[j];});mean.push(c.length?c.reduce(function(a,b){return a+b;},0)/c.length:NaN);lo.push(quant(c,0.1));hi.push(quant(c,0.9));});
 var k=selTok>=0?D.tokens[selTok].k:-1;
 L.forEach(function(l,j){tk.push(k>=0?D.norm[k][j]:NaN);tt.push(k>=0?D.tau[k][j]:null);});
 all=lo.concat(hi,tk,tt.filter(function(x){return x!==null;})).filter(function(x){return isFinite(x);});
 if(!all.length)return;var y0=Math.min.apply(null,all),y1=Math.max.apply(null,all);if(y1-y0<1e-9){y1=y0+1;}
 var X=function(j){return pad+(L.length>1?j*(W-pad-12)/(L.length-1):(W-pad)/2);},Y=function(v){return H-pad-(v-y0)/(y1-y0)*(H-pad-10);};
 axes(svg,W,H,pad,0,L.length-1,y0,y1,"layer");
 var band="";L.forEach(function(l,j){band+=(j?"L":"M")+X(j)+","+Y(hi[j]);});for(var j=L.length-1;j>=0;j--)band+="L"+X(j)+","+Y(lo[j]);
 if(L.length>1)svg.appendChild(sv("path",{d:band+"Z",fill:"rgba(100,100,100,.18)"}));
 var p="";L.forEach(function(l,j){p+=(j?"L":"M")+X(j)+","+Y(mean[j]);});svg.appendChild(sv("path",{d:p,fill:"none",stroke:"#555","stroke-width":1.5}));
 L.forEach(function(l,j){var t=sv("text",{x:X(j)-6,y:H-pad+12});t.textContent=String(l);svg.appendChild(t);
  if(j===cur)svg.appendChild(sv("line",{x1:X(j),x2:X(j),y1:8,y2:H-pad,stroke:"#bbb","stroke-dasharray":"3,3"}));
  if(isFinite(tk[j]))svg.appendChild(sv("circle",{cx:X(j),cy:Y(tk[j]),r:3.5,fill:"#d62728"}));
  if(tt[j]!==null&&isFinite(tt[j]))svg.appendChild(sv("line",{x1:X(j)-5,x2:X(j)+5,y1:Y(tt[j]),y2:Y(tt[j]),stroke:"#000","stroke-width":1.5}));});
 var cap=sv("text",{x:pad+4,y:12});cap.textContent=k>=0?"token "+selTok+" (dots), its τ (bars); answer mean, p10–p90":"answer mean, p10–p90 (click a token)";svg.appendChild(cap);}
function drawTrace(){var svg=document.getElementById("trace");while(svg.firstChild)svg.removeChild(svg.firstChild);
 document.getElementById("tracetitle").textContent="trace at layer "+L[cur]+" (τ dashed)";
 var W=+svg.getAttribute("width"),H=+svg.getAttribute("height"),pad=34,j=cur,n=D.norm.length;if(!n)return;
 var v=D.norm.map(function(r){return r[j];}),t=D.tau.map(function(r){return r[j];});
 var all=v.concat(t.filter(function(x){return x!==null;}));var y0=Math.min.apply(null,all),y1=Math.max.apply(null,all);if(y1-y0<1e-9)y1=y0+1;
 var X=function(k){return pad+(n>1?k*(W-pad-8)/(n-1):0);},Y=function(x){return H-pad-(x-y0)/(y1-y0)*(H-pad-10);};
 axes(svg,W,H,pad,0,n-1,y0,y1,"generated token");
 var p="";v.forEach(function(x,k){p+=(k?"L":"M")+X(k).toFixed(1)+","+Y(x).toFixed(1);});svg.appendChild(sv("path",{d:p,fill:"none",stroke:"#d62728","stroke-width":1}));
 var q="",on=false;t.forEach(function(x,k){if(x===null){on=false;return;}q+=(on?"L":"M")+X(k).toFixed(1)+","+Y(x).toFixed(1);on=true;});
 if(q)svg.appendChild(sv("path",{d:q,fill:"none",stroke:"#000","stroke-dasharray":"4,3","stroke-width":1}));
 for(var k=0;k<n;k++){var ev=D.event[k][j];var c=(ev&E.accepted)?"#d62728":(ev&E.injected)?"#2ca02c":(ev&E.suppressed)?"#1f77b4":null;
  if(c)svg.appendChild(sv("circle",{cx:X(k),cy:Y(v[k]),r:2.5,fill:c}));}}
if(D.candidates){var cd=document.getElementById("cands");cd.appendChild(el("h3",{},"LRS candidates (this page shows the returned one)"));
 var tb=el("table");var names=Object.keys(D.candidates[0].scores||{});var hr=el("tr");["#","tokens","finish","answer","correct"].concat(names,["picked by"]).forEach(function(h){hr.appendChild(el("th",{},h));});tb.appendChild(hr);
 D.candidates.forEach(function(c){var r=el("tr");[c.i+(c.returned?" ✓":""),c.n_tokens,c.finish_reason,c.answer,c.correct].concat(names.map(function(nm){return c.scores[nm];}),[c.picked_by.join(" ")]).forEach(function(x){r.appendChild(el("td",{},x===null||x===undefined?"–":String(x)));});tb.appendChild(r);});cd.appendChild(tb);}
draw();
document.body.setAttribute("data-rendered","ok");
}catch(e){report(String(e&&e.stack||e));}
})();
</script>
</body></html>
"""
