"""Sequence parallelism (i2v_kernels.distributed, i2v_model.parallel) against the single-process result.

Each multi-process test spawns gloo processes on this CPU (2 and 4 ranks, tiny shapes, uneven splits of
T, S, N and H over the ranks) that compute both the sharded and the whole result from the same seeded
inputs and compare them (fp32, 1e-5), gradients included. The attention op's log-sum-exp output is
checked here too, against an fp64 reference on every backend that runs on a CPU.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import i2v_kernels
from i2v_kernels import distributed as sp
from i2v_kernels.ops.attention import reference

from _util import skip_unless_usable

ROOT = Path(__file__).resolve().parents[1]
FP32 = dict(atol=1e-5, rtol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """The same tensor on every rank."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------------------------------
# Worker checks (run in every spawned rank)


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def _compare(fn_full, fn_sp, inputs, in_dims, out_dim, seed):
    """``fn_sp`` on this rank's shards (``in_dims[i]``: the dim input ``i`` is split along; None: whole
    on every rank) against ``fn_full`` on the whole inputs: output shard and every input's gradient
    (of ``sum(out * w)``; for whole inputs, the ranks' gradients summed)."""
    full = [t.clone().requires_grad_() for t in inputs]
    out = fn_full(*full)
    w = _randn(*out.shape, seed=seed)
    (out * w).sum().backward()
    local = [(t if d is None else sp.shard(t, d)).detach().clone().requires_grad_() for t, d in zip(inputs, in_dims)]
    out_local = fn_sp(*local)
    torch.testing.assert_close(out_local, sp.shard(out.detach(), out_dim), **FP32)
    (out_local * sp.shard(w, out_dim)).sum().backward()
    for i, (f, t, d) in enumerate(zip(full, local, in_dims)):
        grad = _all_reduce(t.grad) if d is None else t.grad
        expected = f.grad if d is None else sp.shard(f.grad, d)
        torch.testing.assert_close(grad, expected, **FP32, msg=lambda m: f"input {i}: {m}")


def _check_layouts(world):
    B, T, S, C = 2, 5, 7, 3
    x = _randn(B, T, S, C, seed=1)
    xs = sp.shard(x, 1)
    for frames in (T, None):  # given, or found by the all-gather of sizes
        pos = sp.frames_to_positions(xs, num_frames=frames)
        assert torch.equal(pos, sp.shard(x, 2))
        assert torch.equal(sp.positions_to_frames(pos, num_positions=None if frames is None else S), xs)
    assert torch.equal(sp.gather(xs, 1), x)
    _compare(lambda t: t, lambda t: sp.frames_to_positions(t, num_frames=T), [x], [1], 2, seed=2)
    # every rank computes the same from the gathered tensor: each gradient is world times its own
    local = xs.clone().requires_grad_()
    w = _randn(B, T, S, C, seed=3)
    (sp.gather(local, 1) * w).sum().backward()
    torch.testing.assert_close(local.grad, world * sp.shard(w, 1))
    with pytest.raises(ValueError, match="gather_sizes"):
        sp.all_to_all(xs, 2, 1, gather_sizes=[1] * (world + 1))
    with pytest.raises(ValueError, match="scatter_dim and gather_dim"):
        sp.all_to_all(xs, 1, 1)


def _check_factorized(world):
    B, T, S, H, D = 2, 5, 7, 2, 16
    q, k, v = (_randn(B, T, S, H, D, seed=10 + i) for i in range(3))
    cos, sin = _randn(T, S, D, seed=13).cos(), _randn(T, S, D, seed=14).sin()
    wq, wk = 1 + 0.1 * _randn(D, seed=15), 1 + 0.1 * _randn(D, seed=16)
    _compare(lambda *t: i2v_kernels.spatial_attention(*t[:3], rope=(t[3], t[4])),
             lambda *t: sp.spatial_attention(*t[:3], rope=(t[3], t[4])), [q, k, v, cos, sin], [1, 1, 1, 0, 0], 1, 20)
    for causal in (False, True):
        prologue = dict(qk_norm="rms", rope_style="interleaved")
        _compare(lambda *t: i2v_kernels.temporal_attention(*t[:3], causal=causal, rope=(t[3], t[4]),
                                                           q_norm_weight=t[5], k_norm_weight=t[6], **prologue),
                 lambda *t: sp.temporal_attention(*t[:3], causal=causal, num_frames=T, rope=(t[3], t[4]),
                                                  q_norm_weight=t[5], k_norm_weight=t[6], **prologue),
                 [q, k, v, cos, sin, wq, wk], [1, 1, 1, 0, 0, None, None], 1, 21)
        _compare(lambda *t: i2v_kernels.temporal_attention(*t, causal=causal),
                 lambda *t: sp.temporal_attention(*t, causal=causal, layout="positions"), [q, k, v], [2, 2, 2], 2, 22)


def _check_dense(world):
    B, N, D = 2, 11, 8
    kv_lens = torch.tensor([3, 11])  # sample 0's keys end inside rank 0's shard: the ring's later shards are empty
    for H, methods in ((3, ("auto",)), (4, ("auto", "ring"))):  # auto: ring for H = 3, Ulysses for H = 4
        q, k, v = (_randn(B, N, H, D, seed=30 + i) for i in range(3))
        for method in methods:
            for lens in (None, kv_lens):
                _compare(lambda *t: i2v_kernels.attention(*t, kv_lens=lens),
                         lambda *t: sp.attention(*t, method=method, kv_lens=lens), [q, k, v], [1, 1, 1], 1, 40)
        # cross attention: context whole on every rank, no communication
        ctx_k, ctx_v = _randn(B, 6, H, D, seed=41), _randn(B, 6, H, D, seed=42)
        lens = torch.tensor([2, 6])
        _compare(lambda *t: i2v_kernels.attention(*t, kv_lens=lens),
                 lambda *t: sp.attention(*t, kv_sharded=False, kv_lens=lens), [q, ctx_k, ctx_v], [1, None, None], 1, 43)
    with pytest.raises(ValueError, match="kv_lens values"):  # checked against the whole key sequence
        sp.ring_attention(q, q, q, kv_lens=torch.tensor([0, N]))
    with pytest.raises(ValueError, match="must divide"):
        sp.ulysses_attention(*(_randn(B, 2, world + 1, D, seed=1) for _ in range(3)))


def _tiny_dit():
    from i2v_model.config import DiTConfig
    from i2v_model.dit import VideoDiT

    torch.manual_seed(0)
    dit = VideoDiT(DiTConfig(width=32, depth=2, heads=2, freq_dim=16), latent_channels=4, context_dim=12)
    with torch.no_grad():  # random weights everywhere: zero-initialized gates would make every block the identity
        for i, p in enumerate(dit.parameters()):
            p.copy_(0.2 * _randn(*p.shape, seed=100 + i))
    B, C, T, h, w = 2, 4, 5, 6, 6  # 5 frames, 3 x 3 = 9 positions: uneven over 2 and 4 ranks
    inputs = (_randn(B, C, T, h, w, seed=1), torch.tensor([0.3, 0.8]), _randn(B, C + 1, T, h, w, seed=2),
              _randn(B, 6, 12, seed=3), torch.tensor([4, 6]), _randn(B, 12, seed=4))
    return dit, inputs


def _check_model(world):
    from i2v_model import parallel

    dit, inputs = _tiny_dit()
    with parallel.count_block_activations(dit) as whole:
        out = dit.denoise(*inputs)
    w = _randn(*out.shape, seed=5)
    (out * w).sum().backward()
    grads = [p.grad.clone() for p in dit.parameters()]
    dit.zero_grad()

    parallel.enable(dit)
    with parallel.count_block_activations(dit) as local:
        out_sp = dit.denoise(*inputs)
    torch.testing.assert_close(out_sp, out, **FP32)
    (out_sp * w).sum().backward()
    for (name, p), g in zip(dit.named_parameters(), grads):  # averaged over the ranks, as data parallelism does
        assert p.grad is not None, name
        torch.testing.assert_close(_all_reduce(p.grad) / world, g, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # per-rank activations inside the blocks: this rank's share of the frames (plus the all-to-all buffers)
    share = sp.shard_sizes(5, world)[dist.get_rank()] / 5
    assert share * 0.9 <= local.bytes / whole.bytes <= share * 1.15, (local.bytes, whole.bytes, share)


def _worker(rank, world, port, checks):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # NaN-filled empties, as in conftest
    try:
        for check in checks:
            globals()[check](world)
    finally:
        dist.destroy_process_group()


CHECKS = ["_check_layouts", "_check_factorized", "_check_dense", "_check_model"]


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_matches_single_process(world):
    """Every sequence-parallel op and the DiT's denoiser, outputs and gradients, on 2 and 4 gloo ranks."""
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), CHECKS), nprocs=world, join=True)


def test_needs_initialized_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        sp.shard(torch.zeros(2, 3), 1)
    assert sp.shard_sizes(5, 4) == [2, 1, 1, 1] and sp.shard_range(5, 4, 1) == (2, 3)
    with pytest.raises(ValueError, match="world"):
        sp.shard_sizes(5, 0)


# --------------------------------------------------------------------------------------------------
# The CLI under torchrun


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("I2V_DIST_FAULT_RANK", "RANK", "WORLD_SIZE")}
    return dict(env, OMP_NUM_THREADS="1", **extra)


GENERATE = ["generate", "--frames", "5", "--steps", "2"]


def _torchrun(n, argv, cwd, **env):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "i2v_model"] + argv,
                          cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=120)


def _frames(path):
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("RGB"), dtype=np.int16) for f in ImageSequence.Iterator(im)])


def test_torchrun_generate_matches_single_process(tmp_path, capsys):
    from i2v_model.cli import main

    assert main(GENERATE + ["--out", str(tmp_path / "one.gif")]) == 0, capsys.readouterr().err
    two = _torchrun(2, GENERATE + ["--out", "two.gif"], tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote") == 1  # rank 0 only
    a, b = _frames(tmp_path / "one.gif"), _frames(tmp_path / "two.gif")
    assert a.shape == b.shape and len(a) == 5
    assert np.abs(a - b).max() <= 1  # fp32 rounding may move a pixel by one level
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.gif", "two.gif"]


@pytest.mark.parametrize("fault,timeout", [("1", "60"), ("1:hang", "5")], ids=["crash", "hang"])
def test_rank_crash_ends_the_others_without_output(tmp_path, fault, timeout):
    """Rank 1 dies (or stops answering) at its first collective. Launched with the environment torchrun
    would set but no agent to stop the others, rank 0's collective fails (at once; after the
    I2V_DIST_TIMEOUT seconds for the silent rank) and it says so in one line, leaving no file. (Under
    torchrun the agent also stops the remaining ranks when one fails.)"""
    env = _env(I2V_DIST_FAULT_RANK=fault, I2V_DIST_TIMEOUT=timeout, MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, "-m", "i2v_model"] + GENERATE + ["--out", "crash.gif"], cwd=tmp_path,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out0 = procs[0].communicate(timeout=90)
        if fault == "1":
            procs[1].communicate(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    if fault == "1":
        assert procs[1].returncode == 3  # the injected crash
    assert procs[0].returncode == 2
    lines = out0[1].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("i2v: error: rank 0 of 2: a collective failed"), out0[1]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# attention(..., return_lse=True)


def _lse_case(dtype, kv_lens, prologue):
    B, N, M, H, D = 2, 9, 13, 3, 16
    q, k, v = (_randn(B, n, H, D, seed=i, dtype=dtype) for i, n in enumerate((N, M, M)))
    kwargs = {}
    if prologue:
        kwargs = dict(qk_norm="rms", q_norm_weight=1 + 0.1 * _randn(D, seed=5, dtype=dtype),
                      k_norm_weight=1 + 0.1 * _randn(D, seed=6, dtype=dtype))
    lens = torch.tensor([5, 13]) if kv_lens else None
    return (q, k, v), dict(kv_lens=lens, **kwargs)


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "rms-norm"])
@pytest.mark.parametrize("kv_lens", [False, True], ids=["all-keys", "kv_lens"])
@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float32, 1e-5), ("native", torch.float32, 1e-5),
                                               ("native", torch.float16, 2e-3), ("triton", torch.float16, 2e-3),
                                               ("triton", torch.bfloat16, 2e-2)])
def test_return_lse_matches_fp64_reference(backend, dtype, tol, kv_lens, prologue):
    """out and lse, and the gradients of a loss on both, against the explicit fp64 formulas."""
    skip_unless_usable(backend)
    (q, k, v), kwargs = _lse_case(dtype, kv_lens, prologue)
    leaves = [t.requires_grad_() for t in (q, k, v, kwargs.get("q_norm_weight"), kwargs.get("k_norm_weight"))
              if t is not None]
    with i2v_kernels.use_backend(backend):
        out, lse = i2v_kernels.attention(q, k, v, return_lse=True, **kwargs)
    assert lse.shape == (2, 3, 9) and lse.dtype == torch.float32
    w_out, w_lse = _randn(*out.shape, seed=7), _randn(*lse.shape, seed=8)
    ((out.float() * w_out).sum() + (lse * w_lse).sum()).backward()

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_kwargs = dict(kwargs)
    if prologue:
        ref_kwargs.update(q_norm_weight=ref_leaves[3], k_norm_weight=ref_leaves[4])
    ref_out, ref_lse = reference.attention_lse(*ref_leaves[:3], **ref_kwargs)
    ((ref_out * w_out.double()).sum() + (ref_lse * w_lse.double()).sum()).backward()
    tols = dict(atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ref_out, **tols)
    torch.testing.assert_close(lse.double(), ref_lse, **tols)
    for t, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(t.grad.double(), r.grad, atol=4 * tol, rtol=4 * tol)


def test_return_lse_gradcheck_and_merge():
    """fp64 gradcheck through both outputs; two key halves merged by their lse equal the whole."""
    (q, k, v), kwargs = _lse_case(torch.float64, True, False)
    q, k, v = (t[:, :3, :2, :4].clone().requires_grad_() for t in (q, k, v))
    lens = torch.tensor([2, 3])
    for backend in ("torch", "native"):
        with i2v_kernels.use_backend(backend):
            torch.autograd.gradcheck(lambda *t: i2v_kernels.attention(*t, kv_lens=lens, return_lse=True), (q, k, v))
    (q, k, v), _ = _lse_case(torch.float32, False, False)
    out, lse = i2v_kernels.attention(q, k, v, return_lse=True)
    a = i2v_kernels.attention(q, k[:, :6], v[:, :6], return_lse=True)
    b = i2v_kernels.attention(q, k[:, 6:], v[:, 6:], return_lse=True)
    merged_out, merged_lse = sp._merge(*a, *b)
    torch.testing.assert_close(merged_out, out, **FP32)
    torch.testing.assert_close(merged_lse, lse, **FP32)


def test_return_lse_op_and_ineligible_backends():
    (q, k, v), kwargs = _lse_case(torch.float32, True, False)
    torch.library.opcheck(torch.ops.i2v_kernels.attention_lse.default,
                          (q.requires_grad_(), k, v, None, kwargs["kv_lens"], None, None, None, None, None, 1e-6, None,
                           None, "interleaved"))
    compiled = torch.compile(lambda *t: i2v_kernels.attention(*t, return_lse=True), backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(q, k, v), i2v_kernels.attention(q, k, v, return_lse=True)):
        torch.testing.assert_close(a, b)
    with i2v_kernels.use_backend("native_packed"), pytest.raises(i2v_kernels.BackendUnavailableError,
                                                                 match="attention_lse"):
        i2v_kernels.attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match="return_lse"):
        i2v_kernels.attention(q, k, v, return_lse=1)
    assert isinstance(i2v_kernels.attention(q, k, v), torch.Tensor)  # the default is unchanged


# --------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.needs_cuda
def test_nccl_world_size_one_smoke():
    """NCCL with one rank: the collectives, Ulysses/ring and the native return_lse path on the GPU."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        x = torch.randn(2, 5, 7, 3, device="cuda")
        assert torch.equal(sp.frames_to_positions(x), x) and torch.equal(sp.gather(x, 1), x)
        q, k, v = (torch.randn(2, 40, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        lens = torch.tensor([17, 40], device="cuda")
        whole = i2v_kernels.attention(q, k, v, kv_lens=lens)
        for method in ("ulysses", "ring"):
            torch.testing.assert_close(sp.attention(q, k, v, method=method, kv_lens=lens), whole, atol=2e-2, rtol=2e-2)
        ref_out, ref_lse = reference.attention_lse(q.double(), k.double(), v.double(), kv_lens=lens)
        for backend in ("native", "triton"):
            with i2v_kernels.use_backend(backend):
                out, lse = i2v_kernels.attention(q, k, v, kv_lens=lens, return_lse=True)
            torch.testing.assert_close(lse.double(), ref_lse, atol=1e-2, rtol=1e-2)
            torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("native", torch.float32),
                                           ("triton", torch.float16)])
def test_return_lse_non_finite_inputs_follow_the_nan_rule(backend, dtype):
    """out is what attention() gives (docs/SEMANTICS.md); lse is NaN exactly on the rows a non-finite
    query or seen key poisons, and a non-finite key behind kv_lens changes nothing."""
    skip_unless_usable(backend)
    (q, k, v), _ = _lse_case(dtype, False, False)
    lens = torch.tensor([5, 13])
    q[0, 2, 1, 3] = float("nan")     # row (0, head 1, query 2)
    k[1, 4, 0, 0] = float("inf")     # seen by every query of sample 1, head 0
    k[0, 7, 2, 5] = float("nan")     # behind kv_lens (sample 0 sees 5 keys): no effect
    v[0, 1, 2, 6] = float("nan")     # seen: column 6 of sample 0, head 2 is NaN, lse is not
    with i2v_kernels.use_backend(backend):
        out, lse = i2v_kernels.attention(q, k, v, kv_lens=lens, return_lse=True)
        plain = i2v_kernels.attention(q, k, v, kv_lens=lens)
    assert torch.equal(out.isnan(), plain.isnan())
    expected = torch.zeros(2, 3, 9, dtype=torch.bool)
    expected[0, 1, 2] = True
    expected[1, 0, :] = True
    assert torch.equal(lse.isnan(), expected)
    finite = ~expected
    _, ref_lse = reference.attention_lse(*(torch.nan_to_num(t.double(), nan=0.0, posinf=0.0) for t in (q, k, v)),
                                         kv_lens=lens)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=2e-3, rtol=2e-3)
