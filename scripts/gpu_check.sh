#!/usr/bin/env bash
# GPU check, for a maintainer with a CUDA machine:
#
#   bash scripts/gpu_check.sh [--dry-run] [MODEL]      (MODEL: default the shipped tiny model)
#
# 1. `make setup` (installs vLLM for CUDA when a GPU is present);
# 2. stock `vllm` and every telltale model type through `lm_eval` on a small local task, with
#    vLLM's default compilation (torch.compile + CUDA graphs: no enforce_eager); prints the
#    compilation and CUDA-graph mode vLLM reports in each run's log;
# 3. checks: no run raised the hook check, every telltale run's sidecar has rows with counts > 0
#    (the hooks fired), and vllm-norms' responses equal stock vllm's; vllm-norms, vllm-alrr,
#    vllm-suppress and vllm-erss run a second time with FULL CUDA graphs (their in-graph step,
#    vllm/graph.py, allows them; with it they keep vLLM's async scheduling; ALRR's re-run then
#    leaves its KV write out of the captured graph), and each pair's statistics and responses must
#    be equal; vllm-lrs runs a second time with async scheduling off (it keeps vLLM's default: a
#    stopped candidate's extra forward is taken back at collection), and its candidates, their
#    confidence and statistics must be equal;
# 4. `telltale bench` at batch sizes 1 and 64 (one repeat: a check, not the benchmark).
#
# Prepared, not run: no GPU with vLLM was available when it was written. --dry-run prints every
# command, checks that each tool exists and parses the composed arguments (lm_eval's own parser
# and our model_args validation; `telltale bench --plan`), and starts no model;
# tests/tools/test_gpu_check.py runs it on CPU so that it does not rot.
#
# Environment: WORK (default .cache/gpu_check), DTYPE (default float32, so that the equality check
# is not at the mercy of bf16 kernel noise), LAYERS (default auto), LIMIT (documents, default 12),
# BENCH_ARGS (more `telltale bench` flags). Stock vLLM runs with the V1 model runner and async
# scheduling off, like the op-calling telltale types, so that "norms equals stock" tests the hooks
# alone (greedy answers do not depend on the scheduling).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
MODEL=${1:-lm_eval_telltale/arith/telltale-arith-tiny}
WORK=${WORK:-.cache/gpu_check}
DTYPE=${DTYPE:-float32}
LAYERS=${LAYERS:-auto}
LIMIT=${LIMIT:-12}
BIN=.venv/bin
export VLLM_USE_V2_MODEL_RUNNER=0

say() { printf '\n== %s\n' "$*"; }
# a command as one shell line (single quotes only where needed; shlex-compatible)
q() { if [[ $1 =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi; }
show() { local s='+' a; for a in "$@"; do s+=" $(q "$a")"; done; printf '%s\n' "$s"; }
run() { show "$@"; if (( ! DRY )); then "$@"; fi; }
fail() { echo "gpu_check: $*" >&2; exit 1; }

say "set-up"
if (( DRY )); then show make setup; make -n setup >/dev/null || fail "make has no setup target"; else run make setup; fi
for tool in "$BIN/python" "$BIN/lm_eval" "$BIN/telltale"; do
  [[ -x $tool ]] || fail "$tool not found (make setup creates it)"
done
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
elif (( DRY )); then
  echo "(nvidia-smi not found: fine for --dry-run; the check itself needs a CUDA machine)"
else
  fail "nvidia-smi not found: run this on a CUDA machine"
fi
run "$BIN/python" -c 'import torch, vllm; print("vllm", vllm.__version__, "torch", torch.__version__)
assert torch.cuda.is_available(), "torch sees no CUDA device (is the CUDA build of vLLM installed?)"'

say "lm_eval runs: stock vllm and every telltale model type (compiled, CUDA graphs on)"
TASKS=$WORK/task
run "$BIN/python" -c 'import sys; from lm_eval_telltale.tasksupport.localtask import write_local_task as w
w(sys.argv[1], max_gen_toks=64)' "$TASKS"
BASE="pretrained=$MODEL,dtype=$DTYPE,max_model_len=512,gpu_memory_utilization=0.3,seed=0"
KNOBS="layers=$LAYERS,warmup=8"
declare -A EXTRA=(
  [vllm]="async_scheduling=False"
  [vllm-norms]="$KNOBS"
  [vllm-alrr]="$KNOBS,growth_eps=0"
  [vllm-erss]="$KNOBS,low_k=4,cooldown=8,bank_k=8"
  [vllm-lrs]="$KNOBS"
  [vllm-lrs-sync]="$KNOBS,async_scheduling=False"
  [vllm-suppress]="$KNOBS"
)
# the in-graph types again with FULL CUDA graphs: their model_args as JSON (lm-eval takes model_args
# with a brace only as one JSON object, whole)
FULL=(vllm-norms vllm-alrr vllm-suppress vllm-erss)
for t in "${FULL[@]}"; do
  j="{\"pretrained\": \"$MODEL\", \"dtype\": \"$DTYPE\", \"max_model_len\": 512, \"gpu_memory_utilization\": 0.3, \"seed\": 0"
  for kv in ${EXTRA[$t]//,/ }; do
    v=${kv#*=}
    [[ $v =~ ^-?[0-9]+(\.[0-9]+)?$ ]] || v="\"$v\""
    j+=", \"${kv%%=*}\": $v"
  done
  EXTRA[$t-full]="$j, \"compilation_config\": {\"cudagraph_mode\": \"FULL_AND_PIECEWISE\"}}"
done
LINES=$(mktemp)
trap 'rm -f "$LINES"' EXIT
(( DRY )) || mkdir -p "$WORK/logs"
for t in vllm vllm-norms vllm-norms-full vllm-alrr vllm-alrr-full vllm-erss vllm-erss-full vllm-lrs vllm-lrs-sync \
         vllm-suppress vllm-suppress-full; do
  margs="$BASE,${EXTRA[$t]}"
  [[ ${EXTRA[$t]} == \{* ]] && margs=${EXTRA[$t]}
  model=${t%-full}
  cmd=("$BIN/lm_eval" --model "${model%-sync}" --model_args "$margs" --tasks telltale_local --include_path "$TASKS"
       --batch_size auto --limit "$LIMIT" --output_path "$WORK/runs/$t" --log_samples)
  [[ $t == vllm-lrs* ]] && cmd+=(--gen_kwargs "temperature=0.7,top_p=0.8,top_k=20,do_sample=True")
  show "${cmd[@]}"
  if (( DRY )); then show "${cmd[@]:1}" | cut -c3- >> "$LINES"; continue; fi
  rm -rf "$WORK/runs/$t"
  log=$WORK/logs/$t.log
  "${cmd[@]}" > "$log" 2>&1 || { tail -n 40 "$log" >&2; fail "$t failed (log: $log)"; }
  ! grep -q "hooks did not fire" "$log" || fail "$t: the hook check fired (log: $log)"
  grep -oE "'(mode|cudagraph_mode)': <[^>]*>|'splitting_ops': \[[^]]*\]" "$log" | sort -u | sed "s/^/   $t: /" \
    || echo "   $t: (no compilation settings found in $log)"
done

CHECK_PY='
import json, sys
from pathlib import Path
from lm_eval_telltale.sidecar import read_sidecar

runs, bad = Path(sys.argv[1]), []
for t in ("vllm-norms", "vllm-alrr", "vllm-erss", "vllm-lrs", "vllm-suppress"):
    files = sorted((runs / t).rglob("telltale_*.jsonl"))
    rows = read_sidecar(files[-1]) if files else []
    fired = sum(any(int(st.get("count", 0)) > 0 for st in (r.get("layers") or {}).values()) for r in rows)
    events = {}
    for r in rows:
        for st in (r.get("layers") or {}).values():
            for k in ("suppressed", "recursed", "accepted", "injected", "banked"):
                events[k] = events.get(k, 0) + int(st.get(k, 0))
    print(f"   {t}: {len(rows)} sidecar rows, {fired} with counts > 0; events {events}")
    if not fired:
        bad.append(f"{t}: no sidecar row with counts > 0 (the hooks did not fire?)")

def responses(t):
    f = sorted((runs / t).rglob("samples_telltale_local_*.jsonl"))
    recs = [json.loads(l) for l in f[-1].read_text().splitlines() if l.strip()] if f else []
    return {r["doc_id"]: r["resps"] for r in recs}

stock, norms = responses("vllm"), responses("vllm-norms")
diff = sorted(d for d in set(stock) | set(norms) if stock.get(d) != norms.get(d))
print(f"   vllm-norms vs vllm: {len(stock)} documents, {len(diff)} with different responses {diff[:10]}")
if not stock or diff:
    bad.append("vllm-norms does not equal stock vllm")

def stats(t):
    files = sorted((runs / t).rglob("telltale_*.jsonl"))
    rows = read_sidecar(files[-1]) if files else []
    return sorted(json.dumps([r.get("doc_id"), r.get("layers")], sort_keys=True) for r in rows)

for t in ("vllm-norms", "vllm-alrr", "vllm-suppress", "vllm-erss"):
    same = stats(t) == stats(t + "-full") != [] and responses(t) == responses(t + "-full")
    print(f"   {t} with FULL CUDA graphs: statistics and responses {'equal' if same else 'DIFFERENT'} to piecewise")
    if not same:
        bad.append(f"{t} with FULL CUDA graphs does not equal {t}")
def lrs_rows(t):
    files = sorted((runs / t).rglob("telltale_*.jsonl"))
    rows = read_sidecar(files[-1]) if files else []
    keys = ("text", "conf", "conf_mean", "conf_tokens", "layers")
    return sorted(json.dumps([r.get("doc_id"), [[c.get(k) for k in keys] for c in r.get("candidates") or []]],
                             sort_keys=True) for r in rows)

same = lrs_rows("vllm-lrs") == lrs_rows("vllm-lrs-sync") != []
print(f"   vllm-lrs with async scheduling: candidates, confidence and statistics {'equal' if same else 'DIFFERENT'} "
      "to async scheduling off")
if not same:
    bad.append("vllm-lrs under async scheduling does not equal vllm-lrs without it")
if bad:
    sys.exit("gpu_check: FAILED\n  " + "\n  ".join(bad))
print("gpu_check: the hooks fired in every telltale run; vllm-norms equals stock vllm")
'
PARSE_PY='
import shlex, sys
from unittest import mock
from lm_eval._cli import HarnessCLI
from lm_eval.api.registry import model_registry
from lm_eval_telltale._lmeval_hook import register_models
from lm_eval_telltale.config import all_keys, resolve
from lm_eval_telltale.vllm import inspect_model

register_models()
_, n_layers = inspect_model(sys.argv[2])
for line in open(sys.argv[1]):
    argv = shlex.split(line)
    with mock.patch.object(sys, "argv", ["lm_eval", *argv]):
        ns = HarnessCLI().parse_args()
    assert ns.model in model_registry.keys(), f"lm_eval does not know --model {ns.model}"
    margs = ns.model_args or {}
    if ns.model.startswith("vllm-"):
        m = ns.model[len("vllm-"):]
        resolve(m, {k: v for k, v in margs.items() if k in all_keys(m)}, n_layers)
    print(f"   parsed: lm_eval --model {ns.model} --model_args {margs}")
'

say "checks"
if (( DRY )); then
  show "$BIN/python" -c '<the check>' "$WORK/runs"
  "$BIN/python" -c 'import ast, sys; ast.parse(sys.argv[1]); ast.parse(sys.argv[2])' "$CHECK_PY" "$PARSE_PY"
  "$BIN/python" -c "$PARSE_PY" "$LINES" "$MODEL"
else
  "$BIN/python" -c "$CHECK_PY" "$WORK/runs"
fi

say "telltale bench at batch sizes 1 and 64"
# shellcheck disable=SC2206  # BENCH_ARGS: extra flags, split on purpose
bench=("$BIN/telltale" bench --model "$MODEL" --batch-sizes 1,64 --repeats 1 --dtype "$DTYPE" --layers "$LAYERS"
       --out "$WORK/bench" --work "$WORK/bench-cells" ${BENCH_ARGS:-})
if (( DRY )); then show "${bench[@]}"; "${bench[@]}" --plan >/dev/null || fail "telltale bench rejected its arguments"
else run "${bench[@]}"; fi
say "done$( (( DRY )) && echo ' (dry run: every command above parses; nothing was run)')"
