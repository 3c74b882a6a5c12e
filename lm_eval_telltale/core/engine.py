"""The engine-agnostic per-step pipeline.

Per forward step an adapter calls::

    core.begin(step_map)                 # once
    h, r = core.layer(j, h, r, rerun)    # after each patched layer j (0..len(layers)-1)
    core.end()                           # once: feeds thresholds, keeps the step's rows on the device

and, when it collects finished requests, ``core.drain()`` (the rows of every step since, on the
host). ``layer`` computes the residual-stream norm ‖h + r‖ (float32) per token, looks up τ for each
token's request and layer, and lets the method transform (h, r). Everything is tensor work over
the whole step: no Python loop over tokens or requests, no host sync in a step (ALRR's "skip the
re-run" test, :meth:`CoreEngine.any`, is the one host decision a method may take).
"""

from __future__ import annotations

from typing import Callable

import torch

from .collect import StepRows
from .state import SlotTable
from .stats import EV_ABOVE
from .step import StepMap, finish_step
from .thresholds import Thresholds

Rerun = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class HookWiringError(RuntimeError):
    """An adapter's hooks did not run as wired (a hook traced away, a wrong runner, rows out of
    sync): the step's statistics would be silently wrong, so it fails instead."""


def residual_norm(h: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, ‖x‖) with x = h + r in float32 — the residual stream after the layer."""
    x = h.float() if r is None else h.float() + r.float()
    return x, torch.linalg.vector_norm(x, dim=-1)


class Method:
    """Observe only (``vllm-norms``). Subclasses override :meth:`apply`."""

    name = "norms"
    #: True when the method may change (h, r); the trace then also records the output norm
    modifies = False
    #: extra float32 per-(token, layer) columns of the step record: ``core.columns[name]`` is an
    #: [N, L] buffer (NaN-filled at ``begin``) the method writes into; the columns travel with the
    #: trace rows and :meth:`summarize_columns` turns a request's rows into per-layer statistics
    columns: tuple[str, ...] = ()
    #: True when the adapter should pass each step's sampling logits to :meth:`observe_logits`
    wants_logits = False

    #: whether :meth:`apply` runs as a compiled kernel (None: a method with no step of its own to
    #: compile; subclasses that have one start at False and set it in :meth:`fuse`)
    fused: bool | None = None

    def __init__(self, cfg, table: SlotTable, num_layers: int, device=None):
        self.cfg = cfg
        self.table = table
        self.L = num_layers
        self.device = device

    @classmethod
    def observes_only(cls) -> bool:
        """Whether the method never changes (h, r): it keeps the base :meth:`apply`. An adapter may
        then compute ‖h + r‖ itself (inside a compiled graph) and hand the core only the norm
        (:meth:`CoreEngine.observe`)."""
        return cls.apply is Method.apply and not cls.modifies

    def fuse(self) -> None:
        """Compile :meth:`apply`'s operations from now on (:meth:`CoreEngine.fuse`), where the method
        has a per-layer step worth it; the same numbers bit for bit."""

    def apply(self, core: "CoreEngine", j: int, h: torch.Tensor, r: torch.Tensor, x: torch.Tensor,
              n: torch.Tensor, tau: torch.Tensor, rerun: Rerun | None):
        """Return (h', r', events) for patched layer ``j``; ``events``: int16 [N] bits or None."""
        return h, r, None

    def summarize_columns(self, position, cols: dict, events, layers: list[int]) -> dict[str, dict]:
        """Per-layer statistics ``{str(layer): {...}}`` from one request's rows (numpy, token
        order): ``position`` [T], ``cols[name]`` [T, L] for each of :attr:`columns`, ``events``
        [T, L]. Merged into the request's ``layers`` record."""
        return {}

    def summary(self) -> dict:
        return {}

    def observe_logits(self, slots: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor) -> None:
        """``logits`` [R, vocab] of the step's rows (before any processing); ``slots`` [R] the rows'
        request slots; ``keep`` [R] rows whose sampled token is kept (not a partial prefill). A
        method may change ``logits`` in place (online LRS forces a stopped candidate's last token)."""

    def end_step(self, core: "CoreEngine", step: StepMap) -> None:
        """After every patched layer of a step ran (``core.norm``, ``core.tau`` [N, L] complete),
        before the thresholds are fed: per-step tensor work of the method (online LRS's norm window)."""

    def slot_values(self, extra: dict) -> dict:
        """Per-request settings a request carries in its extra arguments (vLLM's
        ``SamplingParams.extra_args``, the hf loop's ``GenRequest.extra_args``) as slot-table values
        ``{tensor name: value}`` for :meth:`SlotTable.acquire`."""
        return {}

    def read_slot(self, slot: int) -> dict:
        """Per-request results the method holds in slot tensors, read before the slot is reused."""
        return {}


class CoreEngine:
    def __init__(self, layers: list[int], method: Method, thresholds: Thresholds, table: SlotTable):
        self.layers = list(layers)
        self.L = len(self.layers)
        self.method = method
        self.thr = thresholds
        self.table = table
        self.step: StepMap | None = None
        self.layer_calls = 0
        self._rows: StepRows | None = None
        table.on_resize(thresholds.resize)
        table.on_reset(thresholds.reset_slot)

    def fuse(self) -> None:
        """Run the per-step threshold update, and the method's per-layer step where it has one
        (ERSS), as compiled kernels (:mod:`~lm_eval_telltale.core.fuse`): the same results, fewer
        small operations. Adapters call it when their model runs compiled."""
        self.thr.fuse()
        self.method.fuse()

    @property
    def fused(self) -> bool:
        """Whether the threshold update runs compiled (False in eager adapters, fixed/calibrated τ,
        or after a compile failure fell back to the plain operations)."""
        return self.thr.fused

    @property
    def method_fused(self) -> bool | None:
        """Whether the method's per-layer step runs compiled; None for a method without one."""
        return self.method.fused

    def any(self, mask: torch.Tensor) -> bool:
        """Whether any element of ``mask`` is set — the one host-side decision a method may take
        (ALRR's "skip the re-run" test). Adapters whose ranks must take it together (tensor
        parallelism: every rank runs the layer's collectives) replace it with a collective version."""
        return bool(mask.any())

    def begin(self, step: StepMap) -> None:
        self.step = step
        self.layer_calls = 0
        n = step.num_tokens
        dev = step.slot.device
        tau_s = self.thr.tau_slots()
        if tau_s.shape[0] == 1:
            tau = tau_s.expand(n, self.L)
        else:
            tau = tau_s[step.slot.clamp(min=0)]
        # τ only for generated tokens (NaN compares False everywhere: no decision elsewhere)
        self.tau = torch.where(step.decode[:, None], tau, torch.full_like(tau, float("nan")))
        self.norm = torch.zeros(n, self.L, dtype=torch.float32, device=dev)
        self.event = torch.zeros(n, self.L, dtype=torch.int16, device=dev)
        self.norm_out = torch.zeros(n, self.L, dtype=torch.float32, device=dev) if self.method.modifies else None
        self.columns = {c: torch.full((n, self.L), float("nan"), dtype=torch.float32, device=dev)
                        for c in self.method.columns}

    def layer(self, j: int, h: torch.Tensor, r: torch.Tensor, rerun: Rerun | None = None):
        x, n = residual_norm(h, r)
        self.observe(j, n)
        h2, r2, mev = self.method.apply(self, j, h, r, x, n, self.tau[:, j], rerun)
        if mev is not None:
            self.event[:, j] = mev  # "above τ" is added for every layer at once in end()
        if self.norm_out is not None:
            self.norm_out[:, j] = residual_norm(h2, r2)[1]
        return h2, r2

    def observe(self, j: int, n: torch.Tensor) -> None:
        """Record patched layer ``j``'s norm ‖h + r‖ (:func:`residual_norm`) and count its hook.
        :meth:`layer` starts with it; an adapter calls it alone for a method that only observes
        (:meth:`Method.observes_only`), with the norm it computed itself."""
        assert self.step is not None, "CoreEngine.layer/observe called outside a step"
        self.layer_calls += 1
        self.norm[:, j] = n

    def end(self) -> None:
        """Feed the thresholds and keep this step's rows of new generated tokens on the device (the
        integer and the float columns each packed into one tensor; :class:`StepRows`)."""
        step = self.step
        assert step is not None
        self.event |= torch.where(self.norm > self.tau, EV_ABOVE, 0).to(torch.int16)
        self.method.end_step(self, step)
        self.thr.update(step.slot, self.norm, step.new)
        finish_step(self.table, step)
        ints = torch.cat([self.table.t["serial"][step.slot.clamp(min=0)][:, None], step.position[:, None],
                          self.event.to(torch.int64)], 1)
        parts = [self.norm, self.tau] + ([self.norm_out] if self.norm_out is not None else []) + list(self.columns.values())
        if self._rows is None:
            names = ["norm", "tau"] + (["norm_out"] if self.norm_out is not None else []) + list(self.columns)
            self._rows = StepRows(names, self.L, step.slot.device)
        self._rows.append(ints, torch.cat(parts, 1), step.new, step.rows or step.num_tokens)
        self.step = None

    def drain(self) -> list[dict[str, torch.Tensor]]:
        """The rows of new generated tokens of every step since the last drain, on the host (row
        dicts in step order; the collection path, one host sync)."""
        return [] if self._rows is None else self._rows.drain()


def build_core(cfg, capacity: int = 64, device=None) -> CoreEngine:
    """The core engine for a resolved :class:`~lm_eval_telltale.config.TelltaleConfig`: slot table,
    thresholds in ``cfg.tau_mode`` and the method's tensor operation. Every adapter (and every
    test) builds it here."""
    from .methods import make_method

    table = SlotTable(capacity, device=device)
    thr = Thresholds(cfg.tau_mode, len(cfg.layers), table.capacity, iqr_k=cfg.iqr_k, min_iqr=cfg.min_iqr,
                     tau_floor=cfg.tau_floor, warmup=cfg.warmup, tau_values=cfg.tau_values, device=device)
    method = make_method(cfg, table, len(cfg.layers), device)
    return CoreEngine(cfg.layers, method, thr, table)
