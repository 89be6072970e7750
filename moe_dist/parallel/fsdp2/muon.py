"""Muon for FSDP2's row-sharded matrices: each matrix orthogonalised whole, once, on one rank.

Newton-Schulz needs the whole matrix; FSDP2 holds row shards (``Shard(0)``: ``ceil(R / k)`` rows
per rank, the last ranks fewer or none). Two ways to get there:

* gather per matrix: every rank all-gathers every momentum-blended gradient and orthogonalises
  all of them; each rank then keeps its rows. ``k`` times the Newton-Schulz work of one rank,
  and each rank receives every matrix.
* round-robin whole matrices (chosen): the matrices sharing a mesh are taken ``k`` at a time;
  matrix ``q`` of a round is assembled on the mesh's rank ``q`` by one ``all_to_all`` (every rank
  sends its rows of every matrix to that matrix's owner), orthogonalised there, and its rows go
  back by a second ``all_to_all``. Each matrix is orthogonalised exactly once and each rank
  receives about one matrix per round, so the work and the traffic per rank fall as ``1 / k``.
  Distributed-Muon implementations published for ZeRO/FSDP assign matrices to ranks the same way.

The momentum stays sharded like the weights: ``m <- lerp(m, g, 1 - beta)`` and the Nesterov blend
``u = lerp(g, m, beta)`` are elementwise, so only ``u`` travels. The state is ``momentum_buffer``
in the parameter's own shape, the key DeepSpeed's Muon checkpoints under, so a resume under either
engine continues the same momentum.

The update matches DeepSpeed 0.19's Muon (``muon_update``): Nesterov momentum, five quintic
Newton-Schulz iterations with coefficients (3.4445, -4.7750, 2.0315) on the Frobenius-normalised
matrix (transposed when it has more rows than columns), scaled by ``sqrt(max(1, rows / cols))``,
then ``w <- w * (1 - lr * wd) - lr * update``. One difference: we iterate in fp32, where
DeepSpeed on CPU runs its Gram variant in fp16; the losses then differ by a bound measured in
``tests/distributed/test_fsdp2_equivalence.py``. ``torch.optim.Muon`` takes whole (unsharded)
tensors only, so it cannot step FSDP2's shards.

Stacked experts (``(El, F, D)``, ``GroupedExperts``) are orthogonalised per expert, as one 2-D matrix
each: ``Shard(0)`` hands every rank whole experts, so their update needs no exchange.

Legend: R rows, C columns of a matrix, k ranks of its mesh, r a rank's position in it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(u_RC: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The Muon update of one whole matrix: quintic Newton-Schulz in fp32, scaled by
    ``sqrt(max(1, R / C))``."""
    a, b, c = NS_COEFFICIENTS
    rows, cols = u_RC.shape
    x = u_RC.float()
    if rows > cols:
        x = x.mT                                      # iterate on the wide orientation: [min, max]
    x = x / (x.norm() + 1e-7)                         # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT                               # [min, min]
        x = a * x + (b * gram + c * gram @ gram) @ x
    if rows > cols:
        x = x.mT
    return x * (math.sqrt(rows / cols) if rows > cols else 1.0)


def shard_rows(rows: int, k: int, r: int) -> int:
    """Rows FSDP2's ``Shard(0)`` gives position ``r`` of a ``k``-rank mesh (``torch.chunk``'s split)."""
    per = -(-rows // k)
    return max(0, min(per, rows - r * per))


def _mesh_of(p: torch.Tensor) -> Any:
    return getattr(p, "device_mesh", None)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class ShardedMuon(torch.optim.Optimizer):
    """Muon over FSDP2 parameters (DTensors sharded ``Shard(0)`` on a 1-D mesh) or plain tensors.

    Every rank of a mesh must hold the same parameters in the same order (FSDP2 guarantees it:
    the ranks of an expert's ``dp`` mesh hold the same experts). ``device``: where matrices are
    exchanged and orthogonalised (the compute device, also under CPU offload)."""

    def __init__(self, params: Any, lr: float, momentum: float, weight_decay: float,
                 device: Optional[torch.device] = None) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.device = device

    def init_state(self, p: torch.Tensor) -> None:
        """The state a step would create: a zero momentum of the parameter's shape and placement."""
        self.state[p]["momentum_buffer"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        assert closure is None, "ShardedMuon.step takes no closure"
        buckets: dict[int, list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]]] = {}
        meshes: dict[int, Any] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if len(self.state[p]) == 0:
                    self.init_state(p)
                m, g = _local(self.state[p]["momentum_buffer"]), _local(p.grad)
                m.lerp_(g, 1 - group["momentum"])
                u = g.lerp(m, group["momentum"])          # Nesterov; [rows of this rank, C]
                if u.ndim == 3:  # stacked experts: this rank holds whole experts (Shard(0) cuts between them)
                    self._apply(p, group, torch.stack([orthogonalize(u_FD) for u_FD in u]) if len(u) else u)
                    continue
                mesh = _mesh_of(p)
                key = id(mesh) if mesh is not None else 0
                meshes[key] = mesh
                buckets.setdefault(key, []).append((p, group, u))
        for key, items in buckets.items():
            mesh = meshes[key]
            if mesh is None or mesh.size() == 1:
                updates = [orthogonalize(u.reshape(p.shape[0], -1)) for p, _, u in items]
            else:
                updates = self._round_robin(items, mesh)
            for (p, group, _), upd in zip(items, updates):
                self._apply(p, group, upd)

    @staticmethod
    def _apply(p: torch.Tensor, group: dict[str, Any], upd: torch.Tensor) -> None:
        w = _local(p)
        w.mul_(1 - group["lr"] * group["weight_decay"])
        w.add_(upd.to(device=w.device, dtype=w.dtype).view(w.shape), alpha=-group["lr"])

    def _round_robin(self, items: list, mesh: Any) -> list[torch.Tensor]:
        """Orthogonalise every matrix of ``items`` on one rank of ``mesh``; returns this rank's rows."""
        k, me, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
        dev = self.device or items[0][2].device
        out: list[torch.Tensor] = []
        for start in range(0, len(items), k):
            batch = items[start:start + k]                 # matrix q of this round lives on rank q
            shapes = [(p.shape[0], p.numel() // p.shape[0]) for p, _, _ in batch]
            send_n = [u.numel() for _, _, u in batch] + [0] * (k - len(batch))
            if me < len(batch):
                R, C = shapes[me]
                recv_n = [shard_rows(R, k, s) * C for s in range(k)]
            else:
                recv_n = [0] * k
            send = torch.cat([u.reshape(-1).to(dev, torch.float32) for _, _, u in batch])
            whole = torch.empty(sum(recv_n), dtype=torch.float32, device=dev)
            dist.all_to_all_single(whole, send, recv_n, send_n, group=group)
            if me < len(batch):                            # rows arrive in rank order: the whole matrix
                mine = orthogonalize(whole.view(shapes[me])).reshape(-1)
            else:
                mine = whole
            back = torch.empty(sum(send_n), dtype=torch.float32, device=dev)
            dist.all_to_all_single(back, mine.contiguous(), send_n, recv_n, group=group)
            out.extend(back.split(send_n[:len(batch)]))
        return out
