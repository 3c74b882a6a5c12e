"""Sparse autoencoders for ``telltale signals``: load (SAELens or EleutherAI sparsify format),
train (the authors' kind: ReLU + L1), encode, select reasoning features, check the norm bound.

Formats read (one SAE per directory; ``--sae DIR`` may hold one, or one per layer in subdirectories):

- SAELens: ``cfg.json`` + ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae], ``b_enc``,
  ``W_dec`` [d_sae, d_in], ``b_dec``; ``threshold`` for ``jumprelu``), architectures ``standard``,
  ``jumprelu`` and ``topk``; the hook (``metadata.hook_name`` or ``hook_name``) must be a residual
  stream: ``blocks.N.hook_resid_post`` (or the module path ``model.layers.N``) is layer N,
  ``blocks.N.hook_resid_pre`` layer N − 1. The encoder input is h − b_dec when
  ``apply_b_dec_to_input``. ``normalize_activations``: ``none``, or ``expected_average_only_in``,
  which SAELens does not apply at run time (its one dataset-wide scale is folded into the weights,
  or a pretrained SAE's ``norm_scaling_factor`` that the caller must fold in). SAEs that normalise
  each token's input (``constant_norm_rescale``, ``layer_norm``) are refused: their features
  cannot depend on ‖h‖, so the norm claim cannot be tested with them.
- sparsify: ``cfg.json`` (``d_in``, ``k``) + ``sae.safetensors`` (``encoder.weight`` [d_sae, d_in],
  ``encoder.bias``, ``W_dec``, ``b_dec``); the directory name ``layers.N`` gives the layer (the
  output of decoder layer N); input h − b_dec, ReLU then the top k. Transcoders are refused.

``train_sae`` writes the SAELens format (``save_saelens``), which SAELens's ``SAE.load_from_disk``
reads. The bound (issue #37): for every encoder above, each feature's activation satisfies
|f_i| ≤ |w_i·x + b_i| ≤ ‖w_i‖‖x‖ + |b_i| with w_i the encoder column and x the encoder input;
``bound_ratio`` measures the largest |f_i| / (‖w_i‖‖x‖ + |b_i|), which must be ≤ 1.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: the authors' SAE shape and schedule (hidden × 4, 6 epochs, lr 1e-3) and reasoning-feature count
#: (40). Their λ_L1 (1e-3) is for a loss whose scale they do not state; in SAELens's convention
#: (``train_sae``) it leaves the codes dense (L0 ≈ 220 of 512 on the shipped model), so λ is 3
#: (L0 ≈ 4–7, FVU ≤ 0.08 there); ``--sae-l1 0.001`` gives their constant. Batch 32: the run's own
#: rows are few (thousands), and steps, not epochs, make a code sparse.
EXPANSION, EPOCHS, LR, L1, BATCH = 4, 6, 1e-3, 3.0, 32
TOP_FEATURES = 40
#: ε of the reasoning-feature ratio (think − answer) / (answer + ε)
RATIO_EPS = 1e-6
#: a reasoning feature fires on at least this share of the thinking rows (ours)
MIN_FREQ = 0.01
#: the SAELens config format written (its 6.x layout: settings at the top, the hook under ``metadata``)
SAELENS_FORMAT = "6.0.0"
SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, CFG = "sae_weights.safetensors", "sae.safetensors", "cfg.json"


class SAEError(ValueError):
    """An SAE directory that cannot be read or used (the message names the file and the reason)."""


@dataclass
class SAE:
    W_enc: torch.Tensor          # [d_in, d_sae]
    b_enc: torch.Tensor          # [d_sae]
    b_dec: torch.Tensor          # [d_in]
    W_dec: torch.Tensor | None   # [d_sae, d_in]
    layer: int | None
    kind: str = "relu"           # relu | jumprelu | topk
    threshold: torch.Tensor | None = None
    k: int | None = None
    subtract_b_dec: bool = False
    normalize: str = "none"      # as the SAE's config says (no run-time scaling either way)
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def encoder_input(self, h: torch.Tensor) -> torch.Tensor:
        x = h.float()
        return x - self.b_dec if self.subtract_b_dec else x

    def to(self, device) -> SAE:
        for k in ("W_enc", "b_enc", "b_dec", "W_dec", "threshold"):
            v = getattr(self, k)
            if v is not None:
                setattr(self, k, v.to(device))
        return self

    def encode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, d_in] → (feature activations [N, d_sae], encoder input x [N, d_in])."""
        x = self.encoder_input(h)
        pre = x @ self.W_enc + self.b_enc
        if self.kind == "jumprelu":
            f = pre * (pre > self.threshold)
        else:
            f = torch.relu(pre)
            if self.kind == "topk":
                top = f.topk(min(self.k, self.d_sae), dim=-1)
                f = torch.zeros_like(f).scatter_(-1, top.indices, top.values)
        return f, x

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec


# --------------------------------------------------------------------------------------------
# the bound and the reasoning features
# --------------------------------------------------------------------------------------------

def bound_ratio(acts: torch.Tensor, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> float:
    """The largest |f_i| / (‖w_i‖‖x‖ + |b_i|) over tokens and features (≤ 1 for a ReLU-family
    encoder; a larger value means the activations are not this encoder's)."""
    wn = torch.linalg.vector_norm(W_enc.float(), dim=0)
    xn = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
    bound = wn * xn + b_enc.float().abs()
    a = acts.float().abs()
    r = torch.where(bound > 0, a / bound.clamp_min(torch.finfo(torch.float32).tiny),
                    torch.where(a > 0, torch.full_like(a, math.inf), torch.zeros_like(a)))
    return float(r.max()) if r.numel() else 0.0


def reasoning_features(think_mean: torch.Tensor, answer_mean: torch.Tensor, top: int = TOP_FEATURES,
                       eps: float = RATIO_EPS, think_freq: torch.Tensor | None = None,
                       min_freq: float = MIN_FREQ) -> torch.Tensor:
    """The indices of the ``top`` features by (think − answer) / (answer + ε) mean activation (the
    paper's selection), among those more active while thinking than while answering and, given
    ``think_freq`` (the share of thinking rows where each fires), firing on at least ``min_freq``
    of the thinking rows (else the ratio favours features that almost never fire at all)."""
    ratio = (think_mean - answer_mean) / (answer_mean + eps)
    ok = think_mean > answer_mean
    if think_freq is not None:
        ok &= think_freq >= min_freq
    ratio = torch.where(ok, ratio, torch.full_like(ratio, -math.inf))
    n = min(top, int(ok.sum()))
    return ratio.topk(n).indices.sort().values if n else torch.zeros(0, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# training (the authors' kind) and the SAELens format
# --------------------------------------------------------------------------------------------

def train_sae(acts: torch.Tensor, layer: int, *, expansion: int = EXPANSION, epochs: int = EPOCHS, lr: float = LR,
              l1: float = L1, batch_size: int = BATCH, seed: int = 0, progress=None, device=None) -> SAE:
    """A ReLU SAE on ``acts`` [N, d], SAELens's conventions: the inputs scaled by one constant so that
    their mean norm is √d, loss = Σ_d (x̂ − x)² + λ·Σ_i |f_i|·‖W_dec,i‖ (mean over the batch), Adam,
    decoder rows at unit norm after each step, encoder initialised as the decoder's transpose, b_dec
    at the mean. The scale is folded into the saved weights, so the SAE reads raw h. ``info``
    records the settings, the fraction of variance unexplained, the mean L0 and the dead fraction.
    ``device``: where it trains (the draws stay on the CPU generator: the same SAE anywhere up to
    float rounding); the SAE returned lives on the CPU."""
    g = torch.Generator().manual_seed(seed)
    raw = acts.float().to(device) if device is not None else acts.float()
    dev = raw.device
    n, d = raw.shape
    scale = math.sqrt(d) / float(torch.linalg.vector_norm(raw, dim=-1).mean().clamp_min(1e-12))
    x = raw * scale
    k = d * expansion
    W_dec = torch.randn(k, d, generator=g).to(dev)
    W_dec /= torch.linalg.vector_norm(W_dec, dim=1, keepdim=True)
    params = {"W_enc": W_dec.t().clone(), "b_enc": torch.zeros(k, device=dev), "W_dec": W_dec, "b_dec": x.mean(0)}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(dev)
        for i in range(0, n, batch_size):
            xb = x[order[i:i + batch_size]]
            f = torch.relu((xb - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
            rec = f @ params["W_dec"] + params["b_dec"]
            sparsity = (f * torch.linalg.vector_norm(params["W_dec"], dim=1)).sum(-1).mean()
            loss = (rec - xb).square().sum(-1).mean() + l1 * sparsity
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                params["W_dec"] /= torch.linalg.vector_norm(params["W_dec"], dim=1, keepdim=True).clamp_min(1e-8)
        if progress is not None:
            progress()
    p = {k_: v.detach() for k_, v in params.items()}
    sae = SAE(p["W_enc"] * scale, p["b_enc"], p["b_dec"] / scale, p["W_dec"] / scale, layer,
              subtract_b_dec=True, source="trained")
    with torch.no_grad():
        f, _ = sae.encode(raw)
        fvu = float((sae.decode(f) - raw).square().sum() / (raw - raw.mean(0)).square().sum().clamp_min(1e-12))
        l0 = float((f > 0).float().sum(-1).mean())
        dead = float(((f > 0).sum(0) == 0).float().mean())
    sae.to("cpu")
    sae.info = {"trained_on_tokens": n, "d_in": d, "d_sae": k, "expansion": expansion, "epochs": epochs, "lr": lr,
                "l1": l1, "batch_size": batch_size, "seed": seed, "input_scale": scale, "fvu": fvu, "l0": l0,
                "dead_fraction": dead}
    return sae


def save_saelens(sae: SAE, path: str | Path, model_name: str = "") -> Path:
    """``cfg.json`` + ``sae_weights.safetensors`` in SAELens's format (architecture ``standard``,
    hook ``blocks.<layer>.hook_resid_post``, the training settings under ``metadata``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hook = f"blocks.{sae.layer}.hook_resid_post"
    save_file({"W_enc": sae.W_enc.contiguous(), "b_enc": sae.b_enc.contiguous(), "W_dec": sae.W_dec.contiguous(),
               "b_dec": sae.b_dec.contiguous()}, str(path / SAELENS_WEIGHTS))
    cfg = {"architecture": "standard", "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": sae.subtract_b_dec, "normalize_activations": sae.normalize,
           "reshape_activations": "none",
           # SAELens ≥ 6 reads ``metadata`` when it names a 6.x format; older readers read the top-level hook
           "hook_name": hook, "hook_layer": sae.layer,
           "metadata": {"sae_lens_version": SAELENS_FORMAT, "hook_name": hook, "model_name": model_name,
                        "telltale_training": sae.info}}
    (path / CFG).write_text(json.dumps(cfg, indent=1) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

def _layer_of_hook(hook: str) -> int | None:
    m = re.fullmatch(r"(?:model\.)?layers\.(\d+)", hook or "")  # a decoder layer's output (HF module path)
    if m:
        return int(m.group(1))
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post)", hook or "")
    if not m:
        return None
    return int(m.group(1)) - (1 if m.group(2) == "pre" else 0)


def _load_saelens(d: Path, cfg: dict) -> SAE:
    from safetensors.torch import load_file

    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "jumprelu", "topk"):
        raise SAEError(f"{d}: SAELens architecture {arch!r} is not supported (standard, jumprelu, topk)")
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise SAEError(f"{d}: normalize_activations {norm!r} rescales each token's input, so its features cannot "
                       "depend on ‖h‖ and the norm claim cannot be tested with it (none, expected_average_only_in)")
    if (cfg.get("reshape_activations") or "none") != "none":
        raise SAEError(f"{d}: reshape_activations {cfg['reshape_activations']!r}: not a residual-stream SAE")
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name") or ""
    layer = _layer_of_hook(hook)
    if layer is None or layer < 0:
        raise SAEError(f"{d}: hook {hook!r} is not a decoder layer's residual stream "
                       "(blocks.N.hook_resid_post or model.layers.N, or blocks.N.hook_resid_pre with N ≥ 1)")
    w = load_file(str(d / SAELENS_WEIGHTS))
    missing = [k for k in ("W_enc", "b_enc", "b_dec") if k not in w]
    if missing:
        raise SAEError(f"{d / SAELENS_WEIGHTS}: missing {', '.join(missing)}")
    if arch == "jumprelu" and "threshold" not in w:
        raise SAEError(f"{d / SAELENS_WEIGHTS}: a jumprelu SAE without its threshold")
    k = cfg.get("k")
    if arch == "topk" and not k:
        raise SAEError(f"{d / CFG}: a topk SAE without k")
    return SAE(w["W_enc"].float(), w["b_enc"].float(), w["b_dec"].float(),
               w["W_dec"].float() if "W_dec" in w else None, layer,
               kind={"standard": "relu"}.get(arch, arch), threshold=w.get("threshold"),
               k=int(k) if k else None, subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
               normalize=norm, source=f"saelens:{d}",
               info={"hook_name": hook, **({"note": "normalize_activations expected_average_only_in: SAELens "
                                                    "applies no run-time scale; a pretrained norm_scaling_factor "
                                                    "must be folded into the weights"}
                                          if norm != "none" else {})})


def _load_sparsify(d: Path, cfg: dict) -> SAE:
    from safetensors.torch import load_file

    if cfg.get("transcode"):
        raise SAEError(f"{d}: a sparsify transcoder, not an autoencoder of the residual stream")
    if (cfg.get("activation") or "topk") != "topk":
        raise SAEError(f"{d}: sparsify activation {cfg.get('activation')!r} is not supported (topk)")
    m = re.fullmatch(r"(?:model\.)?layers\.(\d+)", d.name)
    if not m:
        raise SAEError(f"{d}: a sparsify SAE's directory is named after its hookpoint, layers.N")
    w = load_file(str(d / SPARSIFY_WEIGHTS))
    if "encoder.weight" not in w or "b_dec" not in w:
        raise SAEError(f"{d / SPARSIFY_WEIGHTS}: missing encoder.weight or b_dec")
    return SAE(w["encoder.weight"].float().t().contiguous(), w["encoder.bias"].float(), w["b_dec"].float(),
               w["W_dec"].float() if "W_dec" in w else None, int(m.group(1)), kind="topk", k=int(cfg.get("k") or 32),
               subtract_b_dec=True, source=f"sparsify:{d}", info={"hookpoint": d.name})


def load_saes(path: str | Path) -> dict[int, SAE]:
    """Every SAE in ``path`` (a directory with one, or with one per subdirectory), by layer."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SAEError(f"{path}: not a directory")
    dirs = [root] if (root / CFG).is_file() else sorted(p for p in root.iterdir() if (p / CFG).is_file())
    if not dirs:
        raise SAEError(f"{path}: no SAE here (a cfg.json with sae_weights.safetensors (SAELens) or "
                       "sae.safetensors (sparsify), in the directory or its subdirectories)")
    out: dict[int, SAE] = {}
    for d in dirs:
        try:
            cfg = json.loads((d / CFG).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SAEError(f"{d / CFG}: cannot read it ({e})") from None
        if (d / SAELENS_WEIGHTS).is_file():
            sae = _load_saelens(d, cfg)
        elif (d / SPARSIFY_WEIGHTS).is_file():
            sae = _load_sparsify(d, cfg)
        else:
            raise SAEError(f"{d}: cfg.json without {SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify)")
        if sae.layer in out:
            raise SAEError(f"{path}: two SAEs for layer {sae.layer} ({out[sae.layer].source}, {sae.source})")
        out[sae.layer] = sae
    return out
