"""Benchmark of the diffusers integration: ``python -m benchmarks.bench_diffusers [--quick] [--device cpu|cuda]``.

``i2v_kernels.patch(model)`` against the same model unpatched, on diffusers models built from their
published configs with random weights (no downloads):

* ``transformer``  one forward of the video DiT at its real width, heads and token counts, with the depth
  cut to ``LAYERS`` blocks: CogVideoX-5B (49 frames at 720x480), Wan2.1-T2V-1.3B and Wan2.1-I2V-14B at
  480p (81 frames at 832x480), Latte-1 (Latte-XL/2, 16 frames at 512x512), LTX-Video (121 frames at
  768x512). The GPU ``--quick`` run (``make gpu-check``'s bounded mode, ``QUICK_BUDGET_S``) builds one
  block (CogVideoX-5B: two, its headline shape) and Wan at 17 frames. Time per denoising step at
  full depth is the measured forward scaled by ``full layers / layers`` and by the forwards one step
  makes (classifier-free guidance: CogVideoX and Latte batch it (B = 2), Wan runs two B = 1 forwards).
  The scaling also multiplies the parts outside the blocks (patch and time/text embeddings, output
  projection), which are well under 1% of a block at these token counts, so it slightly overstates.
* ``unet``         Stable Video Diffusion's ``UNetSpatioTemporalConditionModel`` (SVD-XT config), whole:
  25 frames at 576x1024 (``--quick`` on the GPU: 14 frames at 320x512); CFG batched (B = 2).
* ``vae-decode``   ``vae.decode(z)`` of the CogVideoX and Wan2.1 VAEs (their default configs are the
  released ones) at a reduced resolution, and SVD's temporal-decoder VAE (full runs): time and peak memory.

Providers: ``torch`` (unpatched eager), ``compile`` (torch.compile of it), ``patched`` (after
``i2v_kernels.patch``; backend ``auto``: the case's auto row, held to the first rule), ``patched-native``
(the patched model forced to the ``native`` backend), ``patched-compile``, and the cache-hook rows
``cache`` / ``patched-cache``: the model (unpatched / patched) with diffusers'
``enable_cache(FirstBlockCacheConfig(threshold=0.05))``, called inside one ``cache_context``. The input is
the same every call, so after the first (checked against the fp32 output) every timed call reuses the
cached residual: the rows time the hook's path -- the first block, the residual test, the reuse -- with
and without the patch. (Not for Latte, which diffusers' FirstBlockCache does not run, nor the UNet.)
The compiled providers run on a GPU: full runs, and ``--quick`` at the headline case only (CogVideoX-5B,
run last) while half the time budget is left; never on the CPU (inductor takes minutes per whole model).
A GPU ``--quick`` run starts no case once ``QUICK_STOP`` of its budget is spent: those are listed as
skipped, so the run ends inside ``make gpu-check``'s cap for this stage instead of being cut there.
Peak memory is what one call allocates beyond the weights and inputs (output included; on the CPU from
PyTorch's allocator events, ``utils.cpu_peak_mb``). ``streaming`` / ``patched-streaming`` (VAE decode of
CogVideoX and Wan): ``decode_streaming`` of the unpatched / patched VAE.

Correctness before timing (``bench_conv3d.run_model_case``): the model is built and run in fp32 first
(the reference), then cast to the benchmark dtype; every provider's max error against the fp32 output
must be at most twice eager diffusers' own error in that dtype plus the dtype's tolerance (fp32 1e-5,
bf16 1e-2) times the output's scale, as in ``tests/test_diffusers.py``.

CPU runs build tiny configs of the same classes: they show the script and the patched models run, not
how fast anything is. diffusers is imported lazily: without it every case is listed as skipped.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from benchmarks import utils
from benchmarks.bench_conv3d import ModelCase, ModelRun, SkipCase, run_model_case
from benchmarks.utils import Provider, Session

FAMILY = "diffusers"
OPS = ("transformer", "unet", "vae-decode")
PROVIDERS = ("torch", "compile", "patched", "patched-native", "patched-compile", "cache", "patched-cache", "streaming",
             "patched-streaming")
QUICK_BUDGET_S = 40  # tools/gpu_check.py's cap for this stage
QUICK_STOP = 0.6     # GPU --quick starts no case after this fraction of the budget (imports and CUDA start-up
                     # come on top of it, and one case takes seconds)
LAYERS = 2  # blocks built on a GPU; time per step is scaled to the real depth


# --------------------------------------------------------------------------------------------------
# Models: published configs (GPU) and tiny ones of the same classes (CPU)


@dataclass(frozen=True)
class DiT:
    """A video transformer: diffusers class and constructor config (without ``num_layers``), blocks to
    build (0: the whole model, a UNet) and the real depth (None: not scaled), the batch of one forward and
    the forwards per denoising step, ``latent`` (``hidden_states`` without the batch, in the class's
    layout; LTX: ``(T, h, w, C)``, passed as ``[B, T*h*w, C]``), the text tokens ``(count, width)`` and,
    for image-to-video, the image tokens ``(count, width)``."""

    label: str
    cls: str
    config: dict
    layers: int
    full_layers: Optional[int]
    batch: int
    forwards_per_step: int
    latent: tuple
    text: tuple
    source: str
    image: Optional[tuple] = None


@dataclass(frozen=True)
class VAE:
    label: str
    cls: str
    config: dict
    z: tuple  # latent [B, C, T, h, w]
    source: str


def _inputs(spec: DiT, device: torch.device) -> dict:
    """The forward's keyword arguments (fp32), as the model's diffusers pipeline passes them."""
    B = spec.batch
    if spec.cls == "UNetSpatioTemporalConditionModel":  # SVD: latents with the image latent, CLIP image embedding
        return {"sample": torch.randn(B, *spec.latent, device=device),
                "timestep": torch.tensor([0.7, 0.3][:B] + [0.5] * max(0, B - 2), device=device),
                "encoder_hidden_states": torch.randn(B, *spec.text, device=device),
                "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * B, device=device)}
    if spec.cls == "LTXVideoTransformer3DModel":  # tokens [B, T*h*w, C], the prompt mask, the grid
        T, h, w, C = spec.latent
        return {"hidden_states": torch.randn(B, T * h * w, C, device=device),
                "encoder_hidden_states": torch.randn(B, *spec.text, device=device),
                "timestep": torch.tensor([999, 500][:B] + [250] * max(0, B - 2), device=device),
                "encoder_attention_mask": torch.ones(B, spec.text[0], device=device),
                "num_frames": T, "height": h, "width": w}
    kwargs = {
        "hidden_states": torch.randn(B, *spec.latent, device=device),
        "timestep": torch.tensor([999, 500][:B] + [250] * max(0, B - 2), device=device),
        "encoder_hidden_states": torch.randn(B, *spec.text, device=device),
    }
    if spec.image is not None:  # Wan I2V: CLIP image tokens
        kwargs["encoder_hidden_states_image"] = torch.randn(B, *spec.image, device=device)
    if spec.cls == "CogVideoXTransformer3DModel" and spec.config.get("use_rotary_positional_embeddings"):
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        T, _, h, w = spec.latent
        p = spec.config["patch_size"]
        grid = (h // p, w // p)
        crops = _grid_crop(grid, (spec.config["sample_height"] // p, spec.config["sample_width"] // p))
        kwargs["image_rotary_emb"] = get_3d_rotary_pos_embed(spec.config["attention_head_dim"], crops, grid, T,
                                                             device=device)
    return kwargs


def _grid_crop(grid: tuple, base: tuple) -> tuple:
    """Where CogVideoXPipeline places the token grid in the base grid for 3D RoPE: resized to fit the base
    grid's aspect, centred -- ``((top, left), (bottom, right))``. (The pipeline module imports transformers,
    so the arithmetic is written out here.)"""
    (h, w), (bh, bw) = grid, base
    if h / w > bh / bw:
        rh, rw = bh, int(round(bh / h * w))
    else:
        rh, rw = int(round(bw / w * h)), bw
    top, left = int(round((bh - rh) / 2)), int(round((bw - rw) / 2))
    return (top, left), (top + rh, left + rw)


# Latent layouts: CogVideoX [T, C, h, w]; Wan and Latte [C, T, h, w].
COGVIDEOX_5B = DiT(
    "cogvideox-5b", "CogVideoXTransformer3DModel",
    dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
         text_embed_dim=4096, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
         temporal_compression_ratio=4, max_text_seq_length=226, activation_fn="gelu-approximate",
         norm_elementwise_affine=True, norm_eps=1e-5, attention_bias=True, use_rotary_positional_embeddings=True,
         use_learned_positional_embeddings=False),
    LAYERS, 42, 2, 1, (13, 16, 60, 90), (226, 4096),
    "THUDM/CogVideoX-5b transformer config (48 heads of 64, 42 layers, 3D RoPE); 49 frames at 720x480: 13 latent "
    "frames of 60x90 -> 17550 video + 226 text tokens; CFG batched (B = 2)")
WAN_1_3B = DiT(
    "wan2.1-t2v-1.3b-480p", "WanTransformer3DModel",
    dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
         text_dim=4096, freq_dim=256, ffn_dim=8960, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
         rope_max_seq_len=1024),
    LAYERS, 30, 1, 2, (16, 21, 60, 104), (512, 4096),
    "Wan-AI/Wan2.1-T2V-1.3B config (12 heads of 128, ffn 8960, 30 layers); 81 frames at 832x480: 21 latent frames "
    "of 60x104 -> 32760 tokens, 512 text tokens; CFG as two B = 1 forwards")
WAN_14B_I2V = DiT(
    "wan2.1-i2v-14b-480p", "WanTransformer3DModel",
    dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
         text_dim=4096, freq_dim=256, ffn_dim=13824, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
         image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024),
    LAYERS, 40, 1, 2, (36, 21, 60, 104), (512, 4096),
    "Wan-AI/Wan2.1-I2V-14B-480P config (40 heads of 128, ffn 13824, 40 layers, CLIP image cross-attention); "
    "81 frames at 832x480 -> 32760 tokens (16 noise + 20 image-condition channels), 512 text + 257 image tokens; "
    "CFG as two B = 1 forwards", image=(257, 1280))
LATTE_1 = DiT(
    "latte-1", "LatteTransformer3DModel",
    dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, cross_attention_dim=1152,
         attention_bias=True, sample_size=64, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
         norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096,
         video_length=16),
    LAYERS, 28, 2, 1, (4, 16, 64, 64), (120, 4096),
    "maxin-cn/Latte-1 config (Latte-XL/2: 16 heads of 72, 28 spatial + 28 temporal blocks); 16 frames at 512x512: "
    "32x32 tokens per frame, 120 text tokens; CFG batched (B = 2)")

LTX_VIDEO = DiT(
    "ltx-video-768x512", "LTXVideoTransformer3DModel",
    dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
         attention_head_dim=64, cross_attention_dim=2048, activation_fn="gelu-approximate",
         qk_norm="rms_norm_across_heads", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096,
         attention_bias=True, attention_out_bias=True),
    LAYERS, 28, 2, 1, (16, 16, 24, 128), (128, 4096),
    "Lightricks/LTX-Video config (32 heads of 64, 28 layers, per-head RoPE); 121 frames at 768x512: 16 latent "
    "frames of 16x24 -> 6144 tokens, 128 text tokens; CFG batched (B = 2)")
SVD_XT = DiT(
    "svd-xt-576x1024", "UNetSpatioTemporalConditionModel",
    dict(sample_size=96, in_channels=8, out_channels=4,
         down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
         up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
         block_out_channels=(320, 640, 1280, 1280), addition_time_embed_dim=256,
         projection_class_embeddings_input_dim=768, layers_per_block=2, cross_attention_dim=1024,
         transformer_layers_per_block=1, num_attention_heads=(5, 10, 20, 20), num_frames=25),
    0, None, 2, 1, (25, 8, 72, 128), (1, 1024),
    "stabilityai/stable-video-diffusion-img2vid-xt UNet config (the UNet's defaults); 25 frames at 576x1024: "
    "latents 72x128 with the image latent concatenated (8 channels); CFG batched (B = 2)")


def _quick(spec: DiT, latent: tuple, what: str, layers: int = 1) -> DiT:
    """A cheaper variant of ``spec`` for the bounded GPU run: fewer layers built, fewer frames."""
    return replace(spec, label=f"{spec.label}-quick", layers=layers if spec.layers else 0, latent=latent,
                   source=f"{spec.source} -- --quick: {what}")


WAN_1_3B_QUICK = _quick(WAN_1_3B, (16, 5, 60, 104), "17 frames (5 latent frames: 6240 tokens), 1 layer")
WAN_14B_I2V_QUICK = _quick(WAN_14B_I2V, (36, 5, 60, 104), "17 frames (5 latent frames: 6240 tokens), 1 layer")
LATTE_1_QUICK = _quick(LATTE_1, LATTE_1.latent, "1 spatial + 1 temporal block")
LTX_VIDEO_QUICK = _quick(LTX_VIDEO, LTX_VIDEO.latent, "1 layer")
SVD_XT_QUICK = _quick(SVD_XT, (14, 8, 40, 64), "14 frames at 320x512")

# CPU: tiny configs of the same classes (sizes as tests/test_diffusers.py uses them).
COGVIDEOX_TINY = DiT(
    "cogvideox-tiny", "CogVideoXTransformer3DModel",
    dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
         text_embed_dim=16, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
         temporal_compression_ratio=4, max_text_seq_length=6, use_rotary_positional_embeddings=True),
    2, None, 2, 1, (3, 4, 8, 8), (6, 16), "tiny CogVideoX config (2 heads of 16, RoPE)")
WAN_TINY = DiT(
    "wan-i2v-tiny", "WanTransformer3DModel",
    dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
         text_dim=16, freq_dim=32, ffn_dim=32, cross_attn_norm=True, rope_max_seq_len=32, image_dim=16,
         added_kv_proj_dim=24),
    2, None, 1, 2, (4, 3, 8, 8), (512, 16), "tiny Wan I2V config (2 heads of 12, image cross-attention)", image=(7, 16))
LATTE_TINY = DiT(
    "latte-tiny", "LatteTransformer3DModel",
    dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, cross_attention_dim=16,
         sample_size=8, patch_size=2, norm_type="ada_norm_single", caption_channels=32, video_length=3,
         norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", num_embeds_ada_norm=1000),
    2, None, 2, 1, (4, 3, 8, 8), (5, 32), "tiny Latte config (2 heads of 8)")

LTX_TINY = DiT(
    "ltx-tiny", "LTXVideoTransformer3DModel",
    dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
         caption_channels=16),
    2, None, 2, 1, (3, 4, 4, 8), (6, 16), "tiny LTX-Video config (2 heads of 8)")
SVD_TINY = DiT(
    "svd-unet-tiny", "UNetSpatioTemporalConditionModel",
    dict(sample_size=8, in_channels=8, out_channels=4,
         down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
         up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), block_out_channels=(32, 64),
         addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, layers_per_block=1,
         cross_attention_dim=16, num_attention_heads=(2, 4)),
    0, None, 2, 1, (3, 8, 6, 6), (1, 16), "tiny SVD UNet config (as tests/test_diffusers_svd.py)")

COGVIDEOX_VAE = VAE("cogvideox-vae-240x360", "AutoencoderKLCogVideoX", {}, (1, 16, 13, 30, 45),
                    "AutoencoderKLCogVideoX default config (the released CogVideoX VAE), 13 latent frames of 30x45 "
                    "-> 49 frames at 240x360 (half of 480x720 in each dimension)")
COGVIDEOX_VAE_QUICK = VAE("cogvideox-vae-240x360-5f", "AutoencoderKLCogVideoX", {}, (1, 16, 5, 30, 45),
                          "AutoencoderKLCogVideoX default config, 5 latent frames of 30x45 -> 17 frames at 240x360")
COGVIDEOX_VAE_CPU = VAE("cogvideox-vae-48x48-5f", "AutoencoderKLCogVideoX", {}, (1, 16, 2, 6, 6),
                        "AutoencoderKLCogVideoX default config (the released widths), 2 latent frames of 6x6 -> 5 frames "
                        "at 48x48: a CPU-sized decode where the decoder's activations set the peak memory")
WAN_VAE = VAE("wan2.1-vae-240x416", "AutoencoderKLWan", {}, (1, 16, 21, 30, 52),
              "AutoencoderKLWan default config (the released Wan2.1 VAE), 21 latent frames of 30x52 -> 81 frames "
              "at 240x416 (half of 480x832 in each dimension)")
WAN_VAE_QUICK = VAE("wan2.1-vae-240x416-5f", "AutoencoderKLWan", {}, (1, 16, 5, 30, 52),
                    "AutoencoderKLWan default config, 5 latent frames of 30x52 -> 17 frames at 240x416")
SVD_VAE = VAE("svd-vae-576x1024-14f", "AutoencoderKLTemporalDecoder",
              dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                   block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=768),
              (14, 4, 72, 128),
              "stabilityai/stable-video-diffusion-img2vid-xt VAE config (AutoencoderKLTemporalDecoder, widths "
              "128-512), 14 frames at 576x1024 decoded together (the pipeline's decode_chunk_size=14)")
COGVIDEOX_VAE_TINY = VAE("cogvideox-vae-tiny", "AutoencoderKLCogVideoX",
                         dict(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 2,
                              up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 16),
                              latent_channels=4, layers_per_block=1, norm_num_groups=4, temporal_compression_ratio=4,
                              sample_height=16, sample_width=16),
                         (1, 4, 5, 6, 6), "tiny CogVideoX VAE config (widths 8/16)")
WAN_VAE_TINY = VAE("wan-vae-tiny", "AutoencoderKLWan",
                   dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
                        scale_factor_spatial=4),
                   (1, 4, 5, 6, 6), "tiny Wan VAE config (base width 8)")
SVD_VAE_TINY = VAE("svd-vae-tiny", "AutoencoderKLTemporalDecoder",
                   dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        block_out_channels=(32, 32), layers_per_block=1, latent_channels=4),
                   (3, 4, 6, 6), "tiny SVD VAE config (widths 32), 3 frames")

MODELS = {
    # (device, quick) -> (transformers and UNets, VAEs). GPU --quick: the headline CogVideoX-5B case (the one
    # that compiles) comes last, after the VAEs, so a run cut at its cap still has every other row.
    ("cuda", False): ((COGVIDEOX_5B, WAN_1_3B, WAN_14B_I2V, LATTE_1, LTX_VIDEO, SVD_XT),
                      (COGVIDEOX_VAE, WAN_VAE, SVD_VAE)),
    ("cuda", True): ((WAN_1_3B_QUICK, WAN_14B_I2V_QUICK, LATTE_1_QUICK, LTX_VIDEO_QUICK, SVD_XT_QUICK),
                     (COGVIDEOX_VAE_QUICK, WAN_VAE_QUICK)),
    ("cpu", False): ((COGVIDEOX_TINY, WAN_TINY, LATTE_TINY, LTX_TINY, SVD_TINY),
                     (COGVIDEOX_VAE_TINY, WAN_VAE_TINY, SVD_VAE_TINY, COGVIDEOX_VAE_CPU)),
    ("cpu", True): ((COGVIDEOX_TINY, WAN_TINY), (COGVIDEOX_VAE_TINY,)),
}
HEADLINE = COGVIDEOX_5B  # GPU --quick: run after the others, the only case that compiles there


# --------------------------------------------------------------------------------------------------
# Cases


def _diffusers_class(name: str):
    """``(class, None)`` or ``(None, why not)``."""
    try:
        import diffusers
    except ImportError as e:
        return None, f"diffusers is not installed ({type(e).__name__}: {e}); pip install 'i2v-kernels[diffusers]'"
    cls = getattr(diffusers, name, None)
    if cls is None:
        return None, f"diffusers {diffusers.__version__} has no {name}"
    return cls, None


def _build(cls, config: dict, device: torch.device):
    """The model in fp32 on ``device``, random weights (seeded by the runner), eval mode."""
    try:
        with torch.device(device):
            return cls(**config).to(device).eval()
    except TypeError as e:  # an older diffusers without one of the config's arguments
        import diffusers

        raise SkipCase(f"diffusers {diffusers.__version__} cannot build {cls.__name__} from this config "
                       f"({type(e).__name__}: {e})") from e


def _cached(model, session: Session, why_not: Optional[str]) -> tuple[Optional[Callable], Optional[str]]:
    """A copy of ``model`` with diffusers' FirstBlockCache, called inside one ``cache_context``."""
    if why_not is not None or not (session.wants("cache") or session.wants("patched-cache")):
        return None, why_not
    try:
        from diffusers import FirstBlockCacheConfig
    except ImportError as e:
        return None, f"diffusers' FirstBlockCache is not available here ({type(e).__name__}: {e})"
    cached = copy.deepcopy(model)
    cached.enable_cache(FirstBlockCacheConfig(threshold=0.05))

    def call(run, x):
        with cached.cache_context("bench"):
            return run(cached, x)

    return call, None


def _providers(session: Session, model, patched, run: Callable, headline: bool = False,
               cache_why_not: Optional[str] = "not a transformer") -> list[Provider]:
    """torch / compile / patched / patched-compile / cache / patched-cache over a model and its patched
    copy; ``run(model, x)`` is the timed call."""
    def eager(x):
        return run(model, x)

    def ours(x):
        return run(patched, x)

    if session.device.type != "cuda":
        compile_why = "GPU runs only: inductor takes minutes per whole model on the CPU"
    else:
        compile_why = session.quick_compile_why_not(headline)
    out = [utils.eager_provider(eager)]
    if session.wants("compile"):
        out.append(utils.compile_provider(eager, why_not=compile_why))
    if session.wants("patched"):
        out.append(utils.auto_provider(ours, "patched"))
    if session.wants("patched-native"):
        out.append(Provider("patched-native", utils.forced("native", ours), kind="ours", loose=True))
    if session.wants("patched-compile"):
        out.append(Provider("patched-compile", why_not=compile_why, kind="ours") if compile_why else
                   Provider("patched-compile", torch.compile(ours, dynamic=False), kind="ours", skip_on_failure=True))
    # (diffusers' cache skips blocks: not a baseline computing the same thing, so "outside" the first rule)
    for name, base, kind in (("cache", model, "outside"), ("patched-cache", patched, "ours")):
        if session.wants(name):
            call, why = _cached(base, session, cache_why_not)
            out.append(Provider(name, why_not=why, kind=kind) if call is None else
                       Provider(name, lambda x, call=call: call(run, x), kind=kind, loose=True))
    return out


def _patched_copy(model):
    import i2v_kernels

    patched = copy.deepcopy(model)
    i2v_kernels.patch(patched)
    return patched


def _transformer_case(spec: DiT, dtype: torch.dtype, session: Session) -> ModelCase:
    cls, why = _diffusers_class(spec.cls)

    def setup(device: torch.device) -> ModelRun:
        model = _build(cls, dict(spec.config, num_layers=spec.layers) if spec.layers else spec.config, device)
        inputs = _inputs(spec, device)
        reference = model(**inputs).sample  # the fp32 model: the oracle
        if dtype != torch.float32:
            model.to(dtype)
        # latents and text in the model's dtype; timesteps stay integers, RoPE tables fp32 (as the pipelines pass them)
        inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                  for k, v in inputs.items()}
        cache_why = None
        if spec.cls in ("LatteTransformer3DModel", "UNetSpatioTemporalConditionModel"):
            cache_why = "diffusers' FirstBlockCache does not run this model (unpatched neither)"
        return ModelRun(inputs=(inputs,), reference=reference,
                        providers=_providers(session, model, _patched_copy(model), lambda m, kw: m(**kw).sample,
                                             headline=spec is HEADLINE, cache_why_not=cache_why))

    extra = {"model": spec.source, "class": spec.cls, "layers": spec.layers, "full_layers": spec.full_layers,
             "batch": spec.batch, "forwards_per_step": spec.forwards_per_step}
    label = spec.label + (f" ({spec.layers} of {spec.full_layers} layers)" if spec.full_layers else "")
    op = "unet" if spec.cls.startswith("UNet") else "transformer"
    return ModelCase(op=op, label=label, dims=[spec.batch, *spec.latent], dtype=dtype,
                     setup=setup if cls else None, provider_names=PROVIDERS, extra=extra, why_not=why)


def _vae_case(spec: VAE, dtype: torch.dtype, session: Session) -> ModelCase:
    cls, why = _diffusers_class(spec.cls)

    def setup(device: torch.device) -> ModelRun:
        vae = _build(cls, spec.config, device)
        z = torch.randn(spec.z, device=device)
        # SVD's temporal decoder takes the frames in the batch and their count
        kw = {"num_frames": spec.z[0]} if spec.cls == "AutoencoderKLTemporalDecoder" else {}
        reference = vae.decode(z, **kw).sample
        if dtype != torch.float32:
            vae.to(dtype)
        patched = _patched_copy(vae)
        providers = _providers(session, vae, patched, lambda v, z: v.decode(z, **kw).sample)
        providers += _streaming_providers(session, spec, vae, patched)
        return ModelRun(inputs=(z.to(dtype),), reference=reference, providers=providers)

    extra = {"model": spec.source, "class": spec.cls}
    return ModelCase(op="vae-decode", label=spec.label, dims=list(spec.z), dtype=dtype, setup=setup if cls else None,
                     provider_names=PROVIDERS, extra=extra, why_not=why)


def _streaming_providers(session: Session, spec: VAE, vae, patched) -> list[Provider]:
    """``streaming`` / ``patched-streaming``: ``decode_streaming`` (the decoder on diffusers' own chunks,
    each written into one preallocated video) of the unpatched / patched VAE."""
    from i2v_kernels.integrations.diffusers import decode_streaming
    from i2v_kernels.integrations.diffusers.stream import STREAMING_VAES

    why = None if spec.cls in STREAMING_VAES else f"{spec.cls} does not stream (decode_streaming: CogVideoX, Wan)"
    out = []
    for name, model in (("streaming", vae), ("patched-streaming", patched)):
        if not session.wants(name):
            continue
        reason = why
        if reason is None and name == "streaming" and session.quick and session.device.type == "cuda":
            reason = "GPU --quick: only patched-streaming, within the stage's time cap"
        out.append(Provider(name, why_not=reason, kind="ours") if reason else
                   Provider(name, lambda z, m=model: decode_streaming(m, z, strict=True), kind="ours"))
    return out


def build_cases(session: Session) -> list[ModelCase]:
    transformers, vaes = MODELS[(session.device.type, session.quick)]
    last = (HEADLINE,) if (session.device.type, session.quick) == ("cuda", True) else ()
    cases = []
    for dtype in session.dtypes:
        cases += [_transformer_case(spec, dtype, session) for spec in transformers
                  if session.wants_op("unet" if spec.cls.startswith("UNet") else "transformer")]
        if session.wants_op("vae-decode"):
            cases += [_vae_case(spec, dtype, session) for spec in vaes]
        if session.wants_op("transformer"):
            cases += [_transformer_case(spec, dtype, session) for spec in last]
    return cases


# --------------------------------------------------------------------------------------------------
# Targets (issue 6); informational only

LEGEND = (
    "GPU, bf16: `step>=1.3x` the patched CogVideoX-5B forward (one denoising step) at least 1.3x unpatched eager "
    "(other transformers: n/a, the speedup is still shown); VAE decode: `decode>=1.3x` at least 1.3x unpatched "
    "eager and `mem<=orig` peak memory at most the unpatched decode's.",
    "Correctness (before timing): max |out - fp32 model| <= 2 x unpatched eager's own error in the same dtype + "
    "eps x max |fp32 output| (eps: fp32 1e-5, fp16 1e-3, bf16 1e-2); `max err` is that max error.",
    "VAE decode, every device and dtype: `stream>orig` the `patched-streaming` row (`decode_streaming` of the "
    "patched VAE: diffusers' chunks written into one preallocated video) at least as fast as diffusers' own "
    "`vae.decode` (`torch`) and with less peak memory (both ratios shown: time as a speedup, memory as a fraction).",
    "Peak MiB: what one call allocates beyond the live weights and inputs, output included (GPU: the CUDA "
    "allocator's peak; CPU: the running total of PyTorch's CPU allocator events, torch.profiler with profile_memory, "
    "one untimed call). CPU runs use tiny configs: they prove the script and the patched models run, not speed.",
)



def _streaming_targets(row: dict, session: Session) -> dict:
    """``patched-streaming`` against diffusers' own decode (``torch``): faster and less peak memory."""
    eager = next((r for r in session.case_rows if r["provider"] == "torch" and r["status"] == "ok"), None)
    if eager is None or row["ms"] is None:
        return {"stream>orig": "n/a"}
    faster = row["ms"] <= eager["ms"]
    if row["peak_mem_mb"] is None or eager["peak_mem_mb"] is None:
        return {"stream>orig": f"{utils.verdict(faster)} (time; memory n/a)"}
    mem = row["peak_mem_mb"] / eager["peak_mem_mb"]
    return {"stream>orig": f"{utils.verdict(faster and mem < 1)} ({eager['ms'] / row['ms']:.2f}x time, "
                           f"{mem:.2f}x peak memory)"}


def targets(row: dict, case: ModelCase, session: Session) -> dict:
    if row["provider"] == "patched-streaming":
        return _streaming_targets(row, session)
    if session.device.type != "cuda" or case.dtype != torch.bfloat16 or row["provider"] != "patched":
        return {}
    vs_eager = row["ratio_vs_eager"]
    if case.op in ("transformer", "unet"):
        if not case.label.startswith("cogvideox-5b"):
            return {"targets": "n/a"}
        return {"step>=1.3x": "n/a" if vs_eager is None else utils.verdict(vs_eager >= 1.3)}
    eager = next((r for r in session.case_rows if r["provider"] == "torch" and r["peak_mem_mb"] is not None), None)
    return {
        "decode>=1.3x": "n/a" if vs_eager is None else utils.verdict(vs_eager >= 1.3),
        "mem<=orig": "n/a" if eager is None or row["peak_mem_mb"] is None else utils.verdict(
            row["peak_mem_mb"] <= eager["peak_mem_mb"]),
    }


def step_table(session: Session) -> list[str]:
    """Time per denoising step at full depth, from the transformer rows of this run."""
    rows = [r for r in session.rows if r["op"] in ("transformer", "unet") and r["status"] == "ok"]
    if not rows:
        return []
    lines = ["", "## Time per denoising step at full depth", "",
             "Measured forward x forwards per step (CFG) x full layers / layers built (tiny CPU configs: not "
             "scaled). The parts outside the blocks are scaled too, so this slightly overstates; speedups are the "
             "measured ones.", "",
             "| model | dtype | provider | forward ms | forwards/step | layers built / full | ms per step | x eager |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["shape"]
        depth = (s.get("full_layers") or s["layers"]) / s["layers"] if s["layers"] else 1.0  # a UNet: built whole
        step = r["ms"] * s["forwards_per_step"] * depth
        vs = "-" if r["ratio_vs_eager"] is None else f"{r['ratio_vs_eager']:.2f}x"
        lines.append(f"| {s['label']} | {r['dtype']} | {r['provider']} | {r['ms']:.3f} | {s['forwards_per_step']} | "
                     f"{s['layers'] or 'all'} / {s.get('full_layers') or '-'} | {step:,.1f} | {vs} |")
    return lines


# --------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    session = utils.start_session(FAMILY, "Benchmark of i2v_kernels.patch() on diffusers video models",
                                  PROVIDERS, OPS, argv, QUICK_BUDGET_S)
    if session.device.type == "cuda":
        # the fp32 reference in true fp32 (cuDNN would run the VAEs' fp32 convs in TF32)
        torch.backends.cudnn.allow_tf32 = False
    for case in build_cases(session):
        if session.budget_s is not None and session.elapsed() > QUICK_STOP * session.budget_s:
            # bounded: gpu_check cuts the stage at its cap (a failure); the cases left are listed as skipped
            case = replace(case, why_not=f"left out: {QUICK_STOP:.0%} of the --quick time budget "
                                         f"({session.budget_s:.0f} s) was spent")
        run_model_case(session, case, targets)
    status = session.finish("diffusers video models: i2v_kernels.patch() vs unpatched", LEGEND)
    session.add_tables(step_table(session))
    return status


if __name__ == "__main__":
    sys.exit(main())
