"""Sequence parallelism for video attention on ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Video tokens ``[B, T, S, ...]`` are split over the ranks of a process group in one of two ways:

* **by frames**: rank ``r`` holds frames ``shard_range(T, P, r)`` (``P`` ranks; the first ``T % P``
  ranks hold one frame more, so uneven ``T`` needs no padding). Spatial attention, the MLP, adaLN and
  anything else per frame or per token run locally.
* **by positions**: rank ``r`` holds positions ``shard_range(S, P, r)`` of every frame. Temporal
  attention runs locally.

One all-to-all switches between the two (:func:`frames_to_positions`, :func:`positions_to_frames`):
each rank sends ``1/P`` of its tokens to every other rank. Dense and cross attention over the whole
sequence ``N = T * S`` (split in contiguous shards, frames-major) take either

* **Ulysses** (``H % P == 0``): an all-to-all turns the sequence shard into a head shard, every rank
  attends over the whole sequence for ``H / P`` heads, a second all-to-all turns it back; or
* **ring attention**: the key/value shards travel round the ring (``P - 1`` point-to-point steps)
  while each rank attends its queries to the shard it holds, and the partial results merge exactly by
  their log-sum-exp (``attention(..., return_lse=True)``).

Cross attention to replicated context (text tokens on every rank) needs no communication.

Every collective here is differentiable (``torch.autograd.Function`` whose backward is the adjoint
collective: an all-to-all's is the reverse all-to-all, an all-gather's a reduce-scatter, a ring step's
the step back), so fine-tuning through the sequence-parallel ops works. All ranks must call each
function in the same order with the same shapes except the sharded dim, as with any collective.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_to_all",
    "attention",
    "frames_to_positions",
    "gather",
    "positions_to_frames",
    "ring_attention",
    "shard",
    "shard_range",
    "shard_sizes",
    "spatial_attention",
    "temporal_attention",
    "ulysses_attention",
]


# --------------------------------------------------------------------------------------------------
# Shard arithmetic


def shard_sizes(n: int, world: int) -> list[int]:
    """Sizes of ``n`` items split over ``world`` ranks: the first ``n % world`` get one more."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"shard_sizes: n must be an int >= 0, got {n!r}")
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"shard_sizes: world must be an int >= 1, got {world!r}")
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def shard_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s shard of ``n`` items (:func:`shard_sizes`)."""
    sizes = shard_sizes(n, world)
    if not 0 <= rank < world:
        raise ValueError(f"shard_range: rank must be in [0, {world}), got {rank}")
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _world_rank(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("i2v_kernels.distributed: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (torchrun sets the environment)")
    return dist.get_world_size(group), dist.get_rank(group)


def shard(x: Tensor, dim: int, group=None) -> Tensor:
    """This rank's contiguous shard of ``x`` along ``dim`` (a view; no communication)."""
    world, rank = _world_rank(group)
    start, stop = shard_range(x.shape[dim], world, rank)
    return x.narrow(dim, start, stop - start)


def _check_tensor(fn: str, name: str, x, dims: Optional[int] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{fn}: {name} must have {dims} dims, got shape {tuple(x.shape)}")


def _dim(fn: str, name: str, dim: int, x: Tensor) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{fn}: {name} must be a dim of a {x.dim()}-d tensor, got {dim!r}")
    return dim % x.dim()


def _all_sizes(n: int, group, device) -> list[int]:
    """Every rank's ``n`` (one small all-gather)."""
    world, _ = _world_rank(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    return [int(t.item()) for t in everyone]


# --------------------------------------------------------------------------------------------------
# Differentiable collectives


def _a2a(x: Tensor, scatter_dim: int, gather_dim: int, scatter_sizes: Sequence[int], gather_sizes: Sequence[int],
         group) -> Tensor:
    """Split ``x`` along ``scatter_dim`` (``scatter_sizes[j]`` to rank ``j``), receive from every rank
    ``j`` a block that is ``gather_sizes[j]`` long along ``gather_dim``, concatenate those along it."""
    world, rank = _world_rank(group)
    chunks = x.split(list(scatter_sizes), dim=scatter_dim)
    shapes = []
    for j in range(world):
        shape = list(x.shape)
        shape[scatter_dim] = scatter_sizes[rank]
        shape[gather_dim] = gather_sizes[j]
        shapes.append(shape)
    send = torch.cat([c.contiguous().reshape(-1) for c in chunks])
    recv_numel = [math.prod(s) for s in shapes]
    recv = x.new_empty(sum(recv_numel))
    dist.all_to_all_single(recv, send, recv_numel, [c.numel() for c in chunks], group=group)
    return torch.cat([p.view(s) for p, s in zip(recv.split(recv_numel), shapes)], dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, scatter_sizes, gather_sizes, group):
        ctx.args = (scatter_dim, gather_dim, scatter_sizes, gather_sizes, group)
        return _a2a(x, scatter_dim, gather_dim, scatter_sizes, gather_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim, scatter_sizes, gather_sizes, group = ctx.args
        return _a2a(grad.contiguous(), gather_dim, scatter_dim, gather_sizes, scatter_sizes, group), *([None] * 5)


def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, *, group=None,
               gather_sizes: Optional[Sequence[int]] = None, scatter_sizes: Optional[Sequence[int]] = None) -> Tensor:
    """Re-shard ``x`` from ``gather_dim`` to ``scatter_dim``: ``x`` holds this rank's shard along
    ``gather_dim`` and all of ``scatter_dim``; the result holds all of ``gather_dim`` (the ranks' shards
    concatenated in rank order) and this rank's :func:`shard_sizes` shard of ``scatter_dim``.

    ``gather_sizes``: every rank's length along ``gather_dim`` (found with one small all-gather when
    None); ``scatter_sizes``: how ``scatter_dim`` is split over the ranks (default
    :func:`shard_sizes`). Uneven sizes are exchanged as they are: nothing is padded or dropped.
    Differentiable (the backward is the reverse all-to-all)."""
    _check_tensor("all_to_all", "x", x)
    scatter_dim, gather_dim = _dim("all_to_all", "scatter_dim", scatter_dim, x), _dim("all_to_all", "gather_dim",
                                                                                      gather_dim, x)
    if scatter_dim == gather_dim:
        raise ValueError(f"all_to_all: scatter_dim and gather_dim must differ, both are {scatter_dim}")
    world, rank = _world_rank(group)
    if gather_sizes is None:
        gather_sizes = _all_sizes(x.shape[gather_dim], group, x.device)
    gather_sizes = [int(n) for n in gather_sizes]
    if len(gather_sizes) != world or gather_sizes[rank] != x.shape[gather_dim]:
        raise ValueError(f"all_to_all: gather_sizes must list {world} sizes with this rank's ({rank}) equal to "
                         f"x.shape[{gather_dim}] = {x.shape[gather_dim]}, got {gather_sizes}")
    scatter_sizes = shard_sizes(x.shape[scatter_dim], world) if scatter_sizes is None else [int(n) for n in scatter_sizes]
    if len(scatter_sizes) != world or sum(scatter_sizes) != x.shape[scatter_dim] or min(scatter_sizes) < 0:
        raise ValueError(f"all_to_all: scatter_sizes must split x.shape[{scatter_dim}] = {x.shape[scatter_dim]} "
                         f"over {world} ranks, got {scatter_sizes}")
    if world == 1:
        return x
    return _AllToAll.apply(x, scatter_dim, gather_dim, scatter_sizes, gather_sizes, group)


def gather(x: Tensor, dim: int, *, group=None, sizes: Optional[Sequence[int]] = None) -> Tensor:
    """All-gather the ranks' shards of ``x`` along ``dim`` (uneven lengths allowed; ``sizes``: every
    rank's length, found with one small all-gather when None). Differentiable: the backward sums the
    gradients every rank computed for this rank's shard (a reduce-scatter), i.e. the gradient of the
    sum over ranks of what each computes from the gathered tensor. (When every rank computes the same
    loss from it, each gradient is ``P`` times the single-process one, and averaging the parameters'
    gradients over the ranks, as data parallelism does, gives exactly the single-process gradient.)"""
    _check_tensor("gather", "x", x)
    dim = _dim("gather", "dim", dim, x)
    world, _ = _world_rank(group)
    if world == 1:
        return x
    # An all-gather is the all-to-all of P copies along a new leading dim; the expand's backward is the
    # reduce-scatter's sum.
    copies = x.unsqueeze(0).expand(world, *x.shape)
    return all_to_all(copies, 0, dim + 1, group=group, gather_sizes=sizes).squeeze(0)


class _RingStep(torch.autograd.Function):
    """Send ``x`` to the next rank and receive the previous rank's ``recv_shape`` tensor; the backward
    sends the gradient the other way."""

    @staticmethod
    def forward(ctx, x, recv_shape, group):
        ctx.args = (tuple(x.shape), group)
        return _ring_send_recv(x.contiguous(), recv_shape, group, 1)

    @staticmethod
    def backward(ctx, grad):
        shape, group = ctx.args
        return _ring_send_recv(grad.contiguous(), shape, group, -1), None, None


def _ring_send_recv(x: Tensor, recv_shape, group, step: int) -> Tensor:
    world, rank = _world_rank(group)
    to = dist.get_global_rank(group, (rank + step) % world) if group is not None else (rank + step) % world
    frm = dist.get_global_rank(group, (rank - step) % world) if group is not None else (rank - step) % world
    recv = x.new_empty(recv_shape)
    ops = [dist.P2POp(dist.isend, x, to, group), dist.P2POp(dist.irecv, recv, frm, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return recv


# --------------------------------------------------------------------------------------------------
# Layout switches for [B, T, S, ...] video tokens


def _switch(fn: str, x: Tensor, group, total: Optional[int], scatter_dim: int, gather_dim: int, layout: str):
    _check_tensor(fn, "x", x)
    if x.dim() < 3:
        raise ValueError(f"{fn}: x must be {layout}, got shape {tuple(x.shape)}")
    world, _ = _world_rank(group)
    sizes = None if total is None else shard_sizes(total, world)
    return all_to_all(x, scatter_dim, gather_dim, group=group, gather_sizes=sizes)


def frames_to_positions(x: Tensor, *, group=None, num_frames: Optional[int] = None) -> Tensor:
    """``[B, T_r, S, ...]`` (this rank's frames) -> ``[B, T, S_r, ...]`` (this rank's positions of every
    frame); one all-to-all. ``num_frames``: ``T`` (the frame shards then follow :func:`shard_sizes`;
    found with one small all-gather when None)."""
    return _switch("frames_to_positions", x, group, num_frames, 2, 1, "[B, T_r, S, ...]")


def positions_to_frames(x: Tensor, *, group=None, num_positions: Optional[int] = None) -> Tensor:
    """``[B, T, S_r, ...]`` -> ``[B, T_r, S, ...]``: the inverse of :func:`frames_to_positions`."""
    return _switch("positions_to_frames", x, group, num_positions, 1, 2, "[B, T, S_r, ...]")


# --------------------------------------------------------------------------------------------------
# Sequence-parallel attention


def spatial_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, **kwargs) -> Tensor:
    """Spatial attention on frame shards ``[B, T_r, S, H, D]``: local, no communication (every frame
    is whole on one rank). ``kwargs``: those of :func:`i2v_kernels.spatial_attention` (a ``rope``
    table covers the local frames)."""
    from i2v_kernels.ops.attention import spatial_attention as local

    _world_rank(group)
    return local(q, k, v, **kwargs)


def temporal_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, layout: str = "frames",
                       num_frames: Optional[int] = None, causal: bool = False, scale: Optional[float] = None,
                       **prologue) -> Tensor:
    """Temporal attention on shards of ``[B, T, S, H, D]``.

    ``layout="positions"``: ``q, k, v [B, T, S_r, H, D]``, local, no communication. ``layout="frames"``:
    ``[B, T_r, S, H, D]`` in and out; QK-norm/RoPE (``prologue``: the keywords of
    :func:`i2v_kernels.qk_norm_rope`, ``rope`` covering the local frames) are applied locally, then one
    all-to-all moves q, k and v (stacked) to positions, attention runs there, and one all-to-all
    brings the output back."""
    from i2v_kernels.ops.attention import temporal_attention as local

    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor("temporal_attention", name, t, 5)
    if layout not in ("frames", "positions"):
        raise ValueError(f"temporal_attention: layout must be 'frames' or 'positions', got {layout!r}")
    _world_rank(group)
    if layout == "positions":
        return local(q, k, v, causal=causal, scale=scale, **prologue)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"temporal_attention: q, k, v must have one shape [B, T_r, S, H, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if prologue.get("qk_norm") is not None or prologue.get("rope") is not None:
        from i2v_kernels.ops.qk_norm_rope import qk_norm_rope

        q, k = qk_norm_rope(q, k, **prologue)
    elif prologue:
        raise ValueError(f"temporal_attention: {sorted(prologue)} given without qk_norm or rope")
    B = q.shape[0]
    qkv = frames_to_positions(torch.cat((q, k, v)), group=group, num_frames=num_frames)  # [3 B, T, S_r, H, D]
    out = local(qkv[:B], qkv[B:2 * B], qkv[2 * B:], causal=causal, scale=scale)
    return positions_to_frames(out, group=group, num_positions=q.shape[2])


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, scale: Optional[float] = None,
                      kv_lens: Optional[Tensor] = None) -> Tensor:
    """Self-attention over a sequence split in contiguous shards: ``q, k, v [B, N_r, H, D]`` (uneven
    ``N_r`` allowed) -> ``[B, N_r, H, D]``. One all-to-all (q, k, v stacked) gives every rank the whole
    sequence for ``H / P`` heads (``H % P == 0``), attention runs there (``kv_lens [B]``: valid keys of
    the whole sequence), one all-to-all brings the output back."""
    from i2v_kernels.ops.attention import attention as local

    world, _ = _world_rank(group)
    H = q.shape[2]
    if H % world:
        raise ValueError(f"ulysses_attention: the heads H = {H} must divide over the {world} ranks; "
                         "use ring_attention (attention(method='auto') picks it)")
    B = q.shape[0]
    sizes = _all_sizes(q.shape[1], group, q.device)
    qkv = all_to_all(torch.cat((q, k, v), dim=0), 2, 1, group=group, gather_sizes=sizes)  # [3 B, N, H / P, D]
    out = local(qkv[:B], qkv[B:2 * B], qkv[2 * B:], scale=scale, kv_lens=kv_lens)
    return all_to_all(out, 1, 2, group=group, gather_sizes=[H // world] * world, scatter_sizes=sizes)


def _merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Two attention results over disjoint key sets -> the result over their union (online softmax):
    ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``;
    ``out [B, N, H, D]``, ``lse [B, H, N]``."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = (lse_a - lse).exp().transpose(1, 2).unsqueeze(-1)
    wb = (lse_b - lse).exp().transpose(1, 2).unsqueeze(-1)
    return out_a * wa + out_b * wb, lse


# A stand-in log-sum-exp for a key shard with no valid key (kv_lens): exp() of it against any real one
# is 0, and unlike -inf it keeps logaddexp and its gradient finite when two such shards meet.
_EMPTY_LSE = -1e30


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, scale: Optional[float] = None,
                   kv_lens: Optional[Tensor] = None, kv_sizes: Optional[Sequence[int]] = None) -> Tensor:
    """Attention of this rank's queries ``q [B, N_r, H, D]`` to the keys of every rank, each holding
    ``k, v [B, M_r, H, D]`` (any ``H``; uneven shards allowed): ``P - 1`` ring steps pass the key/value
    shards on while each rank attends to the one it holds; results merge by their log-sum-exp.
    ``kv_lens [B]`` counts valid keys of the whole (concatenated) key sequence. ``kv_sizes``: every
    rank's ``M_r`` (found with one small all-gather when None)."""
    from i2v_kernels.ops.attention import attention as local

    world, rank = _world_rank(group)
    if kv_sizes is None:
        kv_sizes = _all_sizes(k.shape[1], group, k.device)
    starts = [sum(kv_sizes[:j]) for j in range(world)]
    B, N, H, _ = q.shape
    if kv_lens is not None and not isinstance(kv_lens, torch._subclasses.FakeTensor) and kv_lens.numel() and (
            int(kv_lens.min()) < 1 or int(kv_lens.max()) > sum(kv_sizes)):
        raise ValueError(f"ring_attention: kv_lens values must be in [1, M={sum(kv_sizes)}] (the whole key sequence), "
                         f"got [{int(kv_lens.min())}, {int(kv_lens.max())}]")
    kv = torch.stack((k, v))  # one message a step
    out = lse = None
    for step in range(world):
        src = (rank - step) % world
        if step:
            shape = (2, B, kv_sizes[src]) + tuple(kv.shape[3:])
            kv = _RingStep.apply(kv, shape, group)
        if kv_sizes[src] == 0:
            continue
        lens, empty = None, None
        if kv_lens is not None:
            lens = (kv_lens - starts[src]).clamp(0, kv_sizes[src])
            empty = (lens == 0).view(B, 1, 1)
            lens = lens.clamp_min(1)  # a valid call; its result is dropped below
        o, l = local(q, kv[0], kv[1], scale=scale, kv_lens=lens, return_lse=True)
        if empty is not None:
            l = torch.where(empty, torch.full_like(l, _EMPTY_LSE), l)
        o = o.to(l.dtype)
        out, lse = (o, l) if out is None else _merge(out, lse, o, l)
    if out is None:  # no keys anywhere
        raise ValueError("ring_attention: the key sequence is empty on every rank")
    return out.to(q.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, method: str = "auto", kv_sharded: bool = True,
              scale: Optional[float] = None, kv_lens: Optional[Tensor] = None) -> Tensor:
    """Dense or cross attention for queries split in contiguous sequence shards ``q [B, N_r, H, D]``.

    ``kv_sharded=False`` (cross attention to context every rank holds whole, ``k, v [B, M, H, D]``):
    local, no communication. ``kv_sharded=True`` (self-attention, ``k, v`` sharded like ``q``):
    ``method="ulysses"``, ``"ring"``, or ``"auto"`` (Ulysses when ``H % P == 0``, else ring).
    QK-norm/RoPE apply per token, so apply them to the local shards first
    (:func:`i2v_kernels.qk_norm_rope`)."""
    from i2v_kernels.ops.attention import attention as local

    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor("attention", name, t, 4)
    if method not in ("auto", "ulysses", "ring"):
        raise ValueError(f"attention: method must be 'auto', 'ulysses' or 'ring', got {method!r}")
    world, _ = _world_rank(group)
    if not kv_sharded:
        return local(q, k, v, scale=scale, kv_lens=kv_lens)
    if method == "ulysses" or (method == "auto" and q.shape[2] % world == 0):
        return ulysses_attention(q, k, v, group=group, scale=scale, kv_lens=kv_lens)
    return ring_attention(q, k, v, group=group, scale=scale, kv_lens=kv_lens)
