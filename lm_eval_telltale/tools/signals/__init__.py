"""``telltale signals``: the paper's signal study as a tool — the ℓ2 norm against an SAE's reasoning
features and against entropy signals, layer by layer, thinking vs answering.

1. Generations: the task's prompts through the ``norms`` observer (vLLM by default, ``--engine hf``),
   as ``telltale profile`` makes them (:func:`lm_eval_telltale.tools.profile.collect`, thinking
   ``auto`` = both modes where the chat template has the switch), saved to ``<out>/collection.npz``
   before anything else; ``--collection FILE`` reuses a saved one (no engine); ``--run DIR`` takes a
   finished lm-eval run's logged generations instead (:mod:`.sources`, no engine).
2. A teacher-forced transformers pass over every generation (:mod:`.teacher`, float32, eager
   attention): per generated-token row and layer the norm and the entropies (:mod:`.measures`).
3. The SAE per layer: ``--sae DIR`` (SAELens or sparsify format), or ``--train-sae`` (the default)
   trains the authors' kind on the rows' own residual streams and writes it to ``<out>/sae/`` in
   SAELens's format (:mod:`.sae`).
4. The numbers (:mod:`.analysis`) and the report (:mod:`.report`): ``signals.md``, ``signals.json``,
   ``signals_corr.png``, ``signals_think.png``, ``tokens.npz``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ...files import unwritable
from .sae import EPOCHS, EXPANSION, L1, LR, TOP_FEATURES, SAEError, load_saes

OUTPUTS = ("signals.json", "signals.md", "tokens.npz", "signals_corr.png", "signals_think.png")
BOOTSTRAP = 1000


def _args() -> argparse.ArgumentParser:
    from ..profile import _common_args

    ap = argparse.ArgumentParser(prog="telltale signals", description="The ℓ2 norm against SAE reasoning features and "
                                 "entropy signals, per layer, thinking vs answering (Markdown + JSON + plots).")
    _common_args(ap, "auto")
    ap.add_argument("--out", default="telltale_signals", help="output directory (signals.md/.json, plots, tokens.npz, "
                                                               "collection.npz, sae/ when trained)")
    ap.add_argument("--run", default=None, metavar="DIR", help="teacher-force a finished lm-eval run's logged generations "
                                                              "(--log_samples; the sidecar's token ids when recorded) "
                                                              "instead of generating: no engine")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--sae", default=None, metavar="DIR", help="SAEs to read: a SAELens or sparsify directory, or one "
                                                                "per layer in its subdirectories")
    src.add_argument("--train-sae", action="store_true", help="train one SAE per layer on this run's rows (the default "
                                                              "when --sae is not given)")
    ap.add_argument("--sae-expansion", type=int, default=EXPANSION, help=f"d_sae / hidden size (default {EXPANSION})")
    ap.add_argument("--sae-epochs", type=int, default=EPOCHS, help=f"training epochs (default {EPOCHS})")
    ap.add_argument("--sae-lr", type=float, default=LR, help=f"Adam learning rate (default {LR:g})")
    ap.add_argument("--sae-l1", type=float, default=L1, help=f"L1 coefficient (default {L1:g})")
    ap.add_argument("--top-features", type=int, default=TOP_FEATURES,
                    help=f"reasoning features per layer (default {TOP_FEATURES})")
    ap.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help=f"bootstrap draws (default {BOOTSTRAP})")
    ap.add_argument("--held-out", action="store_true", help="choose the reasoning features on the even-numbered "
                                                            "generations and take every statistic over the odd ones "
                                                            "(default: both on all, as the paper does)")
    ap.add_argument("--no-attention", action="store_true", help="skip the attention entropy: the pass then runs sdpa "
                                                                "attention (eager attention holds heads × T² weights "
                                                                "per layer)")
    ap.add_argument("--device", default=None, help="device of the teacher-forced pass (default cuda when available)")
    return ap


def _hidden_size(model: str, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    return getattr(cfg, "hidden_size", None)


def sae_misfit(saes: dict, layers: list[int] | None, hidden: int | None) -> str | None:
    """Why the SAEs do not fit the model and the analysed layers (None: they do). Checked before an
    engine when the model is known then, else once a collection or run names it."""
    for l, s in saes.items():
        if hidden is not None and s.d_in != hidden:
            return f"the SAE of layer {l} reads {s.d_in} dimensions, the model's hidden size is {hidden}"
    if layers is not None and not set(saes) & set(layers):
        return f"SAEs for layers {sorted(saes)}, none among the analysed layers {layers} (see --layers)"
    return None


def main(argv=None) -> int:
    from ..profile import TaskLoadError, _collection, _late_step, _refuse_inputs, _validate

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = _args()
    a = ap.parse_args(argv)
    prog = "telltale signals"
    for flag, v, lo in (("--sae-expansion", a.sae_expansion, 1), ("--sae-epochs", a.sae_epochs, 1),
                        ("--top-features", a.top_features, 1), ("--bootstrap", a.bootstrap, 0)):
        if v < lo:
            ap.error(f"{flag} must be >= {lo}, got {v}")
    for flag, v in (("--sae-lr", a.sae_lr), ("--sae-l1", a.sae_l1)):
        if not v >= 0:
            ap.error(f"{flag} must be >= 0, got {v}")
    if a.run is not None:
        if a.collection is not None:
            ap.error("--run and --collection: give one source of generations")
        if not Path(a.run).expanduser().exists():
            ap.error(f"--run {a.run}: no such file or directory")
        checked = {"layers": None}
    else:
        checked = _validate(ap, a)
    out = Path(a.out).expanduser()
    why = unwritable(out, is_dir=True)
    if why:
        ap.error(f"--out {a.out}: {why}")
    fresh = a.collection is None and a.run is None
    dests = [out / n for n in OUTPUTS] + [out / "sae"] + ([out / "collection.npz"] if fresh else [])
    _refuse_inputs(ap, a, [("--out", p) for p in dests])
    if a.run is not None:
        run_dir = Path(a.run).expanduser().resolve()
        for p in dests:
            if p.resolve() == run_dir or p.resolve().is_relative_to(run_dir):
                ap.error(f"--out {a.out}: refusing to write inside the input run directory {a.run}")
    saes = None
    if a.sae is not None:
        try:
            saes = load_saes(a.sae)
        except SAEError as e:
            ap.error(f"--sae {e}")
        if fresh:
            why = sae_misfit(saes, checked["layers"], _hidden_size(a.model, a.trust_remote_code))
            if why:
                ap.error(f"--sae {a.sae}: {why}")
    if fresh:
        _check_thinking(ap, a)
    saved = None
    if a.run is not None:
        col = _from_run(ap, a)
    else:
        try:
            col, saved = _collection(prog, a, checked, out / "collection.npz")
        except TaskLoadError as e:
            ap.error(f"--tasks {a.tasks}: {e}")

    def finish():
        return run(col, a, saes, out, command="telltale signals " + shlex.join(argv))

    ok, res = _late_step(prog, saved, finish)
    if not ok:
        return 1
    paths, verdicts = res
    for v in verdicts:
        print(f"{prog}: {v['verdict']}: {v['claim']} ({v['evidence']})", file=sys.stderr)
    print(f"{prog}: wrote {', '.join(map(str, paths))}" + (f" (generations: {saved})" if saved else ""),
          file=sys.stderr)
    return 0


def _check_thinking(ap, a) -> None:
    """Before an engine: the study contrasts thinking with answering tokens, so the model must mark
    its thinking (``<think>`` … ``</think>``) and the generations must include thinking."""
    if a.thinking == "off":
        ap.error("--thinking off: the study contrasts thinking with answering tokens; use auto, both or on")
    from transformers import AutoTokenizer

    from ...tasksupport.scoring.process import think_tags

    opening, closing = think_tags()
    tok = AutoTokenizer.from_pretrained(a.model, trust_remote_code=a.trust_remote_code)
    template = str(getattr(tok, "chat_template", "") or "")
    if closing not in tok.get_vocab() and closing not in template:
        ap.error(f"--model {a.model}: its tokenizer has no {closing} token and its chat template no think block: the "
                 f"study needs a model that marks its thinking with {opening} … {closing} (other tags: "
                 "TELLTALE_THINK_START / TELLTALE_THINK_END)")


def _from_run(ap, a) -> dict:
    """``--run DIR`` as a collection, its layers from ``--layers`` (checked against the model)."""
    from ...config import ConfigError, parse_layers
    from ..runs import NoResultsError
    from .sources import collection_from_run

    def warn(msg):
        print(f"telltale signals: warning: {msg}", file=sys.stderr)

    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()] if a.tasks else None
    try:
        col = collection_from_run(a.run, model=a.model, limit=a.limit, tasks=tasks, warn=warn,
                                  trust_remote_code=a.trust_remote_code)
    except (NoResultsError, ValueError, OSError) as e:
        ap.error(f"--run {a.run}: {e}")
    n = int(col["meta"]["num_layers"])
    try:
        col["meta"]["layers"] = parse_layers(f"0-{n - 1}" if a.layers == "all" else a.layers, n)
    except ConfigError as e:
        ap.error(f"--layers {a.layers}: {e}")
    return col


def run(col: dict, a, saes: dict | None, out: Path, command: str | None = None):
    """Pass, SAEs, analysis and report for a collection; (written paths, verdicts)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from . import report
    from .analysis import analyze, row_labels
    from .sae import save_saelens, train_sae
    from .teacher import SignalPass, load_model

    meta, samples = col["meta"], col["samples"]
    if samples and "prompt_ids" not in samples[0]:
        raise ValueError("the collection has no prompt token ids (written by an older version): generate again")
    model = meta["model"]
    layers = [int(l) for l in meta["layers"]]
    trust = bool(getattr(a, "trust_remote_code", False))
    if saes is not None:
        why = sae_misfit(saes, layers, _hidden_size(model, trust))
        if why:
            raise ValueError(f"--sae {a.sae}: {why} (the collection's model {model})")
    tok = AutoTokenizer.from_pretrained(model, trust_remote_code=trust)
    if saes is not None:
        unused = sorted(set(saes) - set(layers))
        if unused:
            print(f"telltale signals: warning: SAEs for layers {unused} are not among the analysed layers {layers}; "
                  "unused (see --layers)", file=sys.stderr)
    keep = set(layers) if saes is None else set(saes) & set(layers)
    lm = load_model(model, a.device, trust, attention=not a.no_attention)
    sp = SignalPass(lm, layers, attention=not a.no_attention, keep=keep)
    passes, labels = [], []
    for s in tqdm(samples, desc="telltale signals: teacher-forced pass", unit="gen"):
        p = sp.run(s["prompt_ids"], s["token_ids"])
        passes.append(p)
        labels.append(row_labels(tok, s["prompt_ids"], s["token_ids"], len(p["position"])))
    dev = lm.get_output_embeddings().weight.device
    del lm, sp
    if saes is None:
        saes = {}
        bar = tqdm(total=len(layers) * a.sae_epochs, desc="telltale signals: training SAEs", unit="epoch")
        for l in layers:
            h = torch.cat([p["h"][l] for p in passes])
            saes[l] = train_sae(h, l, expansion=a.sae_expansion, epochs=a.sae_epochs, lr=a.sae_lr, l1=a.sae_l1,
                                seed=a.seed, progress=bar.update, device=dev)
            save_saelens(saes[l], out / "sae" / f"layers.{l}", model_name=str(model))
        bar.close()
    res = analyze({**meta, "sae": a.sae or "trained"}, samples, passes, labels, saes, layers,
                  top=a.top_features, n_boot=a.bootstrap, seed=a.seed, held_out=a.held_out)
    return report.write(res, out, command), res["verdicts"]
