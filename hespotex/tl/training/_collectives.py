"""The collectives of data-parallel training: this rank's place in the process group (:class:`Context`),
fingerprints of a network's weights to compare them across processes, and freezing parameters for a stage.

The training loop (``_training``) and the process management (``_distributed``) both use these, so they live
below both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def state_fingerprint(net) -> str:
    """SHA-256 of a module's state (names and bytes), to compare weights across processes."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- collectives
class Context:
    """This rank's place in the process group, and the collectives the training loop needs."""

    def __init__(self, rank: int, world_size: int, device) -> None:
        import torch.distributed as dist

        self.rank = rank
        self.world_size = world_size
        self.device = device  # where the model runs
        # nccl reduces CUDA tensors, gloo CPU tensors
        self.comm_device = device if dist.get_backend() == "nccl" else "cpu"

    def all_reduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        """Element-wise sum or max of a float64 vector over the ranks (identical result on every rank)."""
        import torch
        import torch.distributed as dist

        t = torch.as_tensor(np.asarray(values, dtype=np.float64)).to(self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.cpu().numpy()

    def all_gather(self, value: int) -> list[int]:
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self.comm_device)
        out = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return [int(o.item()) for o in out]

    def check_identical(self, net, what: str) -> str:
        """Fingerprint of ``net``'s state, checked equal on every rank (raises when not)."""
        fp = state_fingerprint(net)
        short = int(fp[:15], 16)
        got = self.all_gather(short)
        if len(set(got)) != 1:
            msg = (
                f"DDP ranks hold different {what} (state fingerprints {got}); every rank must build the model from "
                "the same seed."
            )
            raise RuntimeError(msg)
        return fp

    def seed(self, seed: int) -> int:
        """Torch seed of this rank (dropout): rank 0 keeps ``seed``, other ranks get their own stream."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0])

    def shard(self, n_blocks: int, order: np.ndarray, rank: int | None = None) -> np.ndarray:
        """Blocks of ``rank`` (default: this rank) in an epoch: the shared ``order`` dealt round-robin
        (cycled when there are fewer blocks than ranks, so no rank is empty)."""
        size = max(n_blocks, self.world_size)
        size += (-size) % self.world_size
        return np.resize(order, size)[self.rank if rank is None else rank :: self.world_size]

    def wrap(self, net, method: str):
        """``DistributedDataParallel`` over ``net`` whose forward is ``net.<method>`` (the loss).

        Only parameters that require gradients are synchronised; freeze the others first.
        """
        import torch
        from torch.nn.parallel import DistributedDataParallel

        class _Loss(torch.nn.Module):
            def __init__(self, inner) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, *args, **kwargs):
                return getattr(self.inner, method)(*args, **kwargs)

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(_Loss(net), device_ids=ids)


def trainable_only(net, params: Sequence) -> dict:
    """Set ``requires_grad`` to False on ``net``'s parameters outside ``params``; returns the old flags."""
    keep = {id(p) for p in params}
    old = {}
    for p in net.parameters():
        old[p] = p.requires_grad
        if id(p) not in keep:
            p.requires_grad_(False)
    return old


def restore_grad_flags(old: dict) -> None:
    for p, flag in old.items():
        p.requires_grad_(flag)
