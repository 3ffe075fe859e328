"""Sequence-parallel DiT: the video's frames split over the ranks of a ``torch.distributed`` group.

Every block of :class:`i2v_model.dit.VideoDiT` runs spatial attention, cross attention, the MLP and
the adaLN ops per frame or per token, so with the tokens ``[B, T, S, C]`` split by frames
(:func:`i2v_kernels.distributed.shard`) they need no communication at all. Temporal attention needs
every frame of a position: one all-to-all moves the block's hidden state to a split by positions
(``[B, T, S_r, C]``), the temporal attention module runs there (its QKV projection, QK-norm and RoPE
are per token), and one all-to-all brings its output back. Two all-to-alls of ``C`` channels per token
a block, nothing else; after the last block one all-gather rebuilds the tokens for the output head
(per-frame mean tokens for the camera, the flow's running sum over frames).

Each rank's activations inside the blocks are its ``T_r / T`` share of the single-process ones
(:func:`block_activation_bytes` measures them); the text encoder, the VAE and the sampler run whole on
every rank (they are small next to the DiT at scale, and their results must agree on every rank).

``torchrun --nproc-per-node N -m i2v_model generate ...`` runs it (:func:`launch` from the CLI):
gloo on CPUs, NCCL with one GPU a rank; rank 0 writes the video, the other ranks write nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from i2v_kernels import distributed as sp

__all__ = ["Launch", "ParallelError", "SequenceParallel", "block_activation_bytes", "count_block_activations", "enable", "guard", "launch",
           "shutdown", "writes"]

TIMEOUT_ENV = "I2V_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
# Fault injection for the tests: "R" makes rank R die (os._exit) at its first collective, "R:hang" makes
# it stop answering there (sleep), as a crashed or wedged rank would.
FAULT_ENV = "I2V_DIST_FAULT_RANK"


class SequenceParallel:
    """Set as ``VideoDiT.sequence_parallel`` to run the DiT's blocks on this rank's frames.

    ``begin(tokens, rope)`` (called by ``VideoDiT.predict_motion`` on the whole ``[B, T, S, C]`` tokens
    and the ``[T, S, head_dim]`` rotary tables) returns the per-call state the blocks use, or None when
    the video has fewer frames or positions than ranks (then every rank runs it whole).
    """

    def __init__(self, group=None):
        self.group = group
        self.world, self.rank = sp._world_rank(group)

    def begin(self, tokens: Tensor, rope: tuple[Tensor, Tensor]) -> Optional["_Call"]:
        T, S = tokens.shape[1], tokens.shape[2]
        if self.world == 1 or T < self.world or S < self.world:
            return None
        return _Call(self, T, S, sp.shard(tokens, 1, self.group).contiguous(),
                     tuple(sp.shard(t, 0, self.group) for t in rope), tuple(sp.shard(t, 1, self.group) for t in rope))


@dataclass
class _Call:
    parallel: SequenceParallel
    frames: int
    positions: int
    tokens: Tensor                        # [B, T_r, S, C]: this rank's frames
    rope: tuple[Tensor, Tensor]           # [T_r, S, head_dim]
    position_rope: tuple[Tensor, Tensor]  # [T, S_r, head_dim]

    def temporal(self, attn, h: Tensor) -> Tensor:
        """``attn`` (a temporal FactorizedAttention) on frame-split ``h [B, T_r, S, C]``."""
        group = self.parallel.group
        _maybe_fail(self.parallel.rank)
        by_positions = sp.frames_to_positions(h, group=group, num_frames=self.frames)
        return sp.positions_to_frames(attn(by_positions, self.position_rope), group=group,
                                      num_positions=self.positions)

    def end(self, tokens: Tensor) -> Tensor:
        """The whole ``[B, T, S, C]`` tokens from every rank's frames, for the output head every rank runs
        whole. Training: every rank computes the same loss, and the parameters' gradients averaged over
        the ranks (an all-reduce, as data parallelism does) are the single-process gradients."""
        return sp.gather(tokens, 1, group=self.parallel.group, sizes=sp.shard_sizes(self.frames, self.parallel.world))


def _maybe_fail(rank: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault == str(rank):
        os._exit(3)  # a crash: no cleanup, no message, the peers see a closed connection
    if fault == f"{rank}:hang":
        time.sleep(3600)  # alive but silent: only the peers' collective timeout ends them


# --------------------------------------------------------------------------------------------------
# Launch from torchrun's environment


@dataclass
class Launch:
    rank: int
    world: int
    device: torch.device
    backend: str

    def enable(self, dit) -> None:
        enable(dit)


def writes(run: Optional[Launch]) -> bool:
    """Whether this process writes the outputs: a single process, or rank 0."""
    return run is None or run.rank == 0


class ParallelError(RuntimeError):
    """A collective failed: another rank crashed, was stopped, or stopped answering (timeout)."""


@contextlib.contextmanager
def guard(run: Optional[Launch]):
    """Turn a failed collective into a :class:`ParallelError` with one readable line (the CLI prints it)."""
    if run is None:
        yield
        return
    try:
        yield
    except RuntimeError as e:  # torch.distributed.DistError and gloo's/NCCL's errors are RuntimeErrors
        if isinstance(e, ParallelError) or not _is_collective_error(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParallelError(f"rank {run.rank} of {run.world}: a collective failed ({first}); another rank "
                            f"crashed or stopped answering (timeout {_timeout_s():g} s, ${TIMEOUT_ENV})") from None


def _is_collective_error(e: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def _timeout_s() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {os.environ[TIMEOUT_ENV]!r}") from None


def launch(device: torch.device) -> Optional[Launch]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...), or
    None when the process was not started by torchrun. NCCL with GPU ``LOCAL_RANK`` when ``device`` is
    CUDA, else gloo. Collectives time out after ``$I2V_DIST_TIMEOUT`` seconds (default 300), so a rank
    that stops answering ends the others with an error instead of a hang."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    import torch.distributed as dist

    timeout = _timeout_s()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = dict(device_id=device) if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
        atexit.register(shutdown)
    return Launch(dist.get_rank(), dist.get_world_size(), device, backend)


def enable(dit, group=None) -> SequenceParallel:
    """Make ``dit`` (a VideoDiT) run its blocks sequence-parallel over ``group`` (default: the world)."""
    dit.sequence_parallel = SequenceParallel(group)
    return dit.sequence_parallel


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# Activation accounting


class ActivationCount:
    bytes = 0


@contextlib.contextmanager
def count_block_activations(dit):
    """Count the bytes of the tensors autograd saves for the backward inside ``dit``'s blocks while the
    context is open (forward passes with gradients on): the activations training keeps per rank.
    Counted with ``torch.autograd.graph.saved_tensors_hooks``, each storage once, only while a block
    runs; parameters are not counted. Yields an object whose ``bytes`` is the running total."""
    params = {p.untyped_storage().data_ptr() for p in dit.parameters()}
    seen: set[int] = set()
    count = ActivationCount()
    inside = [0]

    def pack(t: Tensor):
        if inside[0]:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in params and ptr not in seen:
                seen.add(ptr)
                count.bytes += storage.nbytes()
        return t

    def enter(module, args):
        inside[0] += 1

    def leave(module, args, out):
        inside[0] -= 1

    hooks = [h for block in dit.blocks for h in (block.register_forward_pre_hook(enter),
                                                   block.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield count
    finally:
        for h in hooks:
            h.remove()


def block_activation_bytes(dit, *inputs) -> int:
    """:func:`count_block_activations` of one forward ``dit.predict(*inputs)`` with gradients on."""
    with torch.enable_grad(), count_block_activations(dit) as count:
        dit.predict(*inputs)
    return count.bytes
