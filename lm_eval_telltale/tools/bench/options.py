"""``telltale bench``'s command line: its flags, its defaults and every check that needs no engine
(:func:`check` returns a :class:`Checked`, or exits 2 naming the flag)."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
STOCK = "vllm"
SAMPLED_STOCK = "vllm-sampled"  # stock vLLM with LRS's request shape (B prompts × N sampled candidates)
BENCH_METHODS = ("vllm", "norms", "suppress", "alrr", "erss", "lrs")
DEFAULTS = {"methods": ",".join(BENCH_METHODS), "batch_sizes": "1,8,32,64", "max_tokens": 256, "repeats": 3,
            "prompt_len": 64}
#: --quick: a smoke run (tests; checking a command line before the real run)
QUICK = {"batch_sizes": "2", "max_tokens": 16, "repeats": 1, "prompt_len": 16}
#: knobs that make every method act on a random model (docs above); --knobs overrides per key
DEFAULT_KNOBS: dict[str, dict[str, Any]] = {
    "common": {"warmup": 8},
    "alrr": {"growth_eps": 0.0},
    "erss": {"low_k": 4, "cooldown": 8, "bank_k": 8},
    "lrs": {"n_candidates": 4},
}
#: LRS's candidates and their stock comparator: the reference demo's sampling (telltale-arith preset)
LRS_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
WARMUP_TOKENS = 16
#: --tiny-mid: a mid-size random model (Qwen3 layout, head_dim 64, GQA 4:1)
TINY_MID = {"num_layers": 16, "hidden": 1024, "heads": 16, "kv_heads": 4, "intermediate": 3072}
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
#: intervention events shown per method (per 1k generated tokens)
SHOWN_EVENTS = {"norms": ("above_tau",), "lrs": ("above_tau",), "suppress": ("suppressed", "above_tau"),
                "alrr": ("recursed", "accepted"), "erss": ("injected", "banked")}



@dataclass(frozen=True)
class Checked:
    """What the checks found: the parsed flags' values and what was read from the model."""

    methods: list[str]  # as asked
    cell_methods: list[str]  # with the stock baselines the ratios need
    added: list[str]  # the baselines added
    batches: list[int]
    knobs: dict[str, Any]
    engine_args: dict[str, Any]
    method_args: dict[str, dict]  # per telltale method that gets cells: its model_args
    cfgs: dict[str, Any]  # per telltale method: its resolved TelltaleConfig
    arch: str
    num_layers: int
    n_candidates: int
    config: dict | None  # the model's config.json
    name: str  # the report's name
    max_len: int  # prompt + generated tokens

def label(method: str, engine: str = "vllm") -> str:
    """The model type a cell measures (``engine``: ``vllm`` or ``hf``, ``--engine``)."""
    return {STOCK: engine, SAMPLED_STOCK: f"{engine} (sampled, LRS's requests)"}.get(method, f"{engine}-{method}")


def stock_name(engine: str) -> str:
    return "transformers' generate" if engine == "hf" else "vLLM"


def baseline_of(method: str) -> str | None:
    """The stock cell a method's ratio is taken against (None for the stock cells themselves)."""
    if method in (STOCK, SAMPLED_STOCK):
        return None
    return SAMPLED_STOCK if method == "lrs" else STOCK




# -- argument checks (no engine) -----------------------------------------------------------------

def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ValueError(f"no method names in {text!r}")
    bad = [m for m in names if m not in BENCH_METHODS]
    if bad:
        hint = " (model types are named without 'vllm-')" if any(m.startswith("vllm-") for m in bad) else ""
        raise ValueError(f"unknown method(s) {', '.join(map(repr, bad))}; one of {','.join(BENCH_METHODS)}{hint}")
    dup = sorted({m for m in names if names.count(m) > 1})
    if dup:
        raise ValueError(f"{', '.join(dup)} given twice")
    return names


def parse_batches(text: str) -> list[int]:
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        if not tok:
            continue
        if not re.fullmatch(r"\d+", tok) or int(tok) < 1:
            raise ValueError(f"{tok!r} is not a positive integer (e.g. --batch-sizes 1,8,32,64)")
        out.append(int(tok))
    if not out:
        raise ValueError(f"no batch sizes in {text!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"a batch size is given twice in {text!r}")
    return sorted(out)


def cell_methods(methods: list[str]) -> tuple[list[str], list[str]]:
    """The methods that get cells (stock baselines added where a ratio needs them, vllm-sampled
    right after lrs) and the names added."""
    out, added = list(methods), []
    if STOCK not in out and any(m not in (STOCK, "lrs") for m in out):
        out.insert(0, STOCK)
        added.append(STOCK)
    if "lrs" in out:
        out.insert(out.index("lrs") + 1, SAMPLED_STOCK)
        added.append(SAMPLED_STOCK)
    return out, added


def json_object(text: str | None, flag: str) -> dict:
    if text is None:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: malformed JSON {text!r}: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{flag}: expected a JSON object {{...}}, got {text!r}")
    return obj


def method_args(knobs: dict, layers: str) -> dict[str, dict]:
    """The telltale settings of every method: defaults, then ``--knobs`` (``common`` first, then
    the method's own block), then ``--layers``."""
    for k, v in knobs.items():
        if k != "common" and k not in BENCH_METHODS[1:]:
            raise ValueError(f"--knobs: unknown block {k!r}; use 'common' or one of {', '.join(BENCH_METHODS[1:])}")
        if not isinstance(v, dict):
            raise ValueError(f"--knobs: block {k!r} must be a JSON object of knobs, got {v!r}")
    if "layers" in knobs.get("common", {}) or any("layers" in b for b in knobs.values()):
        raise ValueError("--knobs: give the layers with --layers")
    out = {}
    for m in BENCH_METHODS[1:]:
        out[m] = {"layers": layers, **DEFAULT_KNOBS["common"], **DEFAULT_KNOBS.get(m, {}),
                  **knobs.get("common", {}), **knobs.get(m, {})}
    return out


def kv_bytes_per_token(config: dict) -> int:
    """KV-cache bytes per token (float32 upper bound) from a model's config.json."""
    c = config.get("text_config") or config
    layers = int(c.get("num_hidden_layers") or 0)
    heads = int(c.get("num_attention_heads") or 1)
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or (int(c.get("hidden_size") or 0) // max(1, heads)))
    return 2 * layers * kv * head_dim * 4


def model_dtype(config: dict | None) -> str:
    """The dtype in the model's config.json ("auto" when it has none). vLLM's own "auto" is not
    the model's dtype everywhere: the CPU engine downcasts float32 checkpoints to bfloat16."""
    c = config or {}
    d = c.get("torch_dtype") or c.get("dtype") or (c.get("text_config") or {}).get("torch_dtype")
    return str(d).replace("torch.", "") if isinstance(d, str) and d else "auto"


def model_label(model: str) -> str:
    p = Path(model).expanduser()
    name = p.name if p.exists() else model.replace("/", "_")
    return re.sub(r"[^\w.+-]+", "_", name) or "model"



def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="telltale bench", description=_summary(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Details: the docstring of lm_eval_telltale/tools/bench/__init__.py.")
    ap.add_argument("--model", help="model directory or Hugging Face id")
    ap.add_argument("--tiny-mid", metavar="DIR", help="build (or reuse) a mid-size random model in DIR (Qwen3 layout, "
                    f"{TINY_MID['num_layers']} layers, hidden {TINY_MID['hidden']}, {TINY_MID['heads']} heads, "
                    f"{TINY_MID['kv_heads']} KV heads, intermediate {TINY_MID['intermediate']}) and benchmark it")
    ap.add_argument("--model-name", help="label of the report and its file names (default: the model directory's name)")
    ap.add_argument("--methods", help=f"comma-separated, of {','.join(BENCH_METHODS)} (default: all); the stock "
                                      "baselines the ratios need are added")
    ap.add_argument("--batch-sizes", help=f"comma-separated (default {DEFAULTS['batch_sizes']})")
    ap.add_argument("--max-tokens", type=int, help=f"generated tokens per request (default {DEFAULTS['max_tokens']})")
    ap.add_argument("--prompt-len", type=int, help=f"prompt tokens per request (default {DEFAULTS['prompt_len']})")
    ap.add_argument("--repeats", type=int, help=f"cells per (method, batch) (default {DEFAULTS['repeats']})")
    ap.add_argument("--engine", default="vllm", choices=["vllm", "hf"],
                    help="vllm (default): the vllm-* types vs stock vLLM; hf: the hf-* types on transformers vs "
                         "transformers' generate (--engine-args: device and from_pretrained arguments)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager=True for every method (no compilation)")
    ap.add_argument("--dtype", default=None, choices=DTYPES, help="model dtype (default: the one in the model's config.json; "
                    "vLLM's 'auto' downcasts float32 to bfloat16 on the CPU engine)")
    ap.add_argument("--layers", default="auto", help="telltale patched layers (default auto)")
    ap.add_argument("--knobs", help="JSON: per-method knobs over the defaults, e.g. "
                                    "'{\"alrr\": {\"growth_eps\": 0.2}, \"common\": {\"warmup\": 64}}'")
    ap.add_argument("--engine-args", help="JSON: more LLM(...) arguments, the same for every method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="CPU threads per engine: OMP_NUM_THREADS, and VLLM_CPU_OMP_THREADS_BIND="
                                                "nobind unless set (vLLM's CPU default binds one thread to every core, "
                                                "which collapses when other processes share the cores)")
    ap.add_argument("--inprocess", action="store_true", help="run the engine core inside the cell's process "
                    "(VLLM_ENABLE_V1_MULTIPROCESSING=0: faster start-up; default: vLLM's multiprocess engine)")
    ap.add_argument("--alternate", action="store_true", help="keep one engine per method alive at each batch size "
                    "and alternate their timed runs: each of --repeats rounds times every method once, the order "
                    "rotated (drift between runs cancels; every method's engine is in memory at once)")
    ap.add_argument("--cell-timeout", type=float, default=1800.0, help="seconds per cell (default 1800; with "
                    "--alternate per engine start and per timed run)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"), help="report directory (default results/bench)")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench"), help="cell specs, results and logs")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 2, 16 tokens, 16-token prompts, 1 repeat, "
                                                         "in-process engine, 1 thread (explicit flags still win)")
    ap.add_argument("--plan", action="store_true", help="check every argument, print the cells, start no engine")
    return ap


def check(ap: argparse.ArgumentParser, a: argparse.Namespace) -> Checked:
    """Every check that needs no engine (``ap.error``: exit 2 naming the flag)."""
    for k, v in DEFAULTS.items():
        if getattr(a, k) is None:
            setattr(a, k, QUICK.get(k, v) if a.quick else v)
    if a.quick:
        a.inprocess = True
        if a.threads is None:  # vLLM's default binding spins every core: a disaster on a shared machine
            a.threads = 1
    if a.engine == "hf":  # the stock cell is transformers' generate, named "hf" there
        a.methods = ",".join("vllm" if m.strip() == "hf" else m for m in a.methods.split(","))
    try:
        methods = parse_methods(a.methods)
    except ValueError as e:
        ap.error(f"--methods: {e}")
    try:
        batches = parse_batches(a.batch_sizes)
    except ValueError as e:
        ap.error(f"--batch-sizes: {e}")
    for flag, v, lo in (("--max-tokens", a.max_tokens, 1), ("--prompt-len", a.prompt_len, 1),
                        ("--repeats", a.repeats, 1), ("--threads", a.threads, 1)):
        if v is not None and v < lo:
            ap.error(f"{flag} must be >= {lo}, got {v}")
    if not a.cell_timeout > 0:
        ap.error(f"--cell-timeout must be > 0, got {a.cell_timeout}")
    if a.engine == "hf" and a.eager:
        ap.error("--eager is a vLLM setting; --engine hf runs transformers eagerly")
    if a.engine == "hf" and a.alternate:
        ap.error("--alternate drives vLLM engines; --engine hf times one generate call per cell")
    try:
        knobs = json_object(a.knobs, "--knobs")
        engine_args = json_object(a.engine_args, "--engine-args")
        margs = method_args(knobs, a.layers)
    except ValueError as e:
        ap.error(str(e))
    if "model" in engine_args:
        ap.error("--engine-args: give the model with --model")
    if a.engine == "vllm":  # --engine hf: device and any from_pretrained argument
        from ..checks import unknown_engine_args

        why = unknown_engine_args(engine_args)
        if why:
            ap.error(f"--engine-args: {why}")
    if (a.model is None) == (a.tiny_mid is None):
        ap.error("give exactly one of --model PATH and --tiny-mid DIR")
    out = Path(a.out).expanduser()
    if out.exists() and not out.is_dir():
        ap.error(f"--out {a.out}: exists and is not a directory")
    build_mid = False
    if a.tiny_mid is not None:
        d = Path(a.tiny_mid).expanduser()
        if d.exists() and not d.is_dir():
            ap.error(f"--tiny-mid {a.tiny_mid}: exists and is not a directory")
        a.model = str(d)
        if a.model_name is None:
            a.model_name = f"tiny-mid-{TINY_MID['num_layers']}L-{TINY_MID['hidden']}h"
        build_mid = not (d / "config.json").is_file()  # built after every other check passed
    from ...config import ConfigError, resolve
    from ...vllm import UnsupportedModelError, inspect_model

    if build_mid:  # the config the build will write, as far as the checks need it
        arch, n_layers = "Qwen3ForCausalLM", TINY_MID["num_layers"]
        config = {"num_hidden_layers": n_layers, "hidden_size": TINY_MID["hidden"], "head_dim": 64,
                  "num_attention_heads": TINY_MID["heads"], "num_key_value_heads": TINY_MID["kv_heads"],
                  "dtype": "float32", "max_position_embeddings": 4096}
    else:
        try:
            arch, n_layers = inspect_model(a.model)
        except UnsupportedModelError as e:
            ap.error(f"--model: {e}")
        f = Path(a.model).expanduser() / "config.json"
        if f.is_file():
            config = json.loads(f.read_text())
        else:  # a Hugging Face id (inspect_model read it already: from the cache, or the Hub)
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(a.model).to_dict()
    cells_m, added = cell_methods(methods)
    cfgs = {}
    for m in dict.fromkeys(x for x in cells_m if x in margs):
        try:
            cfgs[m] = resolve(m, dict(margs[m]), n_layers, seed=a.seed)
        except ConfigError as e:
            ap.error(f"--knobs/--layers for {m}: {e}")
    n_cand = cfgs["lrs"].params["n_candidates"] if "lrs" in cfgs else int(margs["lrs"]["n_candidates"])
    max_len = a.prompt_len + a.max_tokens
    mpe = (config or {}).get("max_position_embeddings") or ((config or {}).get("text_config") or {}).get(
        "max_position_embeddings")
    if mpe and max_len > int(mpe) and "max_model_len" not in engine_args:
        ap.error(f"--prompt-len + --max-tokens = {max_len} exceeds the model's max_position_embeddings {mpe}")
    name = a.model_name or model_label(a.model)
    if not re.fullmatch(r"[\w.+-]+", name):
        ap.error(f"--model-name {name!r}: use letters, digits, '.', '_', '+', '-' (it names the report files)")
    if build_mid and not a.plan:
        from ..tiny import build_tiny_model

        print(f"[bench] building the mid-size random model in {a.model} ({TINY_MID})", flush=True)
        build_tiny_model(a.model, "qwen3", **TINY_MID)
    return Checked(methods=methods, cell_methods=cells_m, added=added, batches=batches, knobs=knobs,
                   engine_args=engine_args, method_args={m: margs[m] for m in cfgs}, cfgs=cfgs, arch=arch,
                   num_layers=n_layers, n_candidates=n_cand, config=config, name=name, max_len=max_len)


def _summary() -> str:
    from . import __doc__ as doc

    return (doc or "").split("\n\n")[0]
