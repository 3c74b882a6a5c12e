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


def build_step(table: SlotTable, query_start_loc: torch.Tensor, row_slot: torch.Tensor,
               positions: torch.Tensor, tokens: torch.Tensor | None = None) -> StepMap:
    """``query_start_loc``: [R+1] token offsets of the R rows; ``row_slot``: [R] slot of each row
    (in the runner's row order for this step); ``positions``: [N] (N >= qsl[R], rest padding);
    ``tokens``: [N] the fed token ids, if known."""
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
    decode = valid & (pos >= table.t["prompt_len"][s])
    new = decode & (pos > table.t["last_pos"][s])
    act = decode & table.t["enabled"][s]
    return StepMap(slot=slot, position=pos, decode=decode, new=new, act=act, seed=table.t["seed"][s],
                   token=None if tokens is None else tokens.to(dev, torch.int64), rows=int(r))


def finish_step(table: SlotTable, step: StepMap) -> None:
    """Advance each request's last seen position (after all layers ran)."""
    s = torch.where(step.new, step.slot, torch.full_like(step.slot, table.capacity))
    lp = torch.cat([table.t["last_pos"], table.t["last_pos"].new_full((1,), -1)])
    lp = lp.scatter_reduce(0, s, step.position, reduce="amax")
    table.t["last_pos"] = lp[:-1]
