"""The training loop of HESpotEx: batches of spatial blocks, AE pre-training, joint stage, early stopping."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hespotex._settings import settings
from hespotex.pp._stain_augment import sample_views
from hespotex.tl.model._data import GraphData, induced_edges, spatial_blocks
from hespotex.tl.model._lazy import dense, take
from hespotex.tl.training import _autoencoder_cache as ae_cache
from hespotex.tl.training._collectives import restore_grad_flags, trainable_only

if TYPE_CHECKING:
    from hespotex.tl.training._collectives import Context

logger = logging.getLogger("hespotex")


@dataclass
class Batch:
    """A disjoint union of spatial blocks as numpy arrays (edges already offset).

    A block of a sample with lazy embeddings holds readers (``emb``, ``views``: rows on disk) and sparse
    ``expr`` until :meth:`load` reads them for one batch.
    """

    emb: np.ndarray  # or a LazyRows reader (block of lazy embeddings)
    expr: np.ndarray  # or CSR (lazy training): densified by load
    edges_ae: np.ndarray
    edges_dec: np.ndarray
    latent: np.ndarray | None = None  # the frozen autoencoder's z, once pre-trained
    views: np.ndarray | None = None  # stain-augmented views of emb (n, n_views, dim): one is drawn per spot per epoch

    def load(self) -> Batch:
        """This batch with its rows in memory: lazy rows read (and standardised), sparse targets densified; itself
        when it holds numpy arrays already."""
        if all(v is None or isinstance(v, np.ndarray) for v in (self.emb, self.expr, self.views)):
            return self
        return Batch(
            dense(self.emb), dense(self.expr), self.edges_ae, self.edges_dec, self.latent,
            None if self.views is None else dense(self.views),
        )  # fmt: skip

    def to(self, device):
        import torch

        return (
            torch.from_numpy(self.expr).to(device),
            torch.from_numpy(self.emb).to(device),
            torch.from_numpy(self.edges_ae).to(device),
            torch.from_numpy(self.edges_dec).to(device),
        )

    def latent_tensor(self, device):
        import torch

        return None if self.latent is None else torch.from_numpy(self.latent).to(device)


def make_blocks(
    samples: Sequence[GraphData], *, k_ae: int, k_dec: int, max_nodes: int, expression_only: bool = False
) -> list[Batch]:
    """Cut every sample into compact spatial blocks with their induced graphs (lazy embeddings stay readers).
    ``expression_only``: blocks for the autoencoder, without embeddings or views (no copy of them is made)."""
    blocks = []
    for s in samples:
        e_ae, e_dec = s.graph(k_ae), s.graph(k_dec)
        for nodes in spatial_blocks(s.coords_um, max_nodes):
            if expression_only:
                emb, views = np.empty((len(nodes), 0), np.float32), None
            else:
                emb, views = take(s.emb, nodes), None if s.views is None else take(s.views, nodes)
            edges_ae, edges_dec = induced_edges(e_ae, nodes, s.n), induced_edges(e_dec, nodes, s.n)
            blocks.append(Batch(emb, s.expr[nodes], edges_ae, edges_dec, views=views))
    return blocks


class Batches(Sequence):
    """An epoch's batches, each the union of its blocks, built when it is used (one batch in memory at a time)."""

    def __init__(self, blocks: Sequence[Batch], groups: list[list[int]]) -> None:
        self.blocks, self.groups = blocks, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> Batch:
        return _union([self.blocks[j].load() for j in self.groups[i]])


def group_blocks(blocks: Sequence[Batch], order: np.ndarray, max_nodes: int) -> Batches:
    """Concatenate blocks (in ``order``) into batches of at most ``max_nodes`` spots (built as they are used)."""
    groups, current, size = [], [], 0
    for i in order:
        n = len(blocks[i].emb)
        if current and size + n > max_nodes:
            groups.append(current)
            current, size = [], 0
        current.append(int(i))
        size += n
    if current:
        groups.append(current)
    return Batches(blocks, groups)


def count_batches(sizes: Sequence[int], max_nodes: int) -> int:
    """How many batches :func:`group_blocks` makes of blocks of these sizes (in this order)."""
    n, current, size = 0, 0, 0
    for s in sizes:
        if current and size + s > max_nodes:
            n, current, size = n + 1, 0, 0
        current += 1
        size += s
    return n + bool(current)


def _union(parts: Sequence[Batch]) -> Batch:
    if len(parts) == 1:
        return parts[0]
    offsets = np.cumsum([0] + [len(p.emb) for p in parts[:-1]])
    return Batch(
        np.concatenate([p.emb for p in parts]),
        np.concatenate([p.expr for p in parts]),
        np.concatenate([p.edges_ae + o for p, o in zip(parts, offsets, strict=True)], axis=1),
        np.concatenate([p.edges_dec + o for p, o in zip(parts, offsets, strict=True)], axis=1),
        None if any(p.latent is None for p in parts) else np.concatenate([p.latent for p in parts]),
        None if any(p.views is None for p in parts) else np.concatenate([p.views for p in parts]),
    )


def epoch_batches(
    blocks: Sequence[Batch], rng: np.random.Generator, max_nodes: int, distributed: Context | None = None
) -> tuple[Batches, np.ndarray]:
    """One epoch's batches for this process and the blocks they hold.

    Single process: every block, in a random order, grouped into batches of at most ``max_nodes``
    spots. Data-parallel: the same shared order (``rng`` is seeded alike on every rank), dealt
    round-robin so the ranks' shards are disjoint; each rank groups its shard, and batches are
    repeated where a rank has fewer, so every rank takes the same number of steps.
    """
    order = rng.permutation(len(blocks))
    if distributed is None:
        return group_blocks(blocks, order, max_nodes), order
    mine = distributed.shard(len(blocks), order)
    batches = group_blocks(blocks, mine, max_nodes)
    # every rank knows every shard (shared order): the largest batch count needs no communication
    sizes = np.array([len(b.emb) for b in blocks])
    steps = max(
        count_batches(sizes[distributed.shard(len(blocks), order, rank=r)], max_nodes)
        for r in range(distributed.world_size)
    )
    return Batches(blocks, [batches.groups[i % len(batches)] for i in range(steps)]), mine


def make_optimizer(cls, params, *, lr: float, weight_decay: float):
    """``cls(params, ...)`` (Adam or AdamW) with torch's fused kernel where it has one (CPU, CUDA): one pass over
    each parameter instead of a dozen element-wise ops, 3-4 times faster on the 5,000-gene autoencoder's weights
    (``benchmarks/results/train_profile.md``); the same update up to float rounding."""
    params = list(params)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return cls(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


_AE_CACHE: dict[str, dict] = {}
_AE_CACHE_SIZE = 8


def _autoencoder_key(net, blocks: Sequence[Batch], max_nodes: int, seed: int, world_size: int = 1) -> str:
    import hashlib

    import torch

    from hespotex import __version__

    cfg = net.config
    h = hashlib.sha256()
    h.update(f"hespotex={__version__} torch={torch.__version__}".encode())  # the disk cache outlives the code
    fields = (
        "ae_neighbors",
        "ae_hidden_dim",
        "latent_dim",
        "ae_attention",
        "ae_lr",
        "ae_weight_decay",
        "ae_epochs",
        "ae_grad_clip",
    )
    h.update(repr(([getattr(cfg, f) for f in fields], net.n_genes, max_nodes, seed)).encode())
    if world_size > 1:  # data-parallel pre-training takes other steps
        h.update(f"world_size={world_size}".encode())
    for b in blocks:
        h.update(np.ascontiguousarray(dense(b.expr)).tobytes())
        h.update(np.ascontiguousarray(b.edges_ae).tobytes())
    return h.hexdigest()


def pretrain_autoencoder(
    net,
    blocks: Sequence[Batch],
    *,
    device,
    max_nodes: int,
    seed: int,
    distributed: Context | None = None,
    trace: dict[str, Any] | None = None,
) -> None:
    """Stage 1: train the graph attention autoencoder alone on the expression (reconstruction).

    It depends only on the expression, its graph, the autoencoder's settings and the seed, so its result
    is kept in memory for this process and on disk (:mod:`hespotex.tl.training._autoencoder_cache`) and reused: by
    the two encoders of a benchmark fold, and by ensemble members and cross-validation folds that train on the same
    samples with the same seed, in this process or another.
    With ``distributed`` (a :class:`hespotex.tl.training._collectives.Context`) every rank trains on its
    shard of the blocks and ``DistributedDataParallel`` averages the gradients.
    """
    world_size = 1 if distributed is None else distributed.world_size
    key = _autoencoder_key(net, blocks, max_nodes, seed, world_size)
    if key in _AE_CACHE:
        net.autoencoder.load_state_dict(_AE_CACHE[key])
        logger.info("Reusing the autoencoder pre-trained on the same expression in this session.")
        return
    if distributed is not None:  # every rank trains its shard: no cache on disk
        _pretrain(net, blocks, device=device, max_nodes=max_nodes, seed=seed, distributed=distributed, trace=trace)
    else:
        with ae_cache.locked(key) as path:  # another process pre-training the same autoencoder: wait for it
            if ae_cache.load(net.autoencoder, path):
                logger.info("Reusing the autoencoder pre-trained on the same expression (cached on disk).")
            else:
                _pretrain(net, blocks, device=device, max_nodes=max_nodes, seed=seed, distributed=None, trace=trace)
                ae_cache.save(_cpu_state(net.autoencoder), path)
    if len(_AE_CACHE) >= _AE_CACHE_SIZE:
        _AE_CACHE.pop(next(iter(_AE_CACHE)))
    _AE_CACHE[key] = _cpu_state(net.autoencoder)


def _cpu_state(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _pretrain(
    net, blocks: Sequence[Batch], *, device, max_nodes: int, seed: int, distributed: Context | None, trace
) -> None:
    """The reconstruction training of :func:`pretrain_autoencoder` (no cache)."""
    import torch
    from tqdm.auto import tqdm

    cfg = net.config
    torch.manual_seed(seed if distributed is None else distributed.seed(seed))
    rng = np.random.default_rng(seed)
    # the autoencoder reads expression and its graph only: batches without the embeddings and their stain views
    # (same blocks, sizes and order; their rows are no longer copied into every epoch's batch)
    blocks = [Batch(np.empty((len(b.emb), 0), np.float32), b.expr, b.edges_ae, b.edges_dec) for b in blocks]
    params = list(net.autoencoder.parameters())
    opt = make_optimizer(torch.optim.Adam, params, lr=cfg.ae_lr, weight_decay=cfg.ae_weight_decay)
    step, flags = net.autoencoder_loss, None
    if distributed is not None:
        flags = trainable_only(net, params)
        step = distributed.wrap(net, "autoencoder_loss")
    net.train()
    try:
        for epoch in tqdm(range(cfg.ae_epochs), desc="autoencoder", disable=not settings.progress):
            batches, mine = epoch_batches(blocks, rng, max_nodes, distributed)
            if trace is not None and epoch == 0:
                trace["autoencoder"] = {"blocks": mine.tolist(), "steps_per_epoch": len(batches)}
            for batch in batches:
                x, _, e_ae, _ = batch.to(device)
                loss, _ = step(x, e_ae)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.ae_grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.ae_grad_clip)
                opt.step()
    finally:
        if flags is not None:
            del step  # the DDP wrapper and its gradient hooks

            restore_grad_flags(flags)


def fit_net(
    net,
    train: Sequence[GraphData],
    *,
    validate: Callable[[object], float] | None,
    device,
    max_nodes: int,
    seed: int,
    distributed: Context | None = None,
    trace: dict[str, Any] | None = None,
    autoencoder_data: Sequence[GraphData] | None = None,
) -> list[dict[str, float]]:
    """Train ``net`` in place: autoencoder pre-training, then the joint stage with early stopping.

    ``validate(net)`` returns a score (higher is better) on held-out validation spots; the best
    epoch's weights are restored. Returns the per-epoch history.

    With ``distributed`` (a :class:`hespotex.tl.training._collectives.Context`, process group running)
    this process is one rank of data-parallel training: it trains on its shard of the blocks each
    epoch, ``DistributedDataParallel`` averages the gradients, the history holds the losses
    averaged over ranks, and ``validate`` must return the same score on every rank (it decides
    early stopping). ``trace`` (a dict) receives this rank's shards and step counts. ``autoencoder_data``: the
    samples the autoencoder pre-trains on instead of ``train`` (their expression and graphs only); the latent
    targets are still those of the training spots.
    """
    import torch
    from tqdm.auto import tqdm

    cfg = net.config
    blocks = make_blocks(train, k_ae=cfg.ae_neighbors, k_dec=cfg.decoder_neighbors, max_nodes=max_nodes)
    history: list[dict[str, float]] = []
    net.to(device)
    frozen = net.autoencoder is not None and cfg.ae_epochs > 0 and cfg.detach_latent
    with torch.random.fork_rng(devices=[]):
        if net.autoencoder is not None and cfg.ae_epochs > 0:
            ae_seed = seed if cfg.ae_seed is None else cfg.ae_seed  # members sharing an autoencoder share its seed
            ae_blocks = blocks
            if autoencoder_data is not None:
                ae_blocks = make_blocks(
                    autoencoder_data, k_ae=cfg.ae_neighbors, k_dec=cfg.decoder_neighbors, max_nodes=max_nodes,
                    expression_only=True,
                )  # fmt: skip
            pretrain_autoencoder(
                net, ae_blocks, device=device, max_nodes=max_nodes, seed=ae_seed, distributed=distributed, trace=trace
            )
            del ae_blocks  # the autoencoder's own blocks (a copy of every sample's expression) are done with
        if frozen:  # two-stage training: z is a fixed target, computed once; the autoencoder is not run again
            net.eval()
            with torch.inference_mode():
                for b in blocks:
                    x, e_ae = (torch.from_numpy(a).to(device) for a in (dense(b.expr), b.edges_ae))
                    b.latent = net.autoencoder.encode(x, e_ae)[0].float().cpu().numpy()
        # the joint stage has its own random streams, so it is the same whether or not pre-training was cached
        torch.manual_seed(seed + 1 if distributed is None else distributed.seed(seed + 1))
        rng = np.random.default_rng(seed + 1)
        view_rng = np.random.default_rng(seed + 2)  # its own stream: the batch order is the same with or without views
        params = net.image_parameters() if frozen else list(net.parameters())
        opt = make_optimizer(torch.optim.AdamW, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        step, flags = net.loss, None
        if distributed is not None:
            flags = trainable_only(net, params)
            step = distributed.wrap(net, "loss")
        best_score, best_state, stale = -np.inf, None, 0
        bar = tqdm(range(cfg.epochs), desc="training", disable=not settings.progress)
        for epoch in bar:
            net.train()
            sums: dict[str, float] = {}
            batches, mine = epoch_batches(blocks, rng, max_nodes, distributed)
            if trace is not None and epoch == 0:
                trace["joint"] = {
                    "blocks": mine.tolist(), "spots": int(sum(len(blocks[i].emb) for i in mine)),
                    "steps_per_epoch": len(batches)
                }  # fmt: skip
            for batch in batches:
                x, emb, e_ae, e_dec = batch.to(device)
                if (
                    batch.views is not None
                ):  # stain augmentation: each spot's embedding drawn among its clean one and views
                    emb = torch.from_numpy(sample_views(batch.emb, batch.views, view_rng)).to(device)
                loss, parts = step(x, emb, e_ae, e_dec, latent_target=batch.latent_tensor(device) if frozen else None)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / len(batches)
            record = {"epoch": epoch, **sums}
            if validate is not None:
                score = validate(net)
                record["validation"] = score
                if score > best_score:
                    best_score, best_state, stale = score, copy.deepcopy(net.state_dict()), 0
                else:
                    stale += 1
            history.append(record)
            bar.set_postfix(
                loss=f"{sums.get('total', float('nan')):.3f}", val=f"{record.get('validation', float('nan')):.3f}"
            )
            # no stop before 2 x patience epochs: with one step per epoch, early epochs only fit gene means
            if (
                cfg.patience is not None
                and validate is not None
                and stale >= cfg.patience
                and epoch + 1 >= 2 * cfg.patience
            ):
                logger.info("Early stopping at epoch %d (best validation %.4f).", epoch, best_score)
                break
        if best_state is not None:
            net.load_state_dict(best_state)
        if distributed is not None and history:  # the history reports losses averaged over ranks (one collective)
            keys = [k for k in history[0] if k not in ("epoch", "validation")]
            means = distributed.all_reduce(np.array([[h[k] for k in keys] for h in history])) / distributed.world_size
            for h, row in zip(history, means.tolist(), strict=True):
                h.update(zip(keys, row, strict=True))
        if flags is not None:
            del step  # the DDP wrapper and its gradient hooks
            restore_grad_flags(flags)
    net.eval()
    return history
