"""Method configuration: parsing, presets, validation.

The path of a setting: ``--model_args`` (or a preset via ``config=``) → :func:`resolve` in the
lm-eval driver, before any engine starts → a plain dict inside ``hf_overrides["telltale"]`` →
:meth:`TelltaleConfig.from_dict` in every vLLM worker. Every error names the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import model_configs_dir
from .core.params import checks_of, keys_of, knob
from .spec import IQR_K, METHODS, MIN_IQR, TAU_MODES, TAU_Q, default_warmup, parse_bool


class ConfigError(ValueError):
    """A bad telltale setting; the message names the key."""

    def __init__(self, key: str, msg: str):
        super().__init__(f"telltale: bad value for {key!r}: {msg}")
        self.key = key


@dataclass(frozen=True)
class CommonParams:
    """The settings every method takes, declared once (name, type, default, help, range check) in
    the form of the methods' own knobs (:mod:`lm_eval_telltale.core.params`): ``COMMON_KEYS``
    (validation and help), ``COMMON_CHECKS`` (:func:`resolve`), :class:`TelltaleConfig`'s defaults
    and the table labels (:func:`lm_eval_telltale.tools.runs.telltale_knobs`: a label shows a
    setting that differs from its default here) all read it. ``warmup`` has no single default:
    :func:`lm_eval_telltale.spec.default_warmup` of the method and τ mode."""

    layers: Any = knob("auto", "patched layers: 'auto' (last quarter without the final layer), '21-26', '21;23;25' "
                               "or a list")
    tau_mode: str = knob("request", "request | global | fixed | calibrated (docs/methods.md §1)",
                         lambda v: v in TAU_MODES, f"must be one of {', '.join(TAU_MODES)}")
    tau: Any = knob(None, "fixed τ: a number (all layers), a JSON list/dict {layer: τ}, or a .json/.yaml file")
    tau_file: str | None = knob(None, "calibration file from `telltale calibrate` (tau_mode=calibrated; given "
                                      "without tau_mode it implies tau_mode=calibrated)")
    tau_q: float = knob(TAU_Q, "quantile of the calibration file used as τ (tau_mode=calibrated only)",
                        lambda v: 0 < v < 1, "must be in (0, 1)")
    iqr_k: float = knob(IQR_K, "τ = Q3 + iqr_k · max(IQR, min_iqr)", lambda v: v >= 0, "must be >= 0")
    min_iqr: float = knob(MIN_IQR, "lower bound of the IQR in the τ rule", lambda v: v >= 0, "must be >= 0")
    tau_floor: float | None = knob(None, "optional lower bound of τ (>= 0)", lambda v: v >= 0, "must be >= 0")
    warmup: int | None = knob(None, "the request's own generated tokens (request, fixed, calibrated) or decode "
                                    "steps (global) before any decision; default (spec.default_warmup): 64 tokens "
                                    "in request mode, 500 steps (200 for erss) in global mode, none with a given τ",
                              lambda v: v >= 0, "must be >= 0")
    record_tokens: bool = knob(False, "write per-token traces (norm, τ, events) into the sidecar for `telltale "
                                      "view`: ≈ 40 bytes of JSON per generated token and patched layer (more with a "
                                      "method's extra columns), e.g. 16k tokens × 6 layers ≈ 4 MB per answer")
    batch_invariant: bool = knob(False, "vLLM's batch-invariant kernels (VLLM_BATCH_INVARIANT=1; GPU only): a "
                                        "request's logits independent of the rest of the batch, at some speed cost")
    stats_path: str | None = knob(None, "sidecar JSONL path (default: next to lm-eval's --output_path); a new file")


#: the common settings: key -> (default, help); a method's own knobs live in its core module
COMMON_KEYS: dict[str, tuple[Any, str]] = keys_of(CommonParams)
#: their range checks (key -> check(value) -> (ok, message))
COMMON_CHECKS = checks_of(CommonParams)
_COMMON = CommonParams()


def method_keys(method: str) -> dict[str, tuple[Any, str]]:
    """The method's own knobs, declared in its core module (``KEYS``)."""
    from .core.methods import method_keys as _keys

    return _keys(method)

#: method knobs that hold one value per patched layer (cut per pipeline stage by ``for_layers``)
PER_LAYER_PARAMS = ("match_rate",)

#: keys a preset file may hold besides telltale keys (lm-eval VLLM arguments and documentation)
PRESET_PASSTHROUGH = ("think_end_token", "enable_thinking", "max_model_len")


@dataclass
class TelltaleConfig:
    method: str = "norms"
    layers: list[int] = field(default_factory=list)
    num_layers: int = 0
    tau_mode: str = _COMMON.tau_mode
    tau_values: list[float] | None = None  # fixed / calibrated: one per patched layer
    tau_q: float | None = None  # the calibration quantile in use (calibrated mode only)
    tau_file: str | None = None
    iqr_k: float = _COMMON.iqr_k
    min_iqr: float = _COMMON.min_iqr
    tau_floor: float | None = _COMMON.tau_floor
    warmup: int = default_warmup("norms", "request")  # resolved: spec.default_warmup of method and mode
    record_tokens: bool = _COMMON.record_tokens
    batch_invariant: bool = _COMMON.batch_invariant
    stats_path: str | None = _COMMON.stats_path
    params: dict[str, Any] = field(default_factory=dict)  # method knobs
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TelltaleConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(sorted(unknown)[0], "not a resolved telltale setting")
        cfg = cls(**d)
        if cfg.method not in METHODS:
            raise ConfigError("method", f"must be one of {METHODS}")
        return cfg

    def knob(self, name: str) -> Any:
        return self.params[name]

    def for_layers(self, layers: list[int]) -> "TelltaleConfig":
        """The settings of one pipeline stage: the patched layers it owns (a subset of ``layers``),
        with every per-layer value (τ values, a per-layer ``match_rate``) cut to them."""
        idx = [self.layers.index(l) for l in layers]
        params = dict(self.params)
        for k, v in params.items():
            if isinstance(v, list) and len(v) == len(self.layers) and k in PER_LAYER_PARAMS:
                params[k] = [v[i] for i in idx]
        tau = None if self.tau_values is None else [self.tau_values[i] for i in idx]
        return dataclasses.replace(self, layers=list(layers), tau_values=tau, params=params)


# --- parsing helpers --------------------------------------------------------------------------

def default_layers(num_layers: int) -> list[int]:
    """docs/methods.md §0: range(L - max(1, L//4), L - 1)."""
    return list(range(num_layers - max(1, num_layers // 4), num_layers - 1))


def parse_layers(value: Any, num_layers: int) -> list[int]:
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        layers = default_layers(num_layers)
    elif isinstance(value, int) and not isinstance(value, bool):
        layers = [value]
    elif isinstance(value, (list, tuple)):
        try:
            layers = [int(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError("layers", f"not a list of integers: {value!r}") from None
    elif isinstance(value, str):
        layers = []
        for part in value.replace(";", " ").replace("+", " ").replace(":", " ").split():
            try:
                if "-" in part[1:]:
                    a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                    lo, hi = int(a), int(b)
                else:
                    lo = hi = int(part)
            except ValueError:
                raise ConfigError("layers", f"cannot parse {value!r} (use 'auto', '21-26' or '21;23;25')") from None
            if hi < lo:  # outside the try: ConfigError is a ValueError and must not turn into "cannot parse"
                raise ConfigError("layers", f"empty range {part}: the first layer must not exceed the last")
            layers.extend(range(lo, hi + 1))
    else:
        raise ConfigError("layers", f"unsupported value {value!r}")
    if not layers:
        raise ConfigError("layers", "no layers selected")
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise ConfigError("layers", f"layer {bad[0]} out of range: the model has {num_layers} layers (0..{num_layers - 1})")
    if len(set(layers)) != len(layers):
        raise ConfigError("layers", f"duplicate layers in {value!r}")
    return sorted(layers)


def _load_structured(key: str, value: Any) -> Any:
    """A JSON string, a .json/.yaml file path, or an already-parsed object."""
    if not isinstance(value, str):
        return value
    s = value.strip()
    if s[:1] in "[{":
        try:
            return json.loads(s)
        except json.JSONDecodeError as e:
            raise ConfigError(key, f"malformed JSON {s!r}: {e.msg}") from None
    p = Path(s).expanduser()
    if p.suffix.lower() in (".json", ".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(key, f"file not found: {p}")
        text = p.read_text()
        try:
            return json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(key, f"cannot parse {p}: {e}") from None
    try:
        return float(s)
    except ValueError:
        raise ConfigError(key, f"expected a number, JSON or a .json/.yaml file, got {s!r}") from None


def _finite(key: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(key, f"not a number: {v!r}") from None
    if not math.isfinite(f):
        raise ConfigError(key, f"not finite: {v!r}")
    return f


def _tau_value(key: str, v: Any, layer: int | None = None) -> float:
    """A τ: finite and > 0 (a norm is positive; τ ≤ 0 would mark every token)."""
    f = _finite(key, v)
    if f <= 0:
        where = "" if layer is None else f" for layer {layer}"
        raise ConfigError(key, f"τ{where} must be > 0, got {v!r}")
    return f


def parse_fixed_tau(value: Any, layers: list[int], num_layers: int | None = None) -> list[float]:
    """τ per patched layer from ``tau=``: a number, a list (one per patched layer), a dict
    {layer: τ} (every patched layer, no other), or a .json/.yaml file holding one of these."""
    obj = _load_structured("tau", value)
    if isinstance(obj, dict) and "tau" in obj and len(obj) == 1:
        obj = obj["tau"]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [_tau_value("tau", obj)] * len(layers)
    if isinstance(obj, list):
        if len(obj) != len(layers):
            raise ConfigError("tau", f"{len(obj)} values for {len(layers)} patched layers {layers}")
        return [_tau_value("tau", v, l) for v, l in zip(obj, layers)]
    if isinstance(obj, dict):
        try:
            m = {int(k): v for k, v in obj.items()}
        except (TypeError, ValueError):
            raise ConfigError("tau", f"keys must be layer numbers: {list(obj)}") from None
        for l in sorted(m):
            if num_layers is not None and not 0 <= l < num_layers:
                raise ConfigError("tau", f"layer {l} does not exist: the model has {num_layers} layers "
                                         f"(0..{num_layers - 1})")
            if l not in layers:
                raise ConfigError("tau", f"layer {l} is not patched (patched: {layers}); remove it or add it "
                                         "to layers=")
        missing = [l for l in layers if l not in m]
        if missing:
            raise ConfigError("tau", f"no τ for patched layer {missing[0]}")
        return [_tau_value("tau", m[l], l) for l in layers]
    raise ConfigError("tau", f"unsupported value {value!r}")


def load_calibration(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError("tau_file", f"file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError("tau_file", f"cannot parse {p}: {e}") from None
    if isinstance(data, dict) and "calibration" in data:
        data = data["calibration"]
    if not isinstance(data, dict) or not isinstance(data.get("quantiles"), dict):
        raise ConfigError("tau_file", f"{p} has no 'quantiles' mapping (write it with `telltale calibrate`)")
    return data


def calibrated_tau(path: str | Path, q: float, layers: list[int]) -> list[float]:
    data = load_calibration(path)
    try:
        table = {int(k): v for k, v in data["quantiles"].items()}
    except (TypeError, ValueError):
        raise ConfigError("tau_file", f"{path}: the keys of 'quantiles' must be layer numbers: "
                                      f"{list(data['quantiles'])}") from None
    out = []
    for l in layers:
        if l not in table:
            raise ConfigError("tau_file", f"{path} has no quantiles for patched layer {l} (it has {sorted(table)})")
        if not isinstance(table[l], dict):
            raise ConfigError("tau_file", f"{path}: the quantiles of layer {l} must be a mapping like {{p90: τ}}")
        try:
            qs = {float(str(k).lstrip("p")) / (100.0 if str(k).startswith("p") else 1.0): v
                  for k, v in table[l].items()}
        except ValueError:
            raise ConfigError("tau_file", f"{path}: layer {l} has a quantile key that is not 'pNN' or a number: "
                                          f"{list(table[l])}") from None
        match = [v for k, v in qs.items() if abs(k - q) < 1e-9]
        if not match:
            raise ConfigError("tau_q", f"{q} is not among the quantiles of {path} for layer {l}: {sorted(qs)}")
        v = match[0]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError("tau_file", f"{path}: the {q} quantile of layer {l} is {v!r}; τ must be a finite "
                                          "number > 0 (rewrite the file with `telltale calibrate`)")
        out.append(float(v))
    return out


def find_preset(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    if p.suffix.lower() in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError("config", f"preset file not found: {p}")
        return p
    cand = model_configs_dir() / f"{name_or_path.lower()}.yaml"
    if not cand.is_file():
        names = sorted(x.stem for x in model_configs_dir().glob("*.yaml"))
        raise ConfigError("config", f"unknown preset {name_or_path!r}; shipped presets: {', '.join(names)}")
    return cand


def load_preset(name_or_path: str) -> dict[str, Any]:
    p = find_preset(name_or_path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("config", f"cannot parse {p}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("config", f"{p} is not a mapping")
    data["_path"] = str(p)
    return data


def _as_bool(key: str, v: Any) -> bool:
    b = parse_bool(v)
    if b is None:
        raise ConfigError(key, f"expected true/false, got {v!r}")
    return b


def _coerce(key: str, default: Any, v: Any) -> Any:
    if v is None:
        return None
    if isinstance(default, bool):
        return _as_bool(key, v)
    if isinstance(default, int) and not isinstance(default, bool):
        f = _finite(key, v)
        if f != int(f):
            raise ConfigError(key, f"expected an integer, got {v!r}")
        return int(f)
    if isinstance(default, float):
        return _finite(key, v)
    return v


def resolve(method: str, args: dict[str, Any], num_layers: int, *, seed: int = 0,
            preset: dict[str, Any] | None = None, model_type: str | None = None) -> TelltaleConfig:
    """Validate telltale ``args`` (already separated from other model_args) into a config.

    ``preset`` values apply where ``args`` has no value; a preset written for another layer count
    (its ``num_layers``) is refused. Raises :class:`ConfigError`."""
    if method not in METHODS:
        raise ConfigError("method", f"must be one of {METHODS}")
    if preset and preset.get("num_layers") not in (None, num_layers):
        raise ConfigError("config", f"preset {preset.get('_path')} is for a {preset['num_layers']}-layer model, "
                                    f"this model has {num_layers}")
    mkeys = method_keys(method)
    allowed = {**COMMON_KEYS, **mkeys}
    merged: dict[str, Any] = {}
    if preset:
        block = preset.get("telltale") or {}
        if not isinstance(block, dict):
            raise ConfigError("config", f"'telltale' in preset {preset.get('_path')} must be a mapping")
        # common keys first, then the block named after this method (e.g. `erss: {low_k: 4}`);
        # other methods' blocks are ignored
        own = block.get(method) or {}
        if not isinstance(own, dict):
            raise ConfigError(method, f"the {method!r} block in preset {preset.get('_path')} must be a mapping")
        common = {k: v for k, v in block.items() if k not in METHODS}
        for k, v in [*common.items(), *own.items()]:
            if k not in allowed:
                raise ConfigError(k, f"unknown key in preset {preset.get('_path')} (allowed for {method}: {sorted(allowed)})")
            merged[k] = v
        if "layers" in preset and "layers" not in merged:
            merged["layers"] = preset["layers"]
    for k, v in args.items():
        if k not in allowed:
            raise ConfigError(k, f"unknown key for {model_type or method} (allowed: {sorted(allowed)})")
        merged[k] = v

    def get(k):
        return _coerce(k, allowed[k][0], merged.get(k, allowed[k][0]))

    def checked(k, v):
        """``v`` after the declared range check of common setting ``k`` (None passes)."""
        if v is not None:
            ok, why = COMMON_CHECKS[k](v)
            if not ok:
                raise ConfigError(k, why)
        return v

    layers = parse_layers(merged.get("layers", "auto"), num_layers)
    if merged.get("tau_mode") is None and merged.get("tau_file") is not None:
        merged["tau_mode"] = "calibrated"  # tau_file= alone: the intent is unambiguous
    mode = checked("tau_mode", str(get("tau_mode") or _COMMON.tau_mode).lower())
    # a τ setting of another mode is an error, not silently ignored; a preset's value is dropped only
    # when --model_args itself chose the mode
    for key, own_mode, hint in (("tau", "fixed", "tau_mode=fixed"),
                                ("tau_file", "calibrated", "tau_mode=calibrated (or drop tau_mode)"),
                                ("tau_q", "calibrated", "tau_mode=calibrated,tau_file=FILE")):
        if mode != own_mode and merged.get(key) is not None:
            if key in args or "tau_mode" not in args:
                raise ConfigError(key, f"given but tau_mode={mode}: {key} is used by tau_mode={own_mode} only; "
                                       f"use {hint} or remove {key}")
            merged.pop(key)
    tau_values = None
    tau_q = None
    tau_file = merged.get("tau_file")
    if mode == "fixed":
        if merged.get("tau") is None:
            raise ConfigError("tau", "tau_mode=fixed needs tau=<number | JSON | file>")
        tau_values = parse_fixed_tau(merged["tau"], layers, num_layers)
    elif mode == "calibrated":
        if not tau_file and preset and isinstance(preset.get("calibration"), dict):
            tau_file = preset["_path"]  # a file written by `telltale calibrate` is its own preset
        if not tau_file:
            raise ConfigError("tau_file", "tau_mode=calibrated needs tau_file=<file from `telltale calibrate`>")
        tau_q = checked("tau_q", get("tau_q"))
        tau_values = calibrated_tau(tau_file, tau_q, layers)
        tau_file = str(Path(tau_file).expanduser().resolve())
    iqr_k = checked("iqr_k", get("iqr_k"))
    min_iqr = checked("min_iqr", get("min_iqr"))
    tau_floor = merged.get("tau_floor")
    tau_floor = checked("tau_floor", None if tau_floor is None else _finite("tau_floor", tau_floor))
    warmup = merged.get("warmup")
    if warmup is None:
        warmup = default_warmup(method, mode)
    warmup = checked("warmup", _coerce("warmup", 0, warmup))
    params = {}
    for k, (default, _help) in mkeys.items():
        params[k] = _coerce(k, default, merged.get(k, default))
    if method == "suppress":
        _matched_rates(params, layers)  # file and JSON settings are read here, never in core/
    cfg = TelltaleConfig(
        method=method, layers=layers, num_layers=num_layers, tau_mode=mode, tau_values=tau_values,
        tau_q=tau_q, tau_file=tau_file, iqr_k=iqr_k, min_iqr=min_iqr,
        tau_floor=tau_floor, warmup=warmup, record_tokens=bool(get("record_tokens")),
        batch_invariant=bool(get("batch_invariant")),
        stats_path=merged.get("stats_path"), params=params, seed=int(seed),
    )
    validate_params(cfg)
    return cfg


def _matched_rates(params: dict[str, Any], layers: list[int]) -> None:
    """``vllm-suppress``'s matched mode (docs/methods.md §5): ``match_stats`` (a high-mode run's
    sidecar, read here) or ``match_rate`` (a number or a JSON list) → one rate per patched layer in
    ``params["match_rate"]`` (None: online). The rates themselves: :func:`core.suppress.rates_from_rows`."""
    from .core.suppress import rates_from_rows

    if params.get("suppress_mode") != "matched":
        if params.get("match_rate") is not None or params.get("match_stats") is not None:
            raise ConfigError("match_rate" if params.get("match_rate") is not None else "match_stats",
                              "only used with suppress_mode=matched")
        return
    if params.get("match_stats") is not None:
        p = Path(str(params["match_stats"])).expanduser()
        rows = _read_sidecar_setting("match_stats", p)  # its ConfigError names the key and the file already
        try:
            params["match_rate"] = rates_from_rows(rows, layers)
        except ValueError as e:
            raise ConfigError("match_stats", f"{p}: {e}") from None
        params["match_stats"] = str(p.resolve())
        return
    r = params.get("match_rate")
    if r is None:
        return
    if isinstance(r, str):
        try:
            r = json.loads(r)
        except json.JSONDecodeError:
            raise ConfigError("match_rate", f"not a number or JSON list: {r!r}") from None
    if isinstance(r, (int, float)):
        r = [float(r)] * len(layers)
    if not isinstance(r, list) or len(r) != len(layers) or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in r):
        raise ConfigError("match_rate", f"need one rate in [0, 1] per patched layer {layers}, got {params['match_rate']!r}")
    params["match_rate"] = [float(v) for v in r]


def _read_sidecar_setting(key: str, path: Path) -> list[dict]:
    """The rows of a sidecar named by a setting (``match_stats=``); a partial sidecar (an
    interrupted run) is read with a warning naming it."""
    import logging

    from .sidecar import read_sidecar

    if not path.is_file():
        raise ConfigError(key, f"file not found: {path}")
    log = logging.getLogger("lm_eval_telltale")
    try:
        return read_sidecar(path, warn=lambda msg: log.warning("telltale: %s=%s", key, msg))
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"cannot read {path}: {e}") from None


def validate_params(cfg: TelltaleConfig) -> None:
    """Range checks for method knobs (the method module's ``CHECKS``), then its checks across knobs
    (its ``check_params``, where it has one)."""
    from .core.methods import method_checks, method_module

    for k, check in method_checks(cfg.method).items():
        v = cfg.params.get(k)
        if v is not None:
            ok, what = check(v)
            if not ok:
                raise ConfigError(k, what)
    across = getattr(method_module(cfg.method), "check_params", None)
    bad = across(cfg.params) if across is not None else None
    if bad:
        raise ConfigError(*bad)


def all_keys(method: str) -> set[str]:
    return set(COMMON_KEYS) | set(method_keys(method)) | {"config"}
