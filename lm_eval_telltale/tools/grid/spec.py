"""A grid file: its schema, its checks (before anything starts; each error names the key) and its
cells.

A cell is one ``lm_eval`` run: one model × one method point (a method with every sweep list
expanded) × one task × one seed. Its identity is a hash of everything that decides its result (the
command line's settings, not the paths it writes to): a changed knob is a new cell, never a stale
reuse.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...spec import MODEL_TYPES

#: the keys of a grid file and what each holds (the docstring of :mod:`lm_eval_telltale.tools.grid`)
TOP_KEYS = ("output", "models", "methods", "tasks", "gen_kwargs", "limit", "seeds", "apply_chat_template",
            "num_fewshot", "batch_size", "include_path", "log_samples", "lm_eval_args", "env")
MODEL_KEYS = ("name", "pretrained", "preset", "model_args", "gpus")
METHOD_KEYS = ("name", "model", "model_args", "preset")
STOCK_TYPES = ("vllm", "hf")
_NAME_RE = re.compile(r"[A-Za-z0-9][\w.+-]*")
#: a model_args value that names another cell's sidecar: "{sidecar:METHOD}" (same model, task, seed)
SIDECAR_REF = re.compile(r"\{sidecar:([\w.+-]+)\}")


class GridError(ValueError):
    """A grid file that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class Cell:
    model: str  # the model's name in the grid
    method: str  # the method's name
    point: tuple[tuple[str, Any], ...]  # the swept knobs' values of this method point
    task: str
    seed: int | None
    model_type: str
    model_args: dict[str, Any]  # as passed to --model_args (references still unresolved)
    gpus: int
    settings: dict[str, Any] = field(compare=False, hash=False)  # the rest of the command line
    depends: tuple[str, ...] = ()  # ids of the cells whose sidecars this one reads

    @property
    def label(self) -> str:
        sweep = ",".join(f"{k}={_fmt(v)}" for k, v in self.point)
        return f"{self.model} · {self.method}{f' [{sweep}]' if sweep else ''} · {self.task}" + (
            f" · seed {self.seed}" if self.seed is not None else "")

    @property
    def id(self) -> str:
        return cell_id(self)

    @property
    def dirname(self) -> str:
        sweep = "_".join(f"{k}-{_fmt(v)}" for k, v in self.point)
        parts = [self.model, self.method] + ([sweep] if sweep else []) + [self.task] + (
            [f"s{self.seed}"] if self.seed is not None else [])
        return re.sub(r"[^\w.+-]+", "_", "__".join(parts))[:150] + "__" + self.id


def _fmt(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def cell_id(c: Cell) -> str:
    """A hash of what decides the cell's result: model type, model_args (references by the cell
    they name), task, seed and the rest of the command line's settings."""
    payload = {"model_type": c.model_type, "model_args": c.model_args, "task": c.task, "seed": c.seed,
               "settings": {k: v for k, v in c.settings.items() if k not in ("env",)}, "depends": list(c.depends)}
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


@dataclass
class Grid:
    path: Path
    output: Path
    cells: list[Cell]
    raw: dict

    @functools.cached_property
    def by_id(self) -> dict[str, Cell]:
        return {c.id: c for c in self.cells}


def _err(path: Path, key: str, msg: str) -> GridError:
    return GridError(f"{path}: {key}: {msg}")


def _names(items: list, key: str, path: Path) -> None:
    seen = set()
    for i, it in enumerate(items):
        n = it.get("name")
        if not isinstance(n, str) or not _NAME_RE.fullmatch(n):
            raise _err(path, f"{key}[{i}].name", f"give a name of letters, digits, '.', '_', '+', '-' (got {n!r})")
        if n in seen:
            raise _err(path, f"{key}[{i}].name", f"{n!r} is used twice")
        seen.add(n)


def _mapping(v: Any, path: Path, key: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _err(path, key, f"expected a mapping of key: value, got {type(v).__name__}")
    return v


def expand_placeholders(v: Any) -> Any:
    """``{arith_model}`` (the shipped tiny model) and ``{tasks_dir}`` (the packaged tasks) in strings."""
    if isinstance(v, str) and "{" in v:
        if "{arith_model}" in v:
            from ...arith import model_dir

            v = v.replace("{arith_model}", str(model_dir()))
        if "{tasks_dir}" in v:
            from ... import tasks_dir

            v = v.replace("{tasks_dir}", str(tasks_dir()))
    return v


def _check_known_model_type(path: Path, key: str, mtype: Any) -> str:
    if not isinstance(mtype, str) or not mtype:
        raise _err(path, key, "give an lm-eval model type (vllm, hf, or one of the telltale types)")
    if mtype in MODEL_TYPES or mtype in STOCK_TYPES:
        return mtype
    try:
        import lm_eval.models  # noqa: F401 - registers the stock names
        from lm_eval.api.registry import MODEL_REGISTRY

        known = set(MODEL_REGISTRY)
    except Exception:  # noqa: BLE001
        known = set()
    if mtype not in known:
        raise _err(path, key, f"unknown model type {mtype!r}; the telltale types are {', '.join(MODEL_TYPES)}, "
                               f"stock lm-eval ones e.g. {', '.join(STOCK_TYPES)}")
    return mtype


def _check_telltale_args(path: Path, key: str, mtype: str, args: dict, pretrained: str, preset: str | None,
                         layers: dict[str, int | None], preset_key: str) -> None:
    """A telltale method point's knobs, checked as the model type checks them (values, ranges,
    layers) when the model's layer count can be read without downloading anything."""
    from ...config import ConfigError, all_keys, load_preset, resolve

    method = mtype.split("-", 1)[1]
    if pretrained not in layers:
        try:
            from ...vllm import inspect_model

            layers[pretrained] = inspect_model(pretrained)[1]
        except Exception:  # noqa: BLE001 - not local: the run checks it
            layers[pretrained] = None
    n = layers[pretrained]
    if n is None:
        return
    keys = all_keys(method)
    tt = {k: v for k, v in args.items() if k in keys}
    try:
        resolve(method, tt, n, preset=load_preset(preset) if preset else None, model_type=mtype)
    except ConfigError as e:
        where = preset_key if e.key == "config" else f"{key}.{e.key}"
        raise _err(path, where, f"{pretrained}: {e}") from None
    except Exception as e:  # noqa: BLE001 - e.g. a preset that cannot be found
        raise _err(path, key, str(e)) from None


def versions() -> dict[str, str | None]:
    """The versions that decide a cell's result beside its settings (part of its identity: an
    upgraded package makes new cells, never a mix of old and new runs in one table)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("lm-eval-telltale", "lm_eval", "vllm", "transformers", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def load_grid(path: str | Path, *, output: str | Path | None = None, limit: Any = None, salt: str | None = None) -> Grid:
    """Read and check a grid file; expand its cells. ``output`` / ``limit`` override the file's;
    ``salt`` (e.g. a digest of the code under development) is part of every cell's identity."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise GridError(f"{p}: no such grid file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise GridError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{p}: expected a mapping with the keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise _err(p, unknown[0], f"unknown key; the keys are {', '.join(TOP_KEYS)}")
    out = output if output is not None else raw.get("output")
    if not out:
        raise _err(p, "output", "give the output root (or --out)")
    models, methods, tasks = raw.get("models"), raw.get("methods"), raw.get("tasks")
    for key, v in (("models", models), ("methods", methods)):
        if not isinstance(v, list) or not v or not all(isinstance(x, dict) for x in v):
            raise _err(p, key, "give a non-empty list of mappings")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
        raise _err(p, "tasks", "give a non-empty list of task names")
    _names(models, "models", p)
    _names(methods, "methods", p)
    for i, m in enumerate(models):
        bad = sorted(set(m) - set(MODEL_KEYS))
        if bad:
            raise _err(p, f"models[{i}].{bad[0]}", f"unknown key; a model has {', '.join(MODEL_KEYS)}")
        if not isinstance(m.get("pretrained"), str) or not m["pretrained"]:
            raise _err(p, f"models[{i}].pretrained", "give the model (a directory or a Hugging Face id)")
        _mapping(m.get("model_args"), p, f"models[{i}].model_args")
        g = m.get("gpus")
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 0):
            raise _err(p, f"models[{i}].gpus", f"expected an integer >= 0, got {g!r}")
    for i, m in enumerate(methods):
        bad = sorted(set(m) - set(METHOD_KEYS))
        if bad:
            raise _err(p, f"methods[{i}].{bad[0]}", f"unknown key; a method has {', '.join(METHOD_KEYS)}")
        _check_known_model_type(p, f"methods[{i}].model", m.get("model"))
        _mapping(m.get("model_args"), p, f"methods[{i}].model_args")
        if "preset" in m and not isinstance(m["preset"], bool):
            raise _err(p, f"methods[{i}].preset", "true (the model's preset, the default for telltale types) or false")
    gen = _mapping(raw.get("gen_kwargs"), p, "gen_kwargs")
    lim = limit if limit is not None else raw.get("limit")
    if lim is not None and (isinstance(lim, bool) or not isinstance(lim, (int, float)) or lim <= 0):
        raise _err(p, "limit", f"expected a positive number (count, or a fraction < 1), got {lim!r}")
    seeds = raw.get("seeds", [None])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds or not all(s is None or (isinstance(s, int) and not isinstance(s, bool)) for s in seeds):
        raise _err(p, "seeds", f"expected a list of integers, got {raw.get('seeds')!r}")
    extra = raw.get("lm_eval_args") or []
    if isinstance(extra, str):
        extra = shlex.split(extra)
    if not isinstance(extra, list) or not all(isinstance(x, str) for x in extra):
        raise _err(p, "lm_eval_args", "give a list of strings (extra lm_eval flags)")
    owned = {"--model", "--model_args", "--tasks", "--output_path", "--limit", "--seed", "--gen_kwargs"}
    clash = [x for x in extra if x.split("=", 1)[0] in owned]
    if clash:
        raise _err(p, "lm_eval_args", f"{clash[0]} is set by the grid itself (use its own key)")
    # a null value unsets the variable for the cells
    env = {str(k): (None if v is None else str(v)) for k, v in _mapping(raw.get("env"), p, "env").items()}
    settings = {"gen_kwargs": gen, "limit": lim, "apply_chat_template": raw.get("apply_chat_template", True),
                "num_fewshot": raw.get("num_fewshot"), "batch_size": raw.get("batch_size", "auto"),
                "include_path": expand_placeholders(raw.get("include_path")),
                "log_samples": raw.get("log_samples", True), "lm_eval_args": extra, "env": env,
                "versions": versions(), **({"salt": salt} if salt else {})}

    method_names = [m["name"] for m in methods]
    layers: dict[str, int | None] = {}
    cells: list[Cell] = []
    for mi, model in enumerate(models):
        pretrained = expand_placeholders(model["pretrained"])
        base = {k: expand_placeholders(v) for k, v in _mapping(model.get("model_args"), p, "").items()}
        for bad in ("pretrained", "config"):
            if bad in base:
                raise _err(p, f"models[{mi}].model_args.{bad}",
                           f"give it as the model's {'preset' if bad == 'config' else bad}")
        gpus = model.get("gpus")
        if gpus is None:
            tp = int(base.get("tensor_parallel_size", 1) or 1) * int(base.get("pipeline_parallel_size", 1) or 1)
            gpus = tp
        for ti, method in enumerate(methods):
            key = f"methods[{ti}]"
            mtype = method["model"]
            margs = {k: expand_placeholders(v) for k, v in _mapping(method.get("model_args"), p, "").items()}
            swept = [(k, v) for k, v in margs.items() if isinstance(v, list)]
            for k, v in swept:
                if not v:
                    raise _err(p, f"{key}.model_args.{k}", "an empty sweep")
            telltale = mtype in MODEL_TYPES
            preset = model.get("preset") if telltale and method.get("preset", True) else None
            for combo in itertools.product(*[v for _, v in swept]) if swept else [()]:
                point = tuple((k, val) for (k, _), val in zip(swept, combo))
                args = {**base, **margs, **dict(point)}
                deps = []
                for k, v in args.items():
                    for ref in SIDECAR_REF.findall(v) if isinstance(v, str) else []:
                        if ref not in method_names:
                            raise _err(p, f"{key}.model_args.{k}", f"{{sidecar:{ref}}} names no method of the grid")
                        if ref == method["name"]:
                            raise _err(p, f"{key}.model_args.{k}", "a method cannot read its own sidecar")
                        deps.append(ref)
                if telltale:
                    _check_telltale_args(p, f"{key}.model_args", mtype, {k: v for k, v in args.items()
                                                                         if not (isinstance(v, str) and SIDECAR_REF.search(v))},
                                         pretrained, preset, layers, f"models[{mi}].preset")
                full = {"pretrained": pretrained, **args, **({"config": preset} if preset else {})}
                for task in tasks:
                    for seed in seeds:
                        cells.append(Cell(model["name"], method["name"], point, task.strip(), seed, mtype, full,
                                          int(gpus), settings, tuple(deps)))
    # dependencies: by method name → the matching cell's id (same model, task, seed; one point)
    by_key: dict[tuple, list[Cell]] = {}
    for c in cells:
        by_key.setdefault((c.model, c.method, c.task, c.seed), []).append(c)
    resolved = []
    for c in cells:
        ids = []
        for ref in c.depends:
            targets = by_key.get((c.model, ref, c.task, c.seed), [])
            if len(targets) != 1:
                raise _err(p, f"methods[{method_names.index(c.method)}].model_args",
                           f"{{sidecar:{ref}}}: method {ref!r} must have exactly one point (no sweep)")
            ids.append(targets[0].id)
        resolved.append(Cell(c.model, c.method, c.point, c.task, c.seed, c.model_type, c.model_args, c.gpus,
                             c.settings, tuple(ids)))
    ids = [c.id for c in resolved]
    if len(set(ids)) != len(ids):
        dup = next(c for c in resolved if ids.count(c.id) > 1)
        raise _err(p, "methods", f"two cells are the same run ({dup.label}); give them different settings")
    return Grid(p, Path(str(expand_placeholders(str(out)))).expanduser().absolute(), resolved, raw)


def lm_eval_command(cell: Cell, out_dir: Path, sidecars: dict[str, Path] | None = None) -> list[str]:
    """The ``lm_eval`` command line of a cell (the one a user would type), its output in
    ``out_dir``; ``{sidecar:M}`` references replaced by ``sidecars`` (cell id → path)."""
    s = cell.settings
    margs = dict(cell.model_args)
    deps = iter(cell.depends)  # in the order the references occur (load_grid collected them so)

    def path_of(m: re.Match) -> str:
        return str((sidecars or {}).get(next(deps, ""), m.group(0)))

    for k, v in margs.items():
        if isinstance(v, str) and SIDECAR_REF.search(v):
            margs[k] = SIDECAR_REF.sub(path_of, v)
    lm_eval = str(Path(sys.executable).parent / "lm_eval")
    cmd = [lm_eval, "--model", cell.model_type, "--model_args", _args_string(margs), "--tasks", cell.task,
           "--batch_size", str(s.get("batch_size") or "auto"), "--output_path", str(out_dir)]
    if s.get("apply_chat_template"):
        cmd.append("--apply_chat_template")
    if s.get("log_samples", True):
        cmd.append("--log_samples")
    if s.get("limit") is not None:
        cmd += ["--limit", str(s["limit"])]
    if s.get("num_fewshot") is not None:
        cmd += ["--num_fewshot", str(s["num_fewshot"])]
    if s.get("gen_kwargs"):
        cmd += ["--gen_kwargs", _args_string(s["gen_kwargs"])]
    if s.get("include_path"):
        cmd += ["--include_path", str(s["include_path"])]
    if cell.seed is not None:
        cmd += ["--seed", str(cell.seed)]
    return cmd + list(s.get("lm_eval_args") or [])


def shown(cmd: list[str]) -> str:
    """A cell's command line as a user would type it (``lm_eval`` by name, shell-quoted)."""
    return shlex.join(["lm_eval", *cmd[1:]] if cmd and Path(cmd[0]).name == "lm_eval" else cmd)


def _args_string(d: dict[str, Any]) -> str:
    """``k=v,...`` when every value is plain, else JSON (lm-eval reads both)."""
    plain = all(not isinstance(v, (dict, list)) and "," not in str(v) for v in d.values())
    if plain:
        return ",".join(f"{k}={v}" for k, v in d.items())
    return json.dumps(d)

