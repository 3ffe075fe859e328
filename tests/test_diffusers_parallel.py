"""diffusers integration under diffusers' own context parallelism: ``enable_parallelism(
ContextParallelConfig(ulysses_degree=2 | ring_degree=2))`` on patched Wan and LTX transformers, two
processes on gloo (CPU), patch before or after ``enable_parallelism``: the output of every rank equals the
unpatched, unsharded model's. Under context parallelism our attention processors hand every call to
diffusers' (its sharded attention is diffusers'), and the fused adaLN blocks keep running on each rank's
shard of the tokens -- the op spy shows them.

diffusers 0.42 picks each rank's device as ``rank % torch.accelerator.device_count()``, which divides by
zero on a machine without an accelerator; the workers pin that count to 1 (every rank on "cpu"), the
only change to diffusers' behaviour here."""

from __future__ import annotations

import os
import socket
import sys

import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

import diffusers  # noqa: E402

if not hasattr(diffusers, "ContextParallelConfig") or not dist.is_available():
    pytest.skip("diffusers' ContextParallelConfig (0.36+) and torch.distributed are needed", allow_module_level=True)

CASES = [  # (model, parallel config, order)
    ("wan", "ulysses", "patch-then-parallel"),
    ("wan", "ulysses", "parallel-then-patch"),
    ("ltx", "ulysses", "patch-then-parallel"),
    ("ltx", "ulysses", "parallel-then-patch"),
    # ring attention merges the partial results of each rank by their log-sum-exp, which no CPU attention
    # backend of diffusers returns ("native" refuses return_lse, "_native_flash" has no CPU kernel): on
    # CPU it raises, patched or not -- the last case checks that it is diffusers' documented refusal
    ("wan", "ring", "patch-then-parallel"),
]


def _model(name: str):
    """A tiny model and a call on it (``return_dict=False``, as pipelines call it under context parallelism)."""
    from test_diffusers import ltx_model, wan_model

    torch.manual_seed(0)
    if name == "wan":
        model, _ = wan_model()
        x, context, t = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 10, 16), torch.tensor([10, 500])
        return model, lambda m: m(x, timestep=t, encoder_hidden_states=context, return_dict=False)[0]
    model, _ = ltx_model(mask="none")
    x, context, t = torch.randn(2, 4 * 4 * 4, 8), torch.randn(2, 6, 16), torch.tensor([10, 500])
    return model, lambda m: m(x, context, t, None, num_frames=4, height=4, width=4, return_dict=False)[0]


def _worker(rank: int, world: int, port: int, queue) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.accelerator.device_count = lambda: 1  # see the module docstring
        from test_diffusers import OpCounter

        from i2v_kernels.integrations.diffusers import patch

        results = []
        for name, kind, order in CASES:
            model, run = _model(name)
            with torch.no_grad():
                ref = run(model)
            config = diffusers.ContextParallelConfig(**{f"{kind}_degree": world})
            if order == "patch-then-parallel":
                patch(model)
            model.enable_parallelism(config=config)
            if order == "parallel-then-patch":
                patch(model)
            counter = OpCounter()
            try:
                with torch.no_grad(), counter:
                    out = run(model)
            except ValueError as e:
                if kind != "ring":
                    raise
                out = str(e)
            # as numpy arrays: pickled by value (a tensor would go by a shared-memory handle that dies with us)
            results.append((ref.numpy(), out if isinstance(out, str) else out.numpy(), dict(counter.calls)))
        queue.put((rank, results))
    except Exception as e:  # noqa: BLE001  (reported to the parent, which fails the test with it)
        import traceback

        queue.put((rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_context_parallel_patched_equals_unpatched():
    world = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, world, port, queue)) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        answers = dict(queue.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for rank in range(world):
        results = answers[rank]
        assert not isinstance(results, str), f"rank {rank} failed: {results}"
        for (name, kind, order), (ref, out, calls) in zip(CASES, results):
            if kind == "ring":
                assert isinstance(out, str) and "does not support return_lse" in out, out
                continue
            torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(ref), atol=1e-5, rtol=1e-5, msg=f"{name} {kind} {order} rank {rank}")
            assert calls.get("gated_residual", 0) > 0, (name, kind, order, calls)  # the patched blocks ran
            assert "attention" not in calls and "spatial_attention" not in calls, calls  # diffusers' sharded one
