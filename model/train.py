"""``i2v train``: train the VAE, then the DiT and text encoder, on procedural clips; export the weights.

Stages (``--stage vae|dit|decoder|all``; ``all`` runs them in this order):

1. **vae** -- reconstruct random ``crop x crop`` windows of ``vae_frames``-frame clips (the VAE is fully
   convolutional and causal, so it transfers to 64x64, 17 frames): L1 + MSE + a small KL term. Then
   the latent mean/std are measured on full clips and stored in the VAE (the DiT's latent scale).
2. **dit** -- flow matching on latents of 17-frame clips, the DiT predicting the clean latent (as a
   residual over the first frame, preconditioned as EDM does, see :meth:`VideoDiT.denoise`), each noise
   level weighted alike in the network's output units, plus (``camera_weight``) a loss on the DiT's
   camera head against each clip's known camera path (:func:`i2v_model.data.camera_flow`): trained
   through the warp alone, the learned zooms and rotations stayed at well under half their size
   (zoom out near none). A pool of encoded clips is kept in memory
   and partly refreshed with new clips every ``refresh_every`` steps (encoding every batch would cost
   more than the DiT step). Prompts are dropped 10% of the time (classifier-free guidance). An EMA of
   the DiT and text encoder is what gets exported.
3. **decoder** (``decoder_steps > 0``) -- more reconstruction steps for the VAE decoder alone, on the
   posterior mean (what generation decodes), the encoder frozen: the latent space the DiT learned stays
   exactly as it was, so this can follow the DiT stage. Its checkpoint's VAE is the one exported.

Reproducible and resumable: all randomness is a function of ``(seed, step)`` (clip ``i`` of the data
stream is fixed, see :mod:`i2v_model.data`), the run folder holds ``config.json`` and one checkpoint
per stage (model, optimizer, EMA, step, the latent pool), written atomically every ``ckpt_every``
steps; running the same command again continues where it stopped.

Fine-tuning: ``--dit-from WEIGHTS`` starts the DiT and text encoder from an exported file (with
``--vae-from`` the same file, its latent space); parameters it lacks, such as a head added since,
start from their initialization.

Export: ``i2v train --run DIR --export [--weights PATH]`` writes one safetensors file (VAE + text
encoder EMA + DiT EMA, the model config in its metadata) -- by default the bundled
``model/weights/tiny.safetensors``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from i2v_model.config import get_config
from i2v_model.data import ClipSource, camera_flow
from i2v_model.evaluate import psnr
from i2v_model.pipeline import I2VPipeline, weights_path
from i2v_model.sampler import image_condition, sample_timesteps, x0_matching_loss

__all__ = ["TrainConfig", "export", "main", "train_dit", "train_vae"]


@dataclass
class TrainConfig:
    model: str = "tiny"
    seed: int = 0
    threads: int = 0              # torch threads (0: torch's default)
    use_kernels: bool = False     # train through i2v_kernels ops (True) or their eager references
    # VAE stage
    vae_steps: int = 4000
    vae_batch: int = 8
    vae_frames: int = 9
    vae_crop: int = 32
    vae_lr: float = 1.5e-3
    kl_weight: float = 1e-6
    stats_clips: int = 32         # full-size clips that measure the latent mean/std
    # DiT stage
    dit_steps: int = 7500
    dit_batch: int = 12
    dit_lr: float = 5e-4
    pool: int = 1024              # encoded clips kept in memory
    refresh_every: int = 100      # steps between pool refreshes
    refresh: int = 32             # clips replaced per refresh
    cfg_drop: float = 0.1
    camera_weight: float = 1.0    # loss on the DiT's camera flow against the clips' known camera path
    dit_from: str = ""            # start the DiT and text encoder from an exported weights file (fine-tuning)
    # decoder stage (after the DiT; 0 skips it)
    decoder_steps: int = 0
    decoder_lr: float = 5e-4
    ema: float = 0.999
    warmup: int = 200
    ckpt_every: int = 200
    log_every: int = 50


def _progress(total: int, initial: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if tty else 60.0)


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _generator(cfg: TrainConfig, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, stage, step]).generate_state(1)[0]))


def _log(run: Path, line: str) -> None:
    print(line, flush=True)
    with open(run / "log.txt", "a") as f:
        f.write(line + "\n")


def _update(opt: torch.optim.Optimizer, params, loss: Tensor, bar) -> None:
    """One optimizer step on ``loss`` (gradients clipped to norm 1), and the progress bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)


def _crop_batch(cfg: TrainConfig, source: ClipSource, step: int, gen: torch.Generator) -> Tensor:
    """Batch ``step`` of the reconstruction stages: ``vae_batch`` clips cut to one random
    ``vae_crop``-square window (on the 8-pixel latent grid), channels-last."""
    video, _, _ = source.batch(step * cfg.vae_batch, cfg.vae_batch)
    c = cfg.vae_crop
    y0, x0 = (int(v) for v in torch.randint(0, source.size - c + 1, (2,), generator=gen) // 8 * 8)
    return video[..., y0:y0 + c, x0:x0 + c].contiguous(memory_format=torch.channels_last_3d)


# ------------------------------------------------------------------------------------------------


def train_vae(cfg: TrainConfig, run: Path, pipe: Optional[I2VPipeline] = None) -> I2VPipeline:
    mcfg = get_config(cfg.model)
    pipe = pipe or I2VPipeline(mcfg, use_kernels=cfg.use_kernels)
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    ckpt_path, step = run / "vae.pt", 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    source = ClipSource(cfg.seed, cfg.vae_frames, mcfg.width)
    bar = _progress(cfg.vae_steps, step, "vae") if step < cfg.vae_steps else None
    start, t0 = step, time.perf_counter()
    while step < cfg.vae_steps:
        gen = _generator(cfg, 1, step)
        video = _crop_batch(cfg, source, step, gen)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup)
        recon, mean, logvar = vae(video, generator=gen)
        l1 = (recon - video).abs().mean()
        mse = ((recon - video) ** 2).mean()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = l1 + mse + cfg.kl_weight * kl
        _update(opt, vae.parameters(), loss, bar)
        step += 1
        if step % cfg.log_every == 0 or step == cfg.vae_steps:
            rate = (step - start) / (time.perf_counter() - t0)
            _log(run, f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f} l1 {l1.item():.4f} "
                      f"psnr {psnr(recon.detach(), video):.2f} kl {kl.item():.2f} {rate:.2f} steps/s")
        if step % cfg.ckpt_every == 0 or step == cfg.vae_steps:
            _save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)
    if bar is not None:
        bar.close()
    vae.eval()
    if not (run / "vae_stats.json").exists():
        # The DiT's latent scale: mean/std of posterior means of full-size clips.
        full = ClipSource(cfg.seed + 1, mcfg.frames, mcfg.width)
        with torch.no_grad():
            zs = torch.cat([vae.encode_dist(full.batch(i, min(8, cfg.stats_clips - i))[0])[0]
                            for i in range(0, cfg.stats_clips, 8)])
        stats = {"mean": zs.mean().item(), "std": zs.std().item()}
        (run / "vae_stats.json").write_text(json.dumps(stats))
        _log(run, f"vae latent stats {stats}")
    stats = json.loads((run / "vae_stats.json").read_text())
    vae.set_latent_stats(stats["mean"], stats["std"])
    return pipe


def train_decoder(cfg: TrainConfig, run: Path, pipe: I2VPipeline) -> I2VPipeline:
    """Decoder-only reconstruction steps with the encoder frozen (stage 3 of the module docstring)."""
    mcfg = pipe.cfg
    vae = pipe.vae
    params = list(vae.decoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0, betas=(0.9, 0.99))
    ckpt_path, step = run / "decoder.pt", 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    source = ClipSource(cfg.seed + 3, cfg.vae_frames, mcfg.width)
    vae.encoder.eval().requires_grad_(False)
    vae.decoder.train()
    bar = _progress(cfg.decoder_steps, step, "decoder") if step < cfg.decoder_steps else None
    start, t0 = step, time.perf_counter()
    while step < cfg.decoder_steps:
        gen = _generator(cfg, 3, step)
        video = _crop_batch(cfg, source, step, gen)
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.decoder_steps, cfg.decoder_lr, min(cfg.warmup, cfg.decoder_steps // 10))
        with torch.no_grad():
            mean, _ = vae.encode_dist(video)
        recon = vae.decoder(mean)
        mse = ((recon - video) ** 2).mean()
        loss = (recon - video).abs().mean() + mse
        _update(opt, params, loss, bar)
        step += 1
        if step % cfg.log_every == 0 or step == cfg.decoder_steps:
            rate = (step - start) / (time.perf_counter() - t0)
            _log(run, f"decoder step {step}/{cfg.decoder_steps} loss {loss.item():.4f} "
                      f"psnr {psnr(recon.detach(), video):.2f} {rate:.2f} steps/s")
        if step % cfg.ckpt_every == 0 or step == cfg.decoder_steps:
            _save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)
    if bar is not None:
        bar.close()
    vae.requires_grad_(True)
    return pipe.eval()


def _encode_clips(pipe: I2VPipeline, source: ClipSource, start: int, n: int, chunk: int = 16):
    """Latents ``[n, C, T, h, w]`` of clips ``start ..``, their prompts, and their camera flows ``[n, T, 6]``
    (:func:`i2v_model.data.camera_flow` on the latent frames, in latent pixels)."""
    zs, prompts, cameras = [], [], []
    with torch.no_grad():
        for i in range(start, start + n, chunk):
            video, p, motions = source.batch(i, min(chunk, start + n - i))
            z = pipe.vae.encode(video.contiguous(memory_format=torch.channels_last_3d))
            zs.append(z)
            prompts += p
            frames = torch.arange(z.shape[2]) * pipe.cfg.vae.temporal_factor  # the video frame each latent ends
            half = torch.tensor([z.shape[-1] / 2] * 3 + [z.shape[-2] / 2] * 3)
            cameras += [camera_flow(m, video.shape[2], source.size)[frames] * half for m in motions]
    return torch.cat(zs), prompts, torch.stack(cameras)


def train_dit(cfg: TrainConfig, run: Path, pipe: I2VPipeline) -> I2VPipeline:
    mcfg = pipe.cfg
    params = list(pipe.dit.parameters()) + list(pipe.text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = {"dit": copy.deepcopy(pipe.dit.state_dict()), "text": copy.deepcopy(pipe.text.state_dict())}
    source = ClipSource(cfg.seed + 2, mcfg.frames, mcfg.width)
    ckpt_path, step = run / "dit.pt", 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        pipe.dit.load_state_dict(ckpt["dit"])
        pipe.text.load_state_dict(ckpt["text"])
        opt.load_state_dict(ckpt["opt"])
        ema, step = ckpt["ema"], ckpt["step"]
        pool_z, pool_prompts, next_clip = ckpt["pool_z"], ckpt["pool_prompts"], ckpt["next_clip"]
        if "pool_camera" not in ckpt:
            raise ValueError(f"{ckpt_path} is from before the camera-flow loss (its pool has no camera paths); "
                             "start a new --run (--dit-from its export keeps what it learned)")
        pool_camera = ckpt["pool_camera"]
    else:
        if cfg.dit_from:
            seed_dit(pipe, Path(cfg.dit_from), run)
            ema = {"dit": copy.deepcopy(pipe.dit.state_dict()), "text": copy.deepcopy(pipe.text.state_dict())}
        t0 = time.perf_counter()
        pool_z, pool_prompts, pool_camera = _encode_clips(pipe, source, 0, cfg.pool)
        next_clip = cfg.pool
        _log(run, f"dit: encoded a pool of {cfg.pool} clips in {time.perf_counter() - t0:.0f} s")
    pipe.dit.train()
    pipe.text.train()
    bar = _progress(cfg.dit_steps, step, "dit") if step < cfg.dit_steps else None
    start, t0 = step, time.perf_counter()
    while step < cfg.dit_steps:
        gen = _generator(cfg, 2, step)
        if step > 0 and step % cfg.refresh_every == 0:
            z, p, cam = _encode_clips(pipe, source, next_clip, cfg.refresh)
            slots = torch.randperm(cfg.pool, generator=gen)[:cfg.refresh]
            pool_z[slots] = z
            pool_camera[slots] = cam
            for j, s in enumerate(slots.tolist()):
                pool_prompts[s] = p[j]
            next_clip += cfg.refresh
        idx = torch.randint(0, cfg.pool, (cfg.dit_batch,), generator=gen)
        z0 = pool_z[idx]
        drop = torch.rand(cfg.dit_batch, generator=gen) < cfg.cfg_drop
        prompts = ["" if d else pool_prompts[i] for i, d in zip(idx.tolist(), drop.tolist())]
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.dit_steps, cfg.dit_lr, cfg.warmup)
        context = pipe.text(prompts)
        cond = image_condition(z0[:, :, :1], z0.shape[2])
        t = sample_timesteps(cfg.dit_batch, mcfg.shift, generator=gen)
        weight = pipe.dit.preconditioning(t)[1].flatten().clamp_min(1e-3) ** -2  # unit weight on the network
        camera = {}

        def denoise(x: Tensor, tt: Tensor) -> Tensor:
            x0, camera["pred"] = pipe.dit.predict(x, tt, cond, *context)
            return x0

        loss = x0_matching_loss(denoise, z0, t, generator=gen, weight=weight)
        if cfg.camera_weight > 0:  # the camera head's flow against the clip's known camera path
            loss = loss + cfg.camera_weight * ((camera["pred"] - pool_camera[idx]) ** 2)[:, 1:].mean()
        _update(opt, params, loss, bar)
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for name, module in (("dit", pipe.dit), ("text", pipe.text)):
                for k, v in module.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[name][k].lerp_(v, 1 - decay)
        step += 1
        if step % cfg.log_every == 0 or step == cfg.dit_steps:
            rate = (step - start) / (time.perf_counter() - t0)
            _log(run, f"dit step {step}/{cfg.dit_steps} loss {loss.item():.4f} {rate:.2f} steps/s")
        if step % cfg.ckpt_every == 0 or step == cfg.dit_steps:
            _save({"dit": pipe.dit.state_dict(), "text": pipe.text.state_dict(), "opt": opt.state_dict(), "ema": ema,
                   "step": step, "pool_z": pool_z, "pool_prompts": pool_prompts, "pool_camera": pool_camera,
                   "next_clip": next_clip}, ckpt_path)
    if bar is not None:
        bar.close()
    pipe.dit.load_state_dict(ema["dit"])
    pipe.text.load_state_dict(ema["text"])
    return pipe.eval()


def export(run: Path, out: Path) -> Path:
    """Write the run's VAE and the EMA DiT/text encoder as one safetensors file (config in the metadata)."""
    from safetensors.torch import save_file

    cfg = TrainConfig(**json.loads((run / "config.json").read_text())["train"])
    pipe = I2VPipeline(get_config(cfg.model), use_kernels=False)
    if not (run / "vae.pt").exists() or not (run / "dit.pt").exists():
        raise FileNotFoundError(f"{run} has no vae.pt and dit.pt checkpoints to export yet")
    # The decoder stage's VAE when it ran (same encoder, refined decoder), else the VAE stage's.
    vae_ckpt = run / "decoder.pt" if (run / "decoder.pt").exists() else run / "vae.pt"
    pipe.vae.load_state_dict(torch.load(vae_ckpt, weights_only=False)["model"])
    stats = json.loads((run / "vae_stats.json").read_text())
    pipe.vae.set_latent_stats(stats["mean"], stats["std"])
    dit = torch.load(run / "dit.pt", weights_only=False)
    pipe.dit.load_state_dict(dit["ema"]["dit"])
    pipe.text.load_state_dict(dit["ema"]["text"])
    state = {k: v.detach().contiguous() for k, v in pipe.state_dict().items()}
    meta = {"config": json.dumps(pipe.cfg.to_dict()), "train": json.dumps(dataclasses.asdict(cfg)),
            "dit_step": str(dit["step"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, out)
    return out


def _part(state: dict, name: str) -> dict:
    """The entries of the pipeline state dict ``state`` under module ``name``, without the prefix."""
    return {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}


def seed_vae(cfg: TrainConfig, run: Path, weights: Path) -> None:
    """Write ``run``'s finished VAE checkpoint and latent statistics from an exported weights file."""
    from safetensors.torch import load_file

    if (run / "vae.pt").exists():
        raise ValueError(f"{run} already has a VAE checkpoint; --vae-from needs a new --run")
    if not weights.is_file():
        raise FileNotFoundError(f"--vae-from: no such weights file: {weights}")
    state = _part(load_file(str(weights)), "vae")
    vae = I2VPipeline(get_config(cfg.model), use_kernels=False).vae
    try:
        vae.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"--vae-from: {weights} has no VAE of model {cfg.model!r} ({str(e).splitlines()[0]})") from None
    stats = {"mean": vae.latent_mean.item(), "std": vae.latent_std.item()}
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, betas=(0.9, 0.99))
    _save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": cfg.vae_steps}, run / "vae.pt")
    (run / "vae_stats.json").write_text(json.dumps(stats))
    _log(run, f"vae taken from {weights} (latent stats {stats})")


def seed_dit(pipe: I2VPipeline, weights: Path, run: Path) -> None:
    """Load the DiT and text encoder of an exported weights file into ``pipe``; parameters the file
    lacks (a head added since) keep their initialization, and are named in the log."""
    from safetensors.torch import load_file

    if not weights.is_file():
        raise FileNotFoundError(f"--dit-from: no such weights file: {weights}")
    state = load_file(str(weights))
    new = []
    for name, module in (("dit", pipe.dit), ("text", pipe.text)):
        try:
            missing, unexpected = module.load_state_dict(_part(state, name), strict=False)
        except RuntimeError as e:
            raise ValueError(f"--dit-from: {weights} does not fit model {pipe.cfg.name!r} "
                             f"({str(e).splitlines()[1].strip()})") from None
        if unexpected or len(missing) == len(module.state_dict()):
            raise ValueError(f"--dit-from: {weights} has no {name} of model {pipe.cfg.name!r}")
        new += [f"{name}.{k}" for k in missing]
    _log(run, f"dit and text encoder taken from {weights}" + (f"; new: {', '.join(new)}" if new else ""))


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="i2v train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/tiny", help="run folder: config, checkpoints, log")
    parser.add_argument("--stage", choices=["vae", "dit", "decoder", "all"], default="all")
    parser.add_argument("--export", action="store_true", help="export the run's weights and exit")
    parser.add_argument("--weights", default=None, help="export target (default: the bundled tiny weights)")
    parser.add_argument("--vae-from", default=None, metavar="WEIGHTS",
                        help="start the run from the VAE of an exported weights file (e.g. the bundled one) "
                             "instead of training it: the VAE stage counts as done")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=None, help=f"default {getattr(defaults, f.name)}")
    return parser


def main(argv=None, args: Optional[argparse.Namespace] = None) -> int:
    args = args or build_parser().parse_args(argv)
    run = Path(args.run)
    if args.export:
        out = export(run, Path(args.weights) if args.weights else weights_path("tiny"))
        print(f"exported {out} ({out.stat().st_size / 2**20:.1f} MiB)")
        return 0
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    run.mkdir(parents=True, exist_ok=True)
    cfg_path = run / "config.json"
    if cfg_path.exists():  # resume: the recorded config wins; new overrides must agree or be step counts
        recorded = json.loads(cfg_path.read_text())["train"]
        for k, v in overrides.items():
            if k not in ("vae_steps", "dit_steps", "decoder_steps", "threads", "ckpt_every", "log_every") and recorded.get(k) != v:
                raise ValueError(f"{run} was started with {k}={recorded.get(k)!r}; resume it unchanged or use a new --run")
        cfg = TrainConfig(**{**recorded, **overrides})
    else:
        cfg = TrainConfig(**overrides)
    get_config(cfg.model)
    cfg_path.write_text(json.dumps({"train": dataclasses.asdict(cfg), "model": get_config(cfg.model).to_dict(),
                                    "torch": torch.__version__}, indent=2))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if args.vae_from:
        seed_vae(cfg, run, Path(args.vae_from))
    pipe = I2VPipeline(get_config(cfg.model), use_kernels=cfg.use_kernels)
    start = time.perf_counter()
    if args.stage in ("vae", "all"):
        train_vae(cfg, run, pipe)
    if args.stage in ("dit", "all"):
        if not (run / "vae.pt").exists():
            raise ValueError(f"{run} has no trained VAE (run --stage vae first)")
        if args.stage == "dit":
            train_vae(cfg, run, pipe)  # loads the finished VAE checkpoint and its latent stats
        train_dit(cfg, run, pipe)
    if args.stage == "decoder" and cfg.decoder_steps < 1:
        raise ValueError("--stage decoder needs --decoder-steps N (N >= 1)")
    if args.stage in ("decoder", "all") and cfg.decoder_steps > 0:
        if not (run / "vae.pt").exists():
            raise ValueError(f"{run} has no trained VAE (run --stage vae first)")
        if args.stage == "decoder":
            train_vae(cfg, run, pipe)
        train_decoder(cfg, run, pipe)
    _log(run, f"done in {time.perf_counter() - start:.0f} s; export with: i2v train --run {run} --export")
    return 0


if __name__ == "__main__":
    sys.exit(main())
