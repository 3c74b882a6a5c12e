"""Worker-side runtime: one per engine (per worker process), owned by the Telltale worker.

It glues vLLM's V1 runner to the engine-agnostic core:

- request identity: the worker tags every new request's ``SamplingParams.extra_args`` with its
  engine request id (``telltale_rid``) before the runner sees it;
- row order: :class:`~lm_eval_telltale.vllm.rows.TelltaleRowMirror`, a V1 logits processor, gets
  the runner's ``BatchUpdate`` (removed / added / moved) before every forward and keeps
  ``row_slot`` — the request slot of each batch row — up to date incrementally (O(changes));
- token → row: ``query_start_loc`` from the forward context's attention metadata;
- lifecycle: slots are released when the scheduler reports a request finished or aborted
  (``finished_req_ids``), never on preemption (preempted rows come back as ``added`` with the same
  tag and find their slot);
- results: per-token rows of generated tokens are kept on the host until the driver collects
  them (``collective_rpc("telltale_collect")``), then summarised per request.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np
import torch

from ..config import TelltaleConfig
from ..core.collect import empty_rows, request_record, take_rows, trim_rows
from ..core.engine import HookWiringError, build_core
from ..core.rng import prompt_identity, request_seed
from ..core.state import SlotInfo
from ..core.step import sampling_rows
from . import ops
from .graph import GraphStep, in_graph
from .kvguard import no_kv_write

logger = logging.getLogger("lm_eval_telltale")

RID_KEY = "telltale_rid"   # engine request id, set by the worker
TAG_KEY = "telltale_tag"   # caller's tag (lm-eval instance / LRS candidate), set by the driver


def model_compiles(vllm_config) -> bool:
    """Whether vLLM compiles the model (its default; not with ``enforce_eager=True``)."""
    if getattr(vllm_config.model_config, "enforce_eager", False):
        return False
    mode = getattr(vllm_config.compilation_config, "mode", None)
    return mode is not None and int(getattr(mode, "value", mode)) != 0


def _host_timed(fn):
    """Add the host time a hook body takes to the runtime's ``hook_s`` (what telltale adds to a step
    on the host, reported by ``telltale_state`` and ``telltale bench``); while a sync audit is on
    (:meth:`VllmRuntime.audit`), the body runs under it."""

    @functools.wraps(fn)
    def timed(self, *args):
        t0 = time.perf_counter()
        try:
            if self._audit is None:
                return fn(self, *args)
            with self._audit:
                return fn(self, *args)
        finally:
            self.hook_s += time.perf_counter() - t0

    return timed


class VllmRuntime:
    def __init__(self, cfg: TelltaleConfig, vllm_config, device: torch.device, runner, layers):
        self.cfg = cfg
        self.device = device
        self.runner = runner  # vLLM's V1 model runner: query_start_loc and num_reqs of each step
        self.layers = list(layers)  # the patched layer modules (ALRR re-runs them)
        self._positions = None
        sched = vllm_config.scheduler_config
        cap = max(8, 2 * int(getattr(sched, "max_num_seqs", 64) or 64))
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("telltale: speculative decoding is not supported (several new tokens per request per step)")
        self.engine_seed = int(getattr(vllm_config.model_config, "seed", 0) or 0)
        self.core = build_core(cfg, cap, device)
        self.table, self.method = self.core.table, self.core.method
        # the in-graph step (vllm/graph.py): the whole step inside the model's forward, on static
        # buffers; else the ops' path, with the end of each step compiled where the model is
        self.graph = None
        self.compiled = model_compiles(vllm_config)
        par = vllm_config.parallel_config
        if getattr(par, "use_ubatching", False):  # the ops' path also checks each step's attention metadata
            raise HookWiringError("telltale: micro-batching (enable_dbo / ubatch_size) is not supported")
        if in_graph(cfg, par.tensor_parallel_size, par.pipeline_parallel_size):
            self.graph = GraphStep(self.core, runner.query_start_loc.gpu, int(runner.max_num_tokens),
                                   int(vllm_config.model_config.get_hidden_size()), runner.input_ids.gpu)
        elif self.compiled:
            self.core.fuse()
        # tensor parallelism: every rank holds the same (h, r) and runs the same decisions (checked
        # each step); rank 0 alone keeps the rows, and a host-side decision is taken together
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        self.tp_rank, self.tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        self.records = self.tp_rank == 0
        self.step_digest = 0.0  # a running digest of every step's norms and events (the TP check)
        if self.tp_size > 1:
            self.core.any = self._tp_any
        self._sampling_rows = None
        self._graph_rows, self._graph_slots = 0, None  # the in-graph step's rows of the running step
        self.row_slot = np.full(cap, -1, dtype=np.int64)
        self.num_rows = 0
        self.step_active = False
        self.steps = 0
        self.hook_s = 0.0  # host seconds spent in the hooks' bodies (begin/end of step, layers, logits)
        self._audit = None  # a SyncAudit while `telltale bench` counts the syncs of the hooks
        self._audit_steps = 0
        self.begin_calls = 0
        self.resumed = 0
        self.dropped_after_end = 0  # rows of forwards run after an answer had ended
        self._log: list[dict[str, torch.Tensor]] = []
        self._infos: dict[int, SlotInfo] = {}       # serial -> info, until collected
        self._finished: set[int] = set()

    # -- lifecycle (worker.execute_model, before the runner) ------------------------------------
    def on_schedule(self, scheduler_output) -> None:
        for nr in scheduler_output.scheduled_new_reqs:
            sp = getattr(nr, "sampling_params", None)
            if sp is None:
                continue
            extra = dict(sp.extra_args or {})
            extra[RID_KEY] = nr.req_id
            sp.extra_args = extra
        for rid in scheduler_output.finished_req_ids:
            info = self.table.by_key.get(rid)
            if info is not None:
                self._snapshot(info)
                self.table.release(rid)
                self._finished.add(info.serial)

    def _snapshot(self, info: SlotInfo) -> None:
        """Copy slot-held per-request results into the request's info before its slot is reused."""
        if not info.meta.get("_read"):
            if self.graph is not None:  # values the next forward would fold (GraphStep.defer)
                self.graph.flush()
            info.meta.update(self.method.read_slot(info.slot))
            info.meta["_read"] = True

    # -- row mirror (logits processor update_state, inside the runner, before the forward) ------
    def apply_batch_update(self, bu) -> None:
        if bu is not None:
            self._mirror(bu)
        if self.graph is not None and self.step_active:
            self._graph_begin()

    def _mirror(self, bu) -> None:
        rs = self.row_slot
        if bu.batch_size > rs.shape[0] or any(i >= rs.shape[0] for i, *_ in bu.added):
            n = max(bu.batch_size, *(i + 1 for i, *_ in bu.added), 2 * rs.shape[0])
            self.row_slot = rs = np.concatenate([rs, np.full(n - rs.shape[0], -1, dtype=np.int64)])
        for i in bu.removed:
            rs[i] = -1
        for i, params, prompt_ids, _out in bu.added:
            extra = (params.extra_args or {}) if params is not None else {}
            rid = extra.get(RID_KEY)
            if rid is None:
                raise HookWiringError("telltale: a request reached the batch without the worker's tag; "
                                      "the Telltale worker class (worker_cls) is not in use")
            if prompt_ids is None:
                raise HookWiringError("telltale: prompt token ids unavailable (prompt embeddings are not supported)")
            if rid in self.table.by_key:
                self.resumed += 1  # back after preemption: keeps its slot and state
            tag = extra.get(TAG_KEY)
            # the request's identity for random draws: caller's seed, else its prompt — never its row
            identity = extra.get("telltale_seed", prompt_identity(prompt_ids))
            info = self.table.acquire(
                rid, prompt_len=len(prompt_ids),
                seed=request_seed(self.engine_seed, identity, getattr(params, "seed", None)),
                tag=tag, meta={"prompt_len": len(prompt_ids)}, enabled=bool(extra.get("telltale_enable", True)),
                values=self.method.slot_values(extra),
            )
            self._infos.setdefault(info.serial, info)
            rs[i] = info.slot
        for a, b, direction in bu.moved:
            if direction.name == "SWAP":
                rs[a], rs[b] = rs[b], rs[a]
            else:
                rs[b] = rs[a]
                rs[a] = -1
        self.num_rows = bu.batch_size

    # -- the in-graph step's host part (vllm/graph.py) ----------------------------------------------
    def _rows_in_step(self) -> int:
        """The step's batch rows, checked against the row mirror."""
        rows = int(self.runner.input_batch.num_reqs)
        if rows != self.num_rows:
            raise HookWiringError(f"telltale: row mirror out of sync ({self.num_rows} mirrored rows, {rows} in the step)")
        if rows and self.row_slot[:rows].min() < 0:
            raise HookWiringError("telltale: a batch row has no request slot (row mirror out of sync)")
        return rows

    @_host_timed
    def _graph_begin(self) -> None:
        """Before the forward (the runner's batch update, every step): the row → slot map into the
        graph's buffer and room in the rows' buffer (host arithmetic; it drains when it could fill)."""
        rows = self._rows_in_step()
        self.core.reserve(rows)
        self._graph_slots = self.graph.begin(self.row_slot[:rows], slots=self.method.wants_logits)
        self._graph_rows = rows
        self.begin_calls += 1

    @_host_timed
    def graph_end(self, num_scheduled_tokens: int) -> None:
        """After the worker's ``execute_model``: the sampling rows of the step that ran (the runner's
        positions and ``query_start_loc`` still hold it), ``row_slot`` reset (a forward outside a
        step sees no request), the step counted for the layers' check."""
        rows, slots = self._graph_rows, self._graph_slots
        self._graph_rows, self._graph_slots = 0, None
        ran = num_scheduled_tokens > 0 and rows > 0
        if ran:
            self.steps += 1
            self._audit_steps += self._audit is not None
            if self.method.wants_logits:  # the step's sampling rows' slots (their keep and last position: in the graph)
                self._sampling_rows = (slots, None, None)
        self.graph.end(ran)

    # -- model forward (the ops' path) -------------------------------------------------------------
    @_host_timed
    def begin_step(self, positions: torch.Tensor, input_ids: torch.Tensor | None = None) -> None:
        from vllm.forward_context import get_forward_context

        if isinstance(get_forward_context().attn_metadata, list):  # ubatching
            raise HookWiringError("telltale: micro-batching (list attention metadata) is not supported")
        # token → row: the runner's query_start_loc for this step (every attention backend's
        # metadata is built from it; FlashInfer's does not carry it)
        rows = self._rows_in_step()
        qsl = self.runner.query_start_loc.gpu[: rows + 1]
        row_slot = torch.from_numpy(self.row_slot[:rows].copy()).to(positions.device, non_blocking=True)
        self.core.start(qsl, row_slot, positions, input_ids)
        self._positions = positions
        ops.activate(self)
        self.begin_calls += 1
        if self.method.wants_logits and rows:  # the step's sampling rows for apply_logits
            self._sampling_rows = (row_slot, *sampling_rows(positions, qsl, row_slot, self.table.t["prompt_len"]))

    @_host_timed
    def apply_logits(self, logits: torch.Tensor) -> None:
        """Row mirror's ``apply``: the step's raw logits for methods that use them (LRS)."""
        if self._sampling_rows is None:
            return
        slots, keep, last = self._sampling_rows
        self._sampling_rows = None
        if logits.shape[0] != slots.shape[0]:
            raise HookWiringError(f"telltale: {logits.shape[0]} logits rows for {slots.shape[0]} batch rows")
        if self.graph is not None:  # folded by the next forward, in its graph (GraphStep.defer)
            self.graph.defer(slots, self.method.logits_values(slots, logits))
        else:
            self.method.observe_logits(slots, logits, keep, last)

    @_host_timed
    def post_layer(self, j: int, h: torch.Tensor, r: torch.Tensor) -> None:
        """The body of ``telltale::post_layer`` after patched layer ``j``: the core's decision and
        the method's tensor operation, written back into (h, r) in place."""
        layer, positions = self.layers[j], self._positions

        def rerun(h_in, r_in):
            # the same layer again on (h_in, r_in), with its KV-cache write suppressed
            with no_kv_write(layer):
                return layer.forward(positions, h_in, r_in)

        h2, r2 = self.core.layer(j, h, r, rerun)
        if h2 is not h:
            h.copy_(h2)
        if r2 is not r:
            r.copy_(r2)

    @_host_timed
    def observe_layer(self, j: int, n: torch.Tensor) -> None:
        """The body of ``telltale::observe_norm`` after patched layer ``j`` (observe-only methods):
        the norm the traced graph computed."""
        self.core.observe(j, n)

    @_host_timed
    def end_step(self) -> None:
        ops.deactivate()
        self._positions = None
        self.core.end()
        if self.tp_size > 1:
            self._check_tp_ranks()
        self.steps += 1
        self._audit_steps += self._audit is not None

    def _drain(self) -> None:
        """The steps' rows from the device into the host log (when requests are collected)."""
        if self.graph is not None:
            self.graph.check()
        rows = self.core.drain()
        if self.records:
            self._log.extend(rows)

    def _tp_any(self, mask: torch.Tensor) -> bool:
        """A decision every tensor-parallel rank takes together (a rank that alone re-ran a layer
        would wait forever in that layer's all-reduce)."""
        from vllm.distributed import get_tp_group

        flag = get_tp_group().all_reduce(mask.any().to(torch.float32).reshape(1))
        return bool(flag.item() > 0)

    def _check_tp_ranks(self) -> None:
        """Every rank must have seen the same norms and taken the same decisions this step (their
        (h, r) are the same all-reduce results): compare a digest, fail loudly if not."""
        from vllm.distributed import get_tp_group

        core = self.core
        parts = [core.norm.sum(), core.event.to(torch.float32).sum()]
        if core.norm_out is not None:
            parts.append(core.norm_out.sum())
        digest = torch.stack(parts).to(torch.float32)  # (the CPU all-gather takes no float64)
        allv = get_tp_group().all_gather(digest.reshape(1, -1), dim=0).cpu()
        if not torch.equal(allv, allv[:1].expand_as(allv)):
            raise HookWiringError(f"telltale: tensor-parallel ranks diverged in step {self.steps} (norms/events "
                                  f"per rank: {allv.tolist()}); their statistics and interventions would differ")
        self.step_digest += float(digest.sum())

    def check_step(self, num_scheduled_tokens: int) -> None:
        """Called by the worker after each execute_model: a real step must have run every hook."""
        if num_scheduled_tokens <= 0:
            return
        # the in-graph step's layers are counted on the device (checked at drain: GraphStep.check)
        calls = len(self.cfg.layers) if self.graph is not None else self.core.layer_calls
        if self.begin_calls != 1 or calls != len(self.cfg.layers):
            raise HookWiringError(
                f"telltale: hooks did not fire as wired in this step (model forward hook ran {self.begin_calls}x, "
                f"{calls} of {len(self.cfg.layers)} layer hooks). A hook was traced away by torch.compile or skipped "
                "by a FULL CUDA graph (the telltale op must be a splitting op with piecewise graphs), or the model "
                "runner is not one the plugin supports; enforce_eager=True runs without compilation.")

    def reset_step_counters(self) -> None:
        self.begin_calls = 0
        self.core.layer_calls = 0

    # -- driver RPCs -----------------------------------------------------------------------------
    def _rows(self, serials: set[int]) -> dict[int, dict[str, np.ndarray]]:
        self._drain()
        rows, self._log = take_rows(self._log, serials)
        return rows

    def collect(self, tags: list[str] | None = None, lengths: list[int] | None = None) -> list[dict[str, Any]]:
        """Summaries for requests with these caller tags (None: every finished request).
        Collected requests are forgotten (their slot is released if still held).

        ``lengths`` (one per tag): the number of tokens the request generated. A generated token is
        fed back only while the answer goes on, so the last fed position is prompt_len + length − 2;
        rows past it come from a forward the engine ran after the request had stopped (async
        scheduling plans a step before the previous step's stop token is known; a stop string is
        found by the frontend after the engine went on) and are dropped, and what such a forward
        added to the method's own per-request results is taken back (:meth:`Method.trim_meta`)."""
        if tags is None:
            chosen = [i for s, i in self._infos.items() if s in self._finished]
        else:
            want = set(tags)
            chosen = [i for i in self._infos.values() if i.tag in want]
        last_fed = {}
        if tags is not None and lengths is not None:
            if len(lengths) != len(tags):
                raise ValueError(f"telltale_collect: {len(tags)} tags but {len(lengths)} lengths")
            n_out = dict(zip(tags, lengths))
            last_fed = {i.serial: int(i.meta["prompt_len"]) + int(n_out[i.tag]) - 2 for i in chosen}
        rows = self._rows({i.serial for i in chosen})
        for serial, limit in last_fed.items():
            r = rows.get(serial)
            if r is not None:
                rows[serial], dropped = trim_rows(r, limit)
                self.dropped_after_end += dropped
        out = []
        layers = self.cfg.layers
        for info in chosen:
            r = rows.get(info.serial)
            if r is None:
                r = empty_rows(len(layers), self.method.columns)
            if info.key in self.table.by_key:
                self._snapshot(info)
            if info.serial in last_fed:  # the method's own results over the answer's positions only
                info.meta.update(self.method.trim_meta(info.meta, last_fed[info.serial]))
            out.append(request_record(info, r, layers, self.method, self.cfg.record_tokens))
            self._infos.pop(info.serial, None)
            self._finished.discard(info.serial)
            self.table.release(info.key)
        return out if self.records else []  # tensor-parallel ranks > 0: rank 0's records stand for them

    def audit(self, on: bool) -> dict[str, Any] | None:
        """Count the syncing operations of the hooks' bodies (:class:`~lm_eval_telltale.core.audit.SyncAudit`)
        from now on (``on``), or stop and return ``{"steps", "syncs": {operation: count}}``. Slow
        while on (every operation passes through Python): for a short run apart from timed ones."""
        from ..core.audit import SyncAudit

        if on:
            self._audit, self._audit_steps = SyncAudit(), 0
            return None
        audit, self._audit = self._audit, None
        return {"steps": self._audit_steps, "syncs": dict(audit.syncs) if audit is not None else {}}

    def state(self) -> dict[str, Any]:
        self._drain()
        fused = self.core.method_fused
        return {
            "live_requests": len(self.table),
            "uncollected": len(self._infos),
            "log_rows": int(sum(r["serial"].numel() for r in self._log)),
            "steps": self.steps,
            "hook_s": self.hook_s,
            "capacity": self.table.capacity,
            "resumed_after_preemption": self.resumed,
            "dropped_after_end": self.dropped_after_end,
            "tp_rank": self.tp_rank,
            "records": self.records,
            "step_digest": self.step_digest,
            # the per-step work compiled: in the model's compiled graph, or as the core's own kernels
            "fused": (self.graph is not None and self.compiled) or self.core.fused,
            "in_graph": self.graph is not None,
            # the method's layer step (None: it has none): in the model's graph, compiled with it
            "method_fused": self.compiled if self.graph is not None and fused is not None else fused,
            "method": self.method.summary(),
        }

    def discard(self) -> None:
        """Forget everything not live (finished/aborted and never collected)."""
        dead = {s for s in self._infos if s in self._finished}
        self._rows(dead)
        for s in dead:
            self._infos.pop(s, None)
        self._finished -= dead
