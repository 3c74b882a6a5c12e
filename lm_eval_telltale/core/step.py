"""The token → request map of one forward step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .state import SlotTable


@dataclass
class StepMap:
    """Per token of the flattened batch ``[N, hidden]``.

    slot:     request slot of the token (-1 for padding)
    position: absolute position in its sequence
    decode:   generated token (position >= its request's prompt length) — decided per token,
              never per step or by query length
    new:      decode token not seen before by this request (recomputation after preemption
              re-feeds old positions; those are not counted twice)
    act:      decode token of a request the method may act on (``decode`` and the request did
              not opt out with ``extra_args={"telltale_enable": False}``): methods decide on
              ``act``; statistics use ``decode``/``new``
    seed:     the request's 32-bit seed (for counter-based draws)
    token:    the fed token ids, where the adapter has them (None: prompt embeddings)
    rows:     the step's requests (host int; each brings at most one new token)
    """

    slot: torch.Tensor
    position: torch.Tensor
    decode: torch.Tensor
    new: torch.Tensor
    act: torch.Tensor
    seed: torch.Tensor
    token: torch.Tensor | None = None
    rows: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.slot.shape[0])


#: the slot-table tensors a step map reads, in :func:`step_tensors`' order
STEP_TABLES = ("prompt_len", "last_pos", "enabled", "seed")


def step_tensors(prompt_len, last_pos, enabled, seed, query_start_loc, row_slot, positions):
    """The step map's tensors ``(slot, position, decode, new, act, seed)`` from the slot table's
    tensors (:data:`STEP_TABLES`) and the step's ``query_start_loc`` [R+1], ``row_slot`` [R] and
    ``positions`` [N]: device arithmetic only (a function of tensors, so a compiled step can call
    it: :meth:`~lm_eval_telltale.core.engine.CoreEngine.start`)."""
    dev = positions.device
    n = positions.shape[0]
    r = row_slot.shape[0]
    qsl = query_start_loc.to(dev, torch.int64)
    tok = torch.arange(n, device=dev)
    row = torch.searchsorted(qsl[1:], tok, right=True)  # R for padding tokens
    slot_ext = torch.cat([row_slot.to(dev, torch.int64), torch.full((1,), -1, dtype=torch.int64, device=dev)])
    slot = slot_ext[row.clamp(max=r)]
    valid = slot >= 0
    s = slot.clamp(min=0)
    pos = positions.to(torch.int64)
    decode = valid & (pos >= prompt_len[s])
    new = decode & (pos > last_pos[s])
    act = decode & enabled[s]
    return slot, pos, decode, new, act, seed[s]


def sampling_rows(positions, query_start_loc, row_slot, prompt_len):
    """Each of the step's R rows' last fed position, and whether the token sampled from its logits
    is kept: iff that position reaches its prompt's end (a prefill chunk before the last samples a
    token that is discarded). ``query_start_loc`` [R+1], ``row_slot`` [R] (rows past the step's, or
    without a request, give values no one reads), ``positions`` [N]; device arithmetic only (the
    in-graph step computes it in the model's graph). Returns (keep [R] bool, last [R] int64)."""
    last_token = (query_start_loc[1:].to(positions.device, torch.int64) - 1).clamp(min=0, max=positions.shape[0] - 1)
    last = positions[last_token].to(torch.int64)
    return last >= prompt_len[row_slot.clamp(min=0)] - 1, last


def build_step(table: SlotTable, query_start_loc: torch.Tensor, row_slot: torch.Tensor,
               positions: torch.Tensor, tokens: torch.Tensor | None = None) -> StepMap:
    """``query_start_loc``: [R+1] token offsets of the R rows; ``row_slot``: [R] slot of each row
    (in the runner's row order for this step); ``positions``: [N] (N >= qsl[R], rest padding);
    ``tokens``: [N] the fed token ids, if known."""
    parts = step_tensors(*(table.t[k] for k in STEP_TABLES), query_start_loc, row_slot, positions)
    return step_map(parts, tokens, int(row_slot.shape[0]))


def step_map(parts, tokens: torch.Tensor | None, rows: int) -> StepMap:
    """A :class:`StepMap` of :func:`step_tensors`' result."""
    slot, pos, decode, new, act, seed = parts
    return StepMap(slot=slot, position=pos, decode=decode, new=new, act=act, seed=seed,
                   token=None if tokens is None else tokens.to(pos.device, torch.int64), rows=rows)


def advance_last_pos(last_pos, slot, position, new) -> None:
    """Advance each request's last seen position (``last_pos`` [S], in place) to its newest new
    token's: an ``amax`` scatter, where every other token brings −1 (no slot's value is below it)."""
    src = torch.where(new, position, torch.full_like(position, -1))
    last_pos.scatter_reduce_(0, slot.clamp(min=0), src, reduce="amax")


def finish_step(table: SlotTable, step: StepMap) -> None:
    """Advance each request's last seen position (after all layers ran)."""
    advance_last_pos(table.t["last_pos"], step.slot, step.position, step.new)
