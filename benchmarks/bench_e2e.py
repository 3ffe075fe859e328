"""End-to-end benchmark of the reference model: ``python -m benchmarks.bench_e2e [--device cuda] [--quick]``.

What :mod:`i2v_model` (the reference image-to-video model on i2v_kernels) costs as a whole, kernels on and
off. Ops (``--ops``):

* ``dit-forward``  one forward of :class:`i2v_model.dit.VideoDiT` -- one denoising step, the two
  classifier-free-guidance halves batched (B = 2) as the sampler runs them. CPU: the ``tiny`` model.
  GPU: the ``cogvideox-2b-like``, ``cogvideox-5b-like`` and ``wan-1.3b-like`` configs (the widths, depths,
  heads and token counts of the published DiTs, ``ModelConfig.tokens`` video tokens per sample) at their
  real depth, and at ``QUICK_LAYERS`` blocks with ``--quick`` (the label says ``2 of 30 layers``; the time
  per step at the real depth is scaled from it in the second table). Only the DiT is built on the GPU.
  Inputs are random: latent, first-frame condition, flow time, text tokens ``[B, L, text_dim]`` with
  ``kv_lens`` (the prompt's 3/4 of ``L``; the empty prompt's 2 tokens) and the pooled vector.
* ``vae-decode``   ``CausalVAE.decode(z)`` of the whole latent against the streaming decode through the
  convolutions' frame caches (``decode(z, chunk=1)`` and ``chunk=2``): time, peak memory (CUDA), and that
  the streamed video equals the whole one. CPU: the ``tiny`` VAE (17 frames at 64x64; 9 at 32x32 with
  ``--quick``).
  GPU: the ``cogvideox-2b-like`` VAE (widths 128/256/256/512) at 240x360, half of 480x720 in each
  dimension (49 frames; 17 with ``--quick``), and in full runs the ``wan-1.3b-like`` VAE at 240x416.
* ``generate``     the whole ``i2v generate``: ``I2VPipeline.generate`` on the bundled sample image
  (``i2v_model.SAMPLE_IMAGE``) with the ``tiny`` defaults (17 frames at 256x256, the CLI's default size;
  the DiT samples at its own 64x64; the config's steps and guidance): total and per-stage seconds
  (``encode``, ``denoise``, ``decode``, ``render``, as the pipeline reports them,
  plus ``load``, the ``from_pretrained`` time, outside the total), against the 10 s target on 2 CPU cores.

Providers: ``torch`` (the model built with ``use_kernels=False``: every op through its plain-PyTorch
reference), ``compile`` (``torch.compile`` of that DiT), ``kernels`` (``use_kernels=True``, the same
weights, backend ``auto``) and ``kernels-compile``; for ``vae-decode`` ``torch`` (eager, whole latent),
``whole`` (kernels, whole latent), ``streaming-1`` / ``streaming-2`` (kernels, 1 / 2 latent frames a
chunk; ``streaming-1`` only in GPU ``--quick`` runs). ``kernels``, ``whole`` (and ``streaming-*``) run
our ops unforced: backend ``auto``, whose first call tunes the model's keys; ``kernels-native`` /
``whole-native`` force every op to the ``native`` backend. Inductor spends ~20 s or more per graph on the
development CPU and ~23 s on the 2-block DiT on an H200, so the compiled providers are left out of
``--quick`` runs (a GPU one stays within 75 s); ``kernels-compile`` runs in full runs only and, for
``generate``, both compiled providers on a GPU only. Peak memory is what one call allocates beyond the live weights and
inputs (CUDA only: PyTorch's CPU allocator is invisible to ``tracemalloc``).

Weights are random (the bench never depends on trained ones): the DiT's zero-initialized layers
(adaLN-Zero gates and modulation, the output projection) are filled with random values, or the DiT would
be the identity with a zero output and every check would pass trivially. ``generate`` uses the bundled
``tiny`` weights when they ship, random ones (treated the same way) otherwise; the row says which.

Correctness before timing (``bench_conv3d.run_model_case``): the model runs in fp32 first, eager (the
reference), then is cast to the benchmark dtype; every provider's max error against the fp32 output must
be at most twice eager's own error in that dtype plus eps x the output's scale (fp32 1e-5, bf16 1e-2), and
each streamed video must match the whole decode within the same bound. ``generate``: the same check of
the video against the eager fp32 pipeline's (same weights, seed and image) on the first, untimed call,
made with ``render=False`` (the VAE's own 64x64 frames: the renderer after it is plain PyTorch, and at
256x256 it magnifies fp32 rounding of the camera map past an op-level bound). A wrong result fails the run.

CPU figures are ratios within one run; the generator's time only meets its target on an unloaded
machine (the table records the load average).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from benchmarks import utils
from benchmarks.bench_conv3d import (MODEL_EPS, ModelCase, ModelRun, _model_check, _save_rows, decode_targets,
                                     run_model_case)
from benchmarks.utils import Provider, Session

FAMILY = "e2e"
OPS = ("dit-forward", "vae-decode", "generate")
PROVIDERS = ("torch", "compile", "kernels", "kernels-native", "kernels-compile", "whole", "whole-native",
             "streaming-1", "streaming-2")
QUICK_BUDGET_S = 75
QUICK_LAYERS = 2          # DiT blocks built on a GPU with --quick
GENERATE_TARGET_S = 10.0  # issue 17: bundled generator, 17 frames 256x256, default steps, 2 cores
# generate: (first call, timed calls) per provider; the first call is the correctness check and warm-up.
GENERATE_REPS = {("cpu", True): 2, ("cpu", False): 5, ("cuda", True): 3, ("cuda", False): 10}


# --------------------------------------------------------------------------------------------------
# What runs where


@dataclass(frozen=True)
class DiTSpec:
    """A registry model's DiT: ``layers`` blocks (None: the config's depth), ``batch`` samples."""

    model: str
    layers: Optional[int] = None
    batch: int = 2  # classifier-free guidance: conditional and unconditional halves in one batch


@dataclass(frozen=True)
class VAESpec:
    """A registry model's VAE decoding ``latent_frames`` at ``height x width`` pixels; ``chunks``: the
    streaming decodes (latent frames per chunk)."""

    model: str
    latent_frames: int
    height: int
    width: int
    source: str
    chunks: tuple = (1, 2)


@dataclass(frozen=True)
class GenerateSpec:
    """``I2VPipeline.generate`` of a registry model at its default frames and steps (``steps`` overrides)."""

    model: str = "tiny"
    steps: Optional[int] = None
    size: int = 256  # the rendered frames' side (i2v generate's default --size)


LIKE = ("cogvideox-2b-like", "cogvideox-5b-like", "wan-1.3b-like")
DITS = {
    ("cpu", False): (DiTSpec("tiny"),),
    ("cpu", True): (DiTSpec("tiny"),),
    ("cuda", False): tuple(DiTSpec(m) for m in LIKE),
    ("cuda", True): tuple(DiTSpec(m, QUICK_LAYERS) for m in LIKE),
}
VAES = {
    ("cpu", False): (VAESpec("tiny", 5, 64, 64, "the tiny VAE at its own size: 17 frames at 64x64"),),
    ("cpu", True): (VAESpec("tiny", 3, 32, 32, "the tiny VAE, 9 frames at 32x32"),),
    ("cuda", False): (
        VAESpec("cogvideox-2b-like", 13, 240, 360, "cogvideox-2b-like VAE (widths 128/256/256/512), 13 latent "
                "frames -> 49 frames at 240x360 (half of 480x720 in each dimension)"),
        VAESpec("wan-1.3b-like", 21, 240, 416, "wan-1.3b-like VAE (widths 96/192/384/384), 21 latent frames -> "
                "81 frames at 240x416 (half of 480x832 in each dimension)"),
    ),
    ("cuda", True): (VAESpec("cogvideox-2b-like", 5, 240, 360, "cogvideox-2b-like VAE (widths 128/256/256/512), "
                             "5 latent frames -> 17 frames at 240x360", chunks=(1,)),),
}
GENERATES = {key: (GenerateSpec("tiny"),) for key in DITS}


# --------------------------------------------------------------------------------------------------
# Helpers


def wake_zero_layers(module: nn.Module) -> int:
    """Fill every all-zero ``nn.Linear`` of ``module`` with random values; returns how many there were.

    adaLN-Zero initializes the gates, the modulation and the output projection to zero, which makes a
    fresh DiT the identity with a zero output. Weights ``N(0, 0.5^2 / fan_in)`` keep each output at about
    half its input's scale, so a deep stack stays finite in bf16.
    """
    n = 0
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear) and not bool(m.weight.any()):
                nn.init.normal_(m.weight, std=0.5 / m.in_features ** 0.5)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=0.02)
                n += 1
    return n


def shared_copy(build: Callable[[], nn.Module], source: nn.Module) -> nn.Module:
    """``build()`` holding ``source``'s parameters and buffers (the same tensors, no second copy).

    Built on the meta device, then assigned; a module with state outside its ``state_dict`` (left on
    the meta device) is built for real and loaded instead.
    """
    with torch.device("meta"):
        model = build()
    model.load_state_dict(source.state_dict(), assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        ref = next(source.parameters())
        with torch.device(ref.device):
            model = build()
        model.to(ref.dtype).load_state_dict(source.state_dict())
    return model.eval()


def _cast(inputs: tuple, dtype: torch.dtype) -> tuple:
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in inputs)


def _compile_why_not(session: Session, full_only: bool = False) -> Optional[str]:
    if session.device.type == "cpu" and session.quick:
        return "left out of --quick on the CPU: inductor spends ~20 s or more compiling one graph on this machine"
    if full_only and session.quick:
        return "full runs only (a second compile of the whole model)"
    if session.quick:
        # Measured on an H200: the 2-block cogvideox-2b-like DiT took 23 s to compile, and the --quick run
        # (75 s budget) was past it before its generate case; full runs compile every DiT.
        return ("left out of --quick on the GPU: compiling even the 2-block DiT takes ~23 s on an H200, a third of "
                "the run's time budget")
    return None


# --------------------------------------------------------------------------------------------------
# dit-forward


def dit_config(spec: DiTSpec):
    """``(config with the depth cut to spec.layers, the config's real depth)``."""
    from i2v_model.config import get_config

    cfg = get_config(spec.model)
    real = cfg.dit.depth
    if spec.layers is not None:
        cfg.dit.depth = min(spec.layers, real)
    return cfg, real


def prompt_lens(batch: int, max_len: int) -> list[int]:
    """Text tokens kept per sample: the prompt (3/4 of the context) for the conditional half, the empty
    prompt's 2 (begin, end) for the unconditional one."""
    return [max(2, 3 * max_len // 4) if b % 2 == 0 else 2 for b in range(batch)]


def dit_inputs(cfg, batch: int, device: torch.device) -> tuple:
    """``(x, t, cond, context, kv_lens, pooled)`` for ``VideoDiT.forward``, fp32, random."""
    from i2v_model.sampler import image_condition

    C, T = cfg.vae.latent_channels, cfg.latent_frames
    h, w = cfg.latent_size
    L, Ct = cfg.text.max_len, cfg.text.out_dim
    x = torch.randn(batch, C, T, h, w, device=device)
    t = torch.full((batch,), 0.7, device=device)  # both guidance halves at the same flow time
    cond = image_condition(torch.randn(1, C, 1, h, w, device=device), T).expand(batch, -1, -1, -1, -1).contiguous()
    context = torch.randn(batch, L, Ct, device=device)
    kv_lens = torch.tensor(prompt_lens(batch, L), device=device)
    pooled = torch.randn(batch, Ct, device=device)
    return x, t, cond, context, kv_lens, pooled


def dit_flops(cfg, batch: int) -> int:
    """Matmul and attention FLOPs of one forward (norms, RoPE and elementwise work left out).

    Per block, with ``N = B T S`` tokens of width ``D``: QKV + output projections of the spatial and
    temporal attention ``2 x 8 N D^2``; spatial attention ``4 (B T) S^2 D``; temporal ``4 (B S) T^2 D``;
    cross attention ``q`` and output ``4 N D^2``, ``k, v`` ``4 B L C_text D``, attention ``4 T S D sum(kv_lens)``;
    MLP ``4 N D M``; the modulation ``24 B D^2``. Plus the patch embedding and the output projection.
    """
    d = cfg.dit
    C, T = cfg.vae.latent_channels, cfg.latent_frames
    h, w = cfg.latent_size
    S = (h // d.patch) * (w // d.patch)
    N, D, M = batch * T * S, d.width, int(d.width * d.mlp_ratio)
    L, Ct = cfg.text.max_len, cfg.text.out_dim
    kept = sum(prompt_lens(batch, L))
    block = (16 * N * D * D + 4 * batch * T * S * S * D + 4 * batch * S * T * T * D
             + 4 * N * D * D + 4 * batch * L * Ct * D + 4 * T * S * D * kept
             + 4 * N * D * M + 24 * batch * D * D)
    outside = (2 * N * (2 * C + 1) * d.patch ** 2 * D + 2 * N * D * C * d.patch ** 2
               + 2 * batch * (d.freq_dim * D + D * D + Ct * D + 2 * D * D))
    return d.depth * block + outside


def _dit_case(spec: DiTSpec, dtype: torch.dtype, session: Session) -> ModelCase:
    from i2v_model.dit import VideoDiT

    cfg, real_depth = dit_config(spec)
    C, Ct = cfg.vae.latent_channels, cfg.text.out_dim

    def build(use_kernels: bool) -> Callable[[], nn.Module]:
        return lambda: VideoDiT(cfg.dit, C, Ct, use_kernels=use_kernels)

    def setup(device: torch.device) -> ModelRun:
        with torch.device(device):
            eager = build(False)().eval()
        wake_zero_layers(eager)
        inputs = dit_inputs(cfg, spec.batch, device)
        reference = eager(*inputs)  # the fp32 eager model: the oracle
        eager.to(dtype)
        kernels = shared_copy(build(True), eager)

        def run_eager(*a):
            return eager(*a)

        def run_kernels(*a):
            return kernels(*a)

        providers = [utils.eager_provider(run_eager)]
        if session.wants("compile"):
            providers.append(utils.compile_provider(run_eager, why_not=_compile_why_not(session)))
        if session.wants("kernels"):
            providers.append(utils.auto_provider(run_kernels, "kernels"))
        if session.wants("kernels-native"):
            providers.append(Provider("kernels-native", utils.forced("native", run_kernels), kind="ours", loose=True))
        if session.wants("kernels-compile"):
            why = _compile_why_not(session, full_only=True)
            providers.append(Provider("kernels-compile", why_not=why, kind="ours") if why else
                             Provider("kernels-compile", torch.compile(run_kernels, dynamic=False), kind="ours",
                                      skip_on_failure=True))
        return ModelRun(inputs=_cast(inputs, dtype), reference=reference, providers=providers)

    h, w = cfg.latent_size
    label = spec.model + (f" ({cfg.dit.depth} of {real_depth} layers)" if cfg.dit.depth != real_depth else "")
    extra = {"model": spec.model, "layers": cfg.dit.depth, "real_layers": real_depth, "batch": spec.batch,
             "tokens_per_sample": cfg.tokens, "text_tokens": cfg.text.max_len,
             "kv_lens": prompt_lens(spec.batch, cfg.text.max_len), "width": cfg.dit.width, "heads": cfg.dit.heads,
             "default_steps": cfg.steps,
             "flops_note": "matmul + attention FLOPs (norms, RoPE, elementwise work left out)"}
    return ModelCase(op="dit-forward", label=label, dims=[spec.batch, C, cfg.latent_frames, h, w], dtype=dtype,
                     setup=setup, provider_names=("torch", "compile", "kernels", "kernels-native", "kernels-compile"),
                     extra=extra,
                     flops=dit_flops(cfg, spec.batch))


def dit_targets(row: dict, case: ModelCase, session: Session) -> dict:
    if row["provider"] != "kernels":
        return {}
    if session.device.type != "cuda" or case.dtype != torch.bfloat16:
        return {"targets": "n/a (GPU, bf16)"}
    if case.extra["model"] != "cogvideox-2b-like":
        return {"targets": "n/a (set at cogvideox-2b-like)"}
    vs_eager, vs_compile = row["ratio_vs_eager"], row["ratio_vs_compile"]
    return {
        "eager>=1.5x": "n/a" if vs_eager is None else f"{utils.verdict(vs_eager >= 1.5)} ({vs_eager:.2f}x)",
        "compile>=1.15x": "n/a (compile not run)" if vs_compile is None else
        f"{utils.verdict(vs_compile >= 1.15)} ({vs_compile:.2f}x)",
    }


# --------------------------------------------------------------------------------------------------
# vae-decode


def _vae_case(spec: VAESpec, dtype: torch.dtype, session: Session) -> ModelCase:
    from i2v_model.config import get_config
    from i2v_model.vae import CausalVAE

    vcfg = get_config(spec.model).vae
    C, s, f = vcfg.latent_channels, vcfg.spatial_factor, vcfg.temporal_factor
    z_dims = [1, C, spec.latent_frames, spec.height // s, spec.width // s]
    streams = {f"streaming-{c}": c for c in spec.chunks}

    def setup(device: torch.device) -> ModelRun:
        with torch.device(device):
            eager = CausalVAE(vcfg, use_kernels=False).eval()
        z32 = torch.randn(z_dims, device=device)
        reference = eager.decode(z32)
        eager.to(dtype)
        with torch.device(device):
            kernels = CausalVAE(vcfg, use_kernels=True).to(dtype).eval()
        kernels.load_state_dict(eager.state_dict())

        providers = [utils.eager_provider(lambda z: eager.decode(z))]
        if session.wants("whole"):
            providers.append(utils.auto_provider(lambda z: kernels.decode(z), "whole"))
        if session.wants("whole-native"):
            providers.append(Provider("whole-native", utils.forced("native", lambda z: kernels.decode(z)), kind="ours",
                                      loose=True))
        for name, chunk in streams.items():
            if session.wants(name):
                providers.append(Provider(name, lambda z, chunk=chunk: kernels.decode(z, chunk=chunk), kind="ours"))
        return ModelRun(inputs=(z32.to(dtype),), reference=reference, providers=providers,
                        same_as={name: "whole" for name in streams})

    frames = 1 + f * (spec.latent_frames - 1)
    label = f"{spec.model} {frames}x{spec.height}x{spec.width}"
    extra = {"model": spec.source, "widths": list(vcfg.channels), "output": [1, vcfg.in_channels, frames, spec.height,
                                                                              spec.width],
             "chunks_latent_frames": list(spec.chunks)}
    return ModelCase(op="vae-decode", label=label, dims=z_dims, dtype=dtype, setup=setup,
                     provider_names=("torch", "whole", "whole-native", *streams), extra=extra)


# --------------------------------------------------------------------------------------------------
# generate


def _sync_at_end(device: torch.device):
    """A ``progress`` wrapper that waits for the GPU after the last step, so the pipeline's ``denoise``
    time covers the work it launched (its timer is host-side). None on the CPU."""
    if device.type != "cuda":
        return None

    def wrap(steps):
        yield from steps
        torch.cuda.synchronize(device)

    return wrap


def run_generate_case(session: Session, spec: GenerateSpec, dtype: torch.dtype) -> list[dict]:
    """Time ``I2VPipeline.generate`` per provider (rows as :func:`run_model_case` writes them, plus
    ``stages``: median seconds per stage, ``other`` = total - stages, and ``load``)."""
    import i2v_kernels
    import i2v_model
    from i2v_model.io import load_image
    from i2v_model.pipeline import I2VPipeline

    device = session.device
    session._case_load = utils._load_avg()  # the row's load_avg, as run_model_case records it
    reps = GENERATE_REPS[(device.type, session.quick)]
    progress = _sync_at_end(device)
    rows: list[dict] = []

    def load(use_kernels: bool, dt: torch.dtype):
        start = time.perf_counter()
        pipe = I2VPipeline.from_pretrained(spec.model, use_kernels=use_kernels, device=device, dtype=dt)
        session.sync()
        return pipe, time.perf_counter() - start

    torch.manual_seed(0)
    eager, eager_load = load(False, torch.float32)
    cfg = eager.cfg  # bundled weights carry their own config
    weights = "trained (bundled)" if eager.pretrained else "random"
    if not eager.pretrained:
        n = wake_zero_layers(eager.dit)
        weights += f" (no trained weights here; {n} zero-initialized DiT layers filled with random values)"
    steps = spec.steps or cfg.steps
    H, W, F = spec.size, spec.size, cfg.frames
    label = (f"{spec.model} {F}x{H}x{W} (DiT at {cfg.height}x{cfg.width}), {steps} steps"
             + ("" if spec.steps is None else f" (default {cfg.steps})"))
    extra = {"model": spec.model, "frames": F, "size": spec.size, "steps": steps, "default_steps": cfg.steps,
             "guidance": cfg.guidance,
             "image": i2v_model.SAMPLE_IMAGE.name, "weights": weights}
    case = ModelCase(op="generate", label=label, dims=[3, F, H, W], dtype=dtype, setup=None, extra=extra)
    print(f"\n== generate  {label}  {case.dims}  {utils.dtype_name(dtype)}", flush=True)

    def row(name, kind, status, auto=False, dispatch=None, **kw):
        r = session._row(case, name, kind=kind, status=status, bytes_=0, flops=0, **kw)
        r.update(auto=auto, dispatch=dispatch)
        return r

    auto = Provider("kernels", auto=True)  # the name note_dispatch prints under
    image = load_image(i2v_model.SAMPLE_IMAGE, H, W)
    prompt = eager.cfg.default_prompt

    def call(pipe, render: bool = True):
        start = time.perf_counter()
        # The check runs render=False: the VAE's own 64x64 frames, where the model's ops act. The renderer
        # is plain PyTorch on the DiT's camera map, and at 256x256 it turns a 1e-6 change of that map
        # (fp32 rounding of another kernel) into ~2e-5 at a sharp edge, past an fp32 bound meant for ops.
        small = image if render else load_image(i2v_model.SAMPLE_IMAGE, cfg.height, cfg.width)
        video, stages = pipe.generate(small, prompt, steps=steps, seed=0, progress=progress, render=render)
        session.sync()
        return video, stages, time.perf_counter() - start

    with torch.no_grad():
        reference, _, reference_s = call(eager, render=False)  # the eager fp32 pipeline: the oracle
        reference = reference.float()
        scale = reference.abs().max().item()
        if dtype != torch.float32:
            eager.to(dtype=dtype)

        def copy_of(use_kernels: bool, compiled: bool = False):
            pipe, seconds = load(use_kernels, dtype)
            pipe.load_state_dict(eager.state_dict())
            if compiled:
                torch._dynamo.reset()
                pipe.compile_dit(dynamic=False)
            return pipe, seconds

        why_compile = _compile_why_not(session)
        if why_compile is None and device.type != "cuda":
            why_compile = "GPU runs only: on the CPU inductor takes longer to compile the DiT than generating takes"
        why_kc = why_compile or _compile_why_not(session, full_only=True)
        why_native = None
        if device.type == "cpu" and session.quick:
            why_native = ("left out of --quick on the CPU: with every op forced to native (PyTorch's bf16/fp16 CPU "
                          "convolutions) generate takes 5-18 s a call here")
        # (provider, kind, build the pipeline, why not run, backend forced around its calls)
        plan = [("torch", "eager", lambda: (eager, eager_load), None, None),
                ("compile", "baseline", lambda: copy_of(False, compiled=True), why_compile, None),
                ("kernels", "ours", lambda: copy_of(True), None, None),
                ("kernels-native", "ours", lambda: copy_of(True), why_native, "native"),
                ("kernels-compile", "ours", lambda: copy_of(True, compiled=True), why_kc, None)]
        eps = MODEL_EPS.get(dtype, 1e-5)
        own_err = None
        timed = []  # (row, run_once, load seconds) of the checked providers, timed below
        for name, kind, make, why_not, force in plan:
            if not session.wants(name):
                continue
            if why_not is not None:
                print(f"   {name:<14} skipped: {why_not}", flush=True)
                rows.append(row(name, kind, "skipped", note=why_not))
                continue
            pipe, load_s = make()
            is_auto = name == "kernels"

            def run_once(pipe=pipe, force=force, render=True):
                with i2v_kernels.use_backend(force) if force else contextlib.nullcontext():
                    return call(pipe, render)

            if is_auto:
                utils.reset_dispatch()  # the pipeline's keys are measured in its first call, not in the timed ones
            try:
                if name == "torch" and dtype == torch.float32:
                    video, first_s = reference, reference_s  # the reference run was this provider's first call
                else:
                    video, _, first_s = run_once(render=False)
            except Exception as e:  # noqa: BLE001 -- any failure of the provider is recorded in its row
                msg = f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]
                skip = name.endswith("compile")
                print(f"   {name:<14} {'skipped: failed on its first call' if skip else 'ERROR'} ({msg})", flush=True)
                rows.append(row(name, kind, "skipped" if skip else "error", correct=None if skip else False,
                                note=f"failed on its first call: {msg}" if skip else msg))
                continue
            decisions = utils.note_dispatch(auto) if is_auto else None
            ok, err, tol, problem = _model_check(video, reference, kind, own_err, eps, scale)
            if kind == "eager":
                own_err = err
            del video
            if not ok:
                print(f"   {name:<14} WRONG: {problem} (max abs error {err:.3g})", flush=True)
                rows.append(row(name, kind, "wrong", note=problem, correct=False, max_err=err, tol=[tol, 0.0],
                                first_call_s=first_s, auto=is_auto, dispatch=decisions))
                continue
            r = row(name, kind, "ok", reps=reps, correct=True, max_err=err, tol=[tol, 0.0], first_call_s=first_s,
                    auto=is_auto, dispatch=decisions,
                    note=f"reference: the eager fp32 pipeline (same weights, seed and image); {weights}")
            rows.append(r)
            timed.append((r, run_once, load_s))

        # The checked providers generate in turns (one call each per round, the order reversed every
        # other round), as utils.time_cpu_in_turns does for ops: a load change hits them alike.
        totals: list[list[float]] = [[] for _ in timed]
        stages: list[list[dict]] = [[] for _ in timed]
        for i in range(reps):
            for j in (range(len(timed)) if i % 2 == 0 else reversed(range(len(timed)))):
                _, st, total = timed[j][1]()
                totals[j].append(total)
                stages[j].append(st)
        for (r, run_once, load_s), tot, st in zip(timed, totals, stages):
            peak = utils.cuda_peak_mb(lambda: run_once()[0], device) if device.type == "cuda" else None
            median = {k: statistics.median(s[k] for s in st) for k in st[0]}
            total = statistics.median(tot)
            median["other"] = max(0.0, total - sum(median.values()))
            median["load"] = load_s
            r.update(ms=total * 1e3, ms_min=min(tot) * 1e3, peak_mem_mb=peak, stages=median)
            print(f"   {r['provider']:<14} {total:8.3f} s  (min {min(tot):.3f}, {reps} reps; "
                  + ", ".join(f"{k} {v:.3f}" for k, v in median.items()) + f"; max err {r['max_err']:.2e})",
                  flush=True)
        del timed

    session.finish_case(case, rows, generate_targets)
    utils.print_speedups(rows)
    del eager
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    _save_rows(session, rows)
    return rows


def generate_targets(row: dict, case: ModelCase, session: Session) -> dict:
    if row["provider"] != "kernels":
        return {}
    if session.device.type != "cpu" or case.extra["model"] != "tiny":
        return {"<=10s": "n/a (CPU target, tiny)"}
    if case.dtype != torch.float32:
        return {"<=10s": "n/a (i2v generate runs fp32 on the CPU)"}
    vs_eager = row["ratio_vs_eager"]
    out = {"eager>=1.0x": "n/a" if vs_eager is None else f"{utils.verdict(vs_eager >= 1.0)} ({vs_eager:.2f}x)"}
    if case.extra["steps"] != case.extra["default_steps"]:
        out["<=10s"] = f"n/a ({case.extra['steps']} steps, not the default {case.extra['default_steps']})"
        return out
    seconds = row["ms"] * 1e-3
    threads = torch.get_num_threads()
    where = "" if threads == 2 else f"; {threads} thread{'s' if threads > 1 else ''}, the target is for 2 cores"
    out["<=10s"] = (f"{utils.verdict(seconds <= GENERATE_TARGET_S)} ({seconds:.2f} s = "
                    f"{seconds / GENERATE_TARGET_S:.2f}x of {GENERATE_TARGET_S:.0f} s{where})")
    return out


# --------------------------------------------------------------------------------------------------
# Report


LEGEND = (
    "dit-forward (GPU, bf16, cogvideox-2b-like): `eager>=1.5x` the `kernels` forward at least 1.5x eager "
    "(`torch`, every op through its plain-PyTorch reference); `compile>=1.15x` at least 1.15x torch.compile of "
    "that eager model. Other shapes: n/a (the speedups are still shown). `--quick` builds 2 blocks; the ratio then "
    "stands for the real depth, as the blocks are nearly all of the work.",
    "vae-decode: `same` the streamed video equals the whole decode (checked before timing: a mismatch fails the "
    "run); `mem<=1/3` (GPU) the streaming decode's peak memory at most 1/3 of the whole decode's (`whole`, the "
    "same kernels).",
    "generate: `<=10s` the `kernels` pipeline (`i2v generate` with backend auto) makes the tiny model's "
    "default video (17 frames at 256x256, default steps) in at most 10 s on 2 CPU cores; `eager>=1.0x` (CPU) it is "
    "at least as fast as the eager pipeline; times are `I2VPipeline.generate` (encode + denoise + decode + render), "
    "model "
    "loading shown apart.",
    "`kernels`, `whole` (and diffusers' `patched`): our ops unforced, i.e. `auto` -- the rows the first rule is "
    "about; `kernels-native` / `whole-native`: the same model with every op forced to the `native` backend.",
    "Correctness: max |out - fp32 eager model| <= 2 x eager's own error in the same dtype + eps x max |fp32 "
    "output| (eps: fp32 1e-5, fp16 1e-3, bf16 1e-2). Peak MiB: what one call allocates beyond the live weights "
    "and inputs (CUDA only).",
)


def _s(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def extra_tables(session: Session) -> list[str]:
    lines: list[str] = []
    dit = [r for r in session.rows if r["op"] == "dit-forward" and r["status"] == "ok"]
    if dit:
        matmul = session.roofline.get("matmul_tflops")
        lines += ["", "## DiT forward: throughput and time per denoising step", "",
                  "One forward = one step (CFG batched, B = 2). Time per step at the real depth = forward x real "
                  "layers / layers built (the parts outside the blocks are scaled too, so a cut model slightly "
                  "overstates); denoise = that x the config's default steps. TFLOP/s from matmul + attention FLOPs; "
                  "% of the bf16 matmul rate measured on the card (GPU only).", "",
                  "| model | dtype | provider | tokens (B x N) | layers built / real | forward ms | TFLOP/s | "
                  "% matmul | ms per step (real depth) | denoise s (default steps) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in dit:
            s = r["shape"]
            step = r["ms"] * s["real_layers"] / s["layers"]
            frac = "-" if not (matmul and r["tflops"]) else f"{100 * r['tflops'] / matmul:.0f}%"
            lines.append(f"| {s['label']} | {r['dtype']} | {r['provider']} | "
                         f"{s['batch']} x {s['tokens_per_sample']:,} | "
                         f"{s['layers']} / {s['real_layers']} | {r['ms']:.3f} | {utils._fmt_num(r['tflops'], 2)} | "
                         f"{frac} | {step:,.1f} | {step * s['default_steps'] / 1e3:,.2f} |")
    vae = [r for r in session.rows if r["op"] == "vae-decode" and r["status"] == "ok"]
    if vae:
        lines += ["", "## VAE decode: whole vs streaming", "",
                  "`x whole`: the whole decode's time (kernels) / this row's (> 1 is faster); `peak / whole`: "
                  "peak memory relative to it (CUDA only).", "",
                  "| VAE | latent -> video | dtype | provider | ms | x whole | peak MiB | peak / whole |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in vae:
            whole = next((w for w in vae if w["provider"] == "whole" and w["shape"]["label"] == r["shape"]["label"]
                          and w["dtype"] == r["dtype"]), None)
            x_whole = "-" if whole is None else f"{whole['ms'] / r['ms']:.2f}x"
            peak_frac = ("-" if whole is None or not whole["peak_mem_mb"] or r["peak_mem_mb"] is None
                         else f"{r['peak_mem_mb'] / whole['peak_mem_mb']:.2f}")
            dims = "x".join(map(str, r["shape"]["dims"])) + " -> " + "x".join(map(str, r["shape"]["output"]))
            lines.append(f"| {r['shape']['label']} | {dims} | {r['dtype']} | {r['provider']} | {r['ms']:.3f} | "
                         f"{x_whole} | {utils._fmt_num(r['peak_mem_mb'])} | {peak_frac} |")
    gen = [r for r in session.rows if r["op"] == "generate" and r["status"] == "ok"]
    if gen:
        lines += ["", "## i2v generate: seconds per stage", "",
                  "Median over the timed calls; `total` is the wall clock of `I2VPipeline.generate` (synchronized on "
                  "a GPU), `other` what the stages leave out, `load` the `from_pretrained` time (not in the total).",
                  "", "| model | dtype | provider | load | encode | denoise | decode | render | other | total | "
                  "x eager | target |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in gen:
            st = r["stages"]
            lines.append(f"| {r['shape']['label']} | {r['dtype']} | {r['provider']} | {_s(st.get('load'))} | "
                         f"{_s(st.get('encode'))} | {_s(st.get('denoise'))} | {_s(st.get('decode'))} | "
                         f"{_s(st.get('render'))} | "
                         f"{_s(st.get('other'))} | {r['ms'] * 1e-3:.3f} | {utils._fmt_x(r['ratio_vs_eager'])} | "
                         f"{utils._targets_text(r['targets'])} |")
    return lines


# --------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    session = utils.start_session(FAMILY, "End-to-end benchmark of the reference image-to-video model", PROVIDERS,
                                  OPS, argv, QUICK_BUDGET_S)
    if session.device.type == "cuda":
        # the fp32 references in true fp32 (cuDNN would run the VAE's fp32 convs in TF32)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    key = (session.device.type, session.quick)
    for dtype in session.dtypes:
        if session.wants_op("dit-forward"):
            for spec in DITS[key]:
                run_model_case(session, _dit_case(spec, dtype, session), dit_targets)
        if session.wants_op("vae-decode"):
            for spec in VAES[key]:
                run_model_case(session, _vae_case(spec, dtype, session), decode_targets)
        if session.wants_op("generate"):
            for spec in GENERATES[key]:
                run_generate_case(session, spec, dtype)
    status = session.finish("End to end: the reference image-to-video model (i2v_model)", LEGEND)
    session.add_tables(extra_tables(session))
    return status


if __name__ == "__main__":
    sys.exit(main())
