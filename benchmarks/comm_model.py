"""Communication / compute model of sequence parallelism for video DiTs (i2v_kernels.distributed).

For CogVideoX-5B and Wan2.1-14B (and HunyuanVideo, the model of xDiT's published 8-GPU figure) at 2, 4
and 8 GPUs on NVLink and on PCIe: bytes each GPU sends per transformer layer under

* ``factorized``: our scheme. Tokens split by frames; spatial attention, cross attention, MLP and adaLN
  local; one all-to-all of the hidden state (C channels a token) to a split by positions for temporal
  attention and one back. It applies to factorized-attention DiTs (Latte-style spatial + temporal
  blocks), so its rows are those of the factorized variant of each model: the same width, depth,
  heads and tokens, its 3D attention replaced by spatial then temporal attention.
* ``ulysses``: the model's own full 3D attention; all-to-all of q, k, v (3C) to a split by heads and
  of the output (C) back (DeepSpeed-Ulysses; xDiT's USP at ring degree 1). Needs ``H % P == 0``.
* ``ring``: full 3D attention; every GPU's k and v (2C a token) pass round the ring, ``P - 1`` steps,
  overlapped with the attention compute of each step (ring attention).

and the predicted time of one denoising step, speedup and efficiency (single-GPU time / (P x time)).

Assumptions (stated in the table's header too):
* compute: H100/H200 dense bf16 peak 989 TFLOP/s at ``--mfu`` utilisation (default 0.45) for every
  FLOP (GEMMs and attention alike); FLOPs = 2 per multiply-add: projections ``2 N C C_out``, attention
  ``4 N M C`` (QK^T and PV). One sample per pass (classifier-free guidance doubles compute and bytes
  alike, so speedups do not change). Elementwise ops, the VAE and the text encoder are not counted.
* links: the quoted figure (NVLink 4: 900 GB/s; PCIe: 64 GB/s) is each GPU's bandwidth for both
  directions together, so an all-to-all or ring step, which sends and receives at once, sends at half
  of it, with ``--link-eff`` of that achieved (default 0.7), through a switch with full bisection
  (NVSwitch; a PCIe switch, which is optimistic for PCIe); bf16 activations.
* all-to-alls are not overlapped with compute (conservative); ring steps are (each step costs
  ``max(compute, transfer)``).

``python -m benchmarks.comm_model`` prints the table and writes ``benchmarks/results/comm_model.md``;
``--measure`` also runs the tiny reference DiT on 1, 2 and 4 gloo processes on this CPU and reports the
bytes its all-to-alls actually moved (against this model's formula) and each rank's block activations.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "comm_model.md"
PEAK_TFLOPS = 989.0  # H100 SXM / H200 dense bf16
BYTES = 2  # bf16
LINKS = {"NVLink": 900e9, "PCIe": 64e9}
# xDiT (github.com/xdit-project/xDiT, README "HunyuanVideo" performance): USP on 8 H100s, 1280x720, 129 frames.
XDIT_HUNYUAN_8GPU = 5.64


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    width: int        # C
    heads: int
    ffn: int          # MLP hidden width
    frames: int       # latent frames T
    positions: int    # tokens a frame S
    text: int         # text tokens
    joint_text: bool  # text tokens join the self-attention (CogVideoX, HunyuanVideo) or cross-attention (Wan)
    steps: int

    @property
    def video_tokens(self) -> int:
        return self.frames * self.positions


MODELS = [
    # CogVideoX-5B: 42 layers, 3072 = 48 x 64, GELU MLP 4x; 49 frames 480x720 -> 13 x (60/2 x 90/2); T5 226 tokens.
    Shape("CogVideoX-5B", 42, 3072, 48, 4 * 3072, 13, 30 * 45, 226, True, 50),
    # Wan2.1-14B: 40 layers, 5120 = 40 x 128, FFN 13824; 81 frames 720x1280 -> 21 x (90/2 x 160/2); umT5 512.
    Shape("Wan2.1-14B", 40, 5120, 40, 13824, 21, 45 * 80, 512, False, 50),
]
# HunyuanVideo: 60 blocks (20 dual + 40 single stream) of 3072 = 24 x 128, MLP 4x; 129 frames 720x1280 ->
# 33 x (45 x 80); 256 text tokens in the joint attention.
HUNYUAN = Shape("HunyuanVideo", 60, 3072, 24, 4 * 3072, 33, 45 * 80, 256, True, 50)


def layer_flops(m: Shape, scheme: str) -> float:
    """FLOPs of one layer (one sample) on one GPU's worth of everything (divide by P for a rank)."""
    C = m.width
    n_self = m.video_tokens + (m.text if m.joint_text else 0)
    n = m.video_tokens
    mlp = 2 * 2 * n_self * C * m.ffn
    if scheme == "factorized":
        # two attention modules (spatial, temporal), each QKV + out projection, over the video tokens;
        # cross attention to the text as Wan/Latte do
        proj = 2 * (2 * n * C * 4 * C)
        attn = 4 * n * m.positions * C + 4 * n * m.frames * C
        cross = 2 * n * C * 2 * C + 4 * n * m.text * C + 2 * m.text * C * 2 * C
        return proj + attn + cross + 2 * 2 * n * C * m.ffn
    proj = 2 * n_self * C * 4 * C
    attn = 4 * n_self * n_self * C
    cross = 0 if m.joint_text else 2 * n * C * 2 * C + 4 * n * m.text * C + 2 * m.text * C * 2 * C
    return proj + attn + cross + mlp


def attention_flops(m: Shape) -> float:
    n_self = m.video_tokens + (m.text if m.joint_text else 0)
    return 4 * n_self * n_self * m.width


def bytes_per_rank(m: Shape, scheme: str, P: int) -> float:
    """Bytes one GPU sends in one layer's forward."""
    if P == 1:
        return 0.0
    C = m.width
    n_self = m.video_tokens + (m.text if m.joint_text else 0)
    local = n_self / P  # tokens a rank holds
    if scheme == "factorized":  # hidden state to positions and back: (P - 1) / P of a rank's tokens, twice
        return 2 * (P - 1) / P * (m.video_tokens / P) * C * BYTES
    if scheme == "ulysses":  # q, k, v to heads, output back
        return 4 * (P - 1) / P * local * C * BYTES
    if scheme == "ring":  # its k, v shard (2C) forwarded P - 1 times
        return (P - 1) * local * 2 * C * BYTES
    raise ValueError(scheme)


def applicable(m: Shape, scheme: str, P: int) -> str:
    if scheme == "ulysses" and m.heads % P:
        return f"H = {m.heads} not divisible by {P}"
    if scheme == "factorized" and (m.frames < P or m.positions < P):
        return "fewer frames than GPUs"
    return ""


def predict(m: Shape, scheme: str, P: int, link: str, mfu: float, link_eff: float) -> dict:
    rate = PEAK_TFLOPS * 1e12 * mfu
    one_way = LINKS[link] / 2 * link_eff
    compute_1 = layer_flops(m, scheme) / rate
    compute_p = compute_1 / P
    sent = bytes_per_rank(m, scheme, P)
    comm = sent / one_way
    if scheme == "ring" and P > 1:
        # P steps, each attending a 1/P share of keys: the step's attention overlaps the next transfer
        attn_step = attention_flops(m) / P / P / rate
        step_comm = comm / (P - 1)
        layer = compute_p - P * attn_step + attn_step + (P - 1) * max(attn_step, step_comm)
        exposed = layer - compute_p
    else:
        layer = compute_p + comm
        exposed = comm
    step = m.layers * layer
    single = m.layers * compute_1
    return dict(model=m.name, P=P, link=link, scheme=scheme, mb=sent / 2**20, comm_ms=comm * 1e3,
                exposed_ms=exposed * 1e3, compute_ms=compute_p * 1e3, step_s=step, speedup=single / step,
                efficiency=single / step / P)


def rows(mfu: float, link_eff: float) -> list[dict]:
    out = []
    for m in MODELS:
        for link in LINKS:
            for P in (2, 4, 8):
                for scheme in ("factorized", "ulysses", "ring"):
                    why = applicable(m, scheme, P)
                    out.append({"model": m.name, "P": P, "link": link, "scheme": scheme, "na": why} if why
                               else predict(m, scheme, P, link, mfu, link_eff))
    return out


def render(mfu: float, link_eff: float, measured: str = "") -> str:
    lines = [
        "# Sequence parallelism: predicted communication and step time",
        "",
        "Generated by `python -m benchmarks.comm_model` (an analytic model, not a measurement; see the module "
        "docstring). Per transformer layer, one sample, bf16, forward only. Compute: "
        f"{PEAK_TFLOPS:g} TFLOP/s dense bf16 (H100/H200) at {mfu:.0%} utilisation for every FLOP. Links: NVLink "
        f"900 GB/s and PCIe 64 GB/s per GPU, both directions together, {link_eff:.0%} achieved, full bisection. "
        "All-to-alls not overlapped with compute; ring steps overlapped with each step's attention. "
        "`factorized` rows are the factorized (spatial + temporal attention) variant of each model at the same "
        "shapes; `ulysses` and `ring` rows the model's own full 3D attention. Efficiency = single-GPU step "
        "time / (GPUs x step time).",
        "",
        "| model | GPUs | link | scheme | MiB sent / GPU / layer | comm ms / layer | exposed ms | compute ms / layer "
        "| step s | speedup | efficiency |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows(mfu, link_eff):
        if "na" in r:
            lines.append(f"| {r['model']} | {r['P']} | {r['link']} | {r['scheme']} | n/a: {r['na']} | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['P']} | {r['link']} | {r['scheme']} | {r['mb']:.1f} | {r['comm_ms']:.2f} "
                     f"| {r['exposed_ms']:.2f} | {r['compute_ms']:.2f} | {r['step_s']:.3f} | {r['speedup']:.2f}x "
                     f"| {r['efficiency']:.0%} |")
    h = predict(HUNYUAN, "ulysses", 8, "NVLink", mfu, link_eff)
    lines += [
        "",
        f"Published reference: xDiT's USP reaches **{XDIT_HUNYUAN_8GPU}x on 8 H100s** for HunyuanVideo (1280x720, "
        f"129 frames). This model predicts {h['speedup']:.2f}x ({h['efficiency']:.0%}) for Ulysses on 8 GPUs over "
        f"NVLink at that shape ({HUNYUAN.video_tokens + HUNYUAN.text} tokens, {HUNYUAN.layers} blocks of "
        f"{HUNYUAN.width}): it leaves out what the published run also pays for (the VAE and text encoder run "
        "whole, kernel efficiency falling with the 1/P shorter sequences and fewer heads, launch and "
        "synchronisation overheads), so read its speedups as upper bounds.",
        "",
        "Per GPU and layer the factorized scheme sends 2C values per local token, against 4C for Ulysses and "
        "2C(P - 1) for ring attention (ring hides it behind the attention only while a step's attention takes "
        "longer than its transfer).",
    ]
    if measured:
        lines += ["", measured]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# --measure: the tiny reference DiT on gloo processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure_worker(rank, world, port, queue):
    import datetime

    import torch
    import torch.distributed as dist

    from i2v_model import parallel
    from i2v_model.config import CONFIGS
    from i2v_model.dit import VideoDiT

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    sent = [0]
    original = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        splits = input_split_sizes or [input.numel() // world] * world
        sent[0] += sum(n for j, n in enumerate(splits) if j != rank) * input.element_size()
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    try:
        cfg = CONFIGS["tiny"]
        torch.manual_seed(0)
        dit = VideoDiT(cfg.dit, cfg.vae.latent_channels, cfg.text.out_dim)
        T, (h, w) = cfg.latent_frames, cfg.latent_size
        g = torch.Generator().manual_seed(0)
        C = cfg.vae.latent_channels
        inputs = (torch.randn(1, C, T, h, w, generator=g), torch.tensor([0.5]), torch.randn(1, C + 1, T, h, w, generator=g),
                  torch.randn(1, 8, cfg.text.out_dim, generator=g), torch.tensor([8]),
                  torch.randn(1, cfg.text.out_dim, generator=g))
        if world > 1:
            parallel.enable(dit)
        sent[0] = 0
        activations = parallel.block_activation_bytes(dit, *inputs)
        queue.put((rank, world, activations, sent[0], T, h // cfg.dit.patch * (w // cfg.dit.patch), cfg.dit.width,
                   cfg.dit.depth))
    finally:
        dist.all_to_all_single = original
        dist.destroy_process_group()


def measure() -> str:
    import torch.multiprocessing as mp

    from i2v_kernels.distributed import shard_sizes

    ctx = mp.get_context("spawn")
    results = []
    for world in (1, 2, 4):
        queue = ctx.SimpleQueue()
        mp.start_processes(_measure_worker, args=(world, _free_port(), queue), nprocs=world, start_method="spawn")
        results += [queue.get() for _ in range(world)]
    import platform

    import torch

    whole = next(r[2] for r in results if r[1] == 1)
    lines = ["## Measured on this CPU (tiny reference DiT, gloo)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}.",
             "",
             "`python -m benchmarks.comm_model --measure`: one forward of the bundled tiny DiT (fp32, batch 1, "
             "5 latent frames x 16 positions, width 192, 6 blocks) with gradients on, per rank: the bytes autograd "
             "saves inside the blocks (`i2v_model.parallel.block_activation_bytes`) and the bytes the rank's "
             "all-to-alls sent to other ranks (counted at `all_to_all_single`), against this model's "
             "factorized formula (two all-to-alls of C channels per block, plus the final all-gather of the "
             "tokens).", "",
             "| ranks | rank | frames held | block activations MiB | vs 1 rank | all-to-all bytes sent | formula |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for rank, world, act, sent, T, S, C, depth in sorted(results, key=lambda r: (r[1], r[0])):
        held = shard_sizes(T, world)[rank]
        pos = shard_sizes(S, world)
        # per block: frames -> positions sends my frames' tokens of the other ranks' positions, and back
        per_block = sum(held * pos[j] * C * 4 for j in range(world) if j != rank) + \
            sum(shard_sizes(T, world)[j] * pos[rank] * C * 4 for j in range(world) if j != rank)
        gather = (world - 1) * held * S * C * 4 if world > 1 else 0
        formula = depth * per_block + gather
        lines.append(f"| {world} | {rank} | {held} of {T} | {act / 2**20:.2f} | {act / whole:.2f} | {sent:,} | "
                     f"{formula:,} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mfu", type=float, default=0.45, help="achieved fraction of the bf16 peak (default 0.45)")
    parser.add_argument("--link-eff", type=float, default=0.7, help="achieved fraction of link bandwidth (0.7)")
    parser.add_argument("--measure", action="store_true", help="also measure the tiny DiT on 1/2/4 gloo processes")
    parser.add_argument("--out", default=str(RESULTS), help="the markdown file to write")
    args = parser.parse_args(argv)
    if not (0 < args.mfu <= 1 and 0 < args.link_eff <= 1):
        parser.error("--mfu and --link-eff must be in (0, 1]")
    measured = ""
    if args.measure:
        os.environ.setdefault("I2V_KERNELS_TUNE", "0")
        measured = measure()
    text = render(args.mfu, args.link_eff, measured)
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
