"""The reference image-to-video model (i2v_model): kernels vs plain parity, streaming VAE, sampler,
I/O, the CLI's bad-input handling, a training smoke test, and the bundled weights (prompts, chunked
long videos). Small shapes, one intra-op thread: the whole file took 121-243 s on the shared 2-core CPU at
load 10-12 (656 s at load ~11 before the thread fixture below)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from i2v_model.config import CONFIGS, DiTConfig, ModelConfig, TextConfig, VAEConfig, get_config
from i2v_model.data import CAMERA_MOTIONS, ClipSource, Motion, render_clip
from i2v_model.dit import VideoDiT, rope_3d, warp
from i2v_model.evaluate import estimate_motion, motion_matches, phase_correlation
from i2v_model.io import ImageError, load_image, read_video, save_video
from i2v_model.pipeline import I2VPipeline
from i2v_model.sampler import (euler_sample, flow_matching_loss, guided, image_condition, shifted_timesteps,
                               x0_matching_loss)
from i2v_model.text import ByteTokenizer, TextEncoder
from i2v_model.vae import CausalVAE


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every tensor here is small (64-128 pixel frames, a tiny DiT): one intra-op thread does the work as
    fast, and on a shared CPU (the 2-core test machine at load 10) a second thread's waiting made the
    evaluation's image fits ~10x slower (1.4-2.2 s instead of 0.17-0.21 s a pair, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config() -> ModelConfig:
    return ModelConfig(
        name="test",
        vae=VAEConfig(latent_channels=4, channels=(8, 8, 16, 16)),
        text=TextConfig(width=32, depth=1, heads=2, max_len=16, out_dim=32),
        dit=DiTConfig(width=48, depth=2, heads=2, patch=2),
        height=32, width=32, frames=9, steps=3, guidance=3.0,
    )


def randomize(module: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Give zero-initialized parts (adaLN-Zero, output projection) nonzero values, so parity tests see
    every op."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "modulation" in name or "proj_out" in name or "motion_out" in name:
                p.normal_(0, std)
    return module


def twins(cls, *args):
    """The same module built with and without kernels, sharing weights."""
    a = cls(*args, use_kernels=True)
    b = cls(*args, use_kernels=False)
    b.load_state_dict(a.state_dict())
    return a.eval(), b.eval()


# --------------------------------------------------------------------------------------------------
# Config


def test_registry():
    assert {"tiny", "cogvideox-2b-like", "cogvideox-5b-like", "wan-1.3b-like"} <= set(CONFIGS)
    tiny = get_config("tiny")
    assert (tiny.height, tiny.width, tiny.frames, tiny.latent_frames, tiny.latent_size) == (64, 64, 17, 5, (8, 8))
    tiny.dit.width = 1
    assert get_config("tiny").dit.width != 1, "get_config must return a copy"
    assert get_config("cogvideox-2b-like").tokens == 13 * 30 * 45
    assert get_config("wan-1.3b-like").tokens == 21 * 30 * 52
    assert get_config("cogvideox-5b-like").dit.head_dim == 64
    with pytest.raises(KeyError, match="unknown model"):
        get_config("nope")
    assert ModelConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny


# --------------------------------------------------------------------------------------------------
# Networks: kernels vs plain PyTorch


def test_dit_kernels_match_plain():
    cfg = small_config()
    a, b = twins(VideoDiT, cfg.dit, cfg.vae.latent_channels, cfg.text.out_dim)
    randomize(a)
    b.load_state_dict(a.state_dict())
    B, C, T, h, w = 2, cfg.vae.latent_channels, 3, 4, 4
    x, cond = torch.randn(B, C, T, h, w), torch.randn(B, C + 1, T, h, w)
    ctx, lens, pooled = torch.randn(B, 16, 32), torch.tensor([5, 16]), torch.randn(B, 32)
    t = torch.rand(B)
    with torch.no_grad():
        ya, yb = a(x, t, cond, ctx, lens, pooled), b(x, t, cond, ctx, lens, pooled)
    assert ya.shape == x.shape
    assert ya.abs().mean() > 1e-3, "the DiT output should not be trivially zero here"
    torch.testing.assert_close(ya, yb, atol=1e-4, rtol=1e-4)


def test_dit_padding_is_ignored():
    """Context tokens past kv_lens do not change the output."""
    cfg = small_config()
    dit = randomize(VideoDiT(cfg.dit, cfg.vae.latent_channels, cfg.text.out_dim)).eval()
    x, cond = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 5, 2, 4, 4)
    ctx, pooled, t = torch.randn(1, 16, 32), torch.randn(1, 32), torch.rand(1)
    ctx2 = ctx.clone()
    ctx2[:, 6:] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, cond, ctx, torch.tensor([6]), pooled),
                                   dit(x, t, cond, ctx2, torch.tensor([6]), pooled))


def test_dit_preconditioning_ends():
    """Whatever the network says: at t = 0 the clean latent is the input itself, at t = 1 it is the first
    frame plus c_out = sigma_motion times the network output; c_skip / c_out are the linear estimate's."""
    cfg = small_config()
    dit = randomize(VideoDiT(cfg.dit, cfg.vae.latent_channels, cfg.text.out_dim)).eval()
    x, cond = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 5, 3, 4, 4)
    ctx, lens, pooled = torch.randn(2, 6, 32), torch.tensor([6, 3]), torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(dit.denoise(x, torch.zeros(2), cond, ctx, lens, pooled), x)
        at_one = dit.denoise(x, torch.ones(2), cond, ctx, lens, pooled)
        other_x = dit.denoise(torch.randn_like(x), torch.ones(2), cond, ctx, lens, pooled)
    assert (at_one - cond[:, :4]).abs().mean() > 1e-3  # the network's part, not the condition alone
    assert not torch.allclose(at_one, other_x)          # the network still sees x_t ...
    s, t = cfg.dit.sigma_motion, torch.tensor([0.3])
    c_skip, c_out = dit.preconditioning(t)
    # ... but the skip does not: c_skip, c_out minimize E|c_skip ((1-t) d + t n) - d|^2 for d ~ N(0, s^2).
    a = 1 - t
    torch.testing.assert_close(c_skip.flatten(), a * s ** 2 / (a ** 2 * s ** 2 + t ** 2))
    residual = (c_skip.flatten() * a - 1) ** 2 * s ** 2 + (c_skip.flatten() * t) ** 2
    torch.testing.assert_close(c_out.flatten() ** 2, residual)
    with pytest.raises(ValueError, match="t must be"):
        dit.denoise(x, torch.zeros(3), cond, ctx, lens, pooled)


def test_dit_knows_the_frame_index():
    """Identical frames (no mask) still get different outputs per frame: attention alone sees only
    relative positions, the position embedding gives each frame its index."""
    cfg = small_config()
    dit = randomize(VideoDiT(cfg.dit, cfg.vae.latent_channels, cfg.text.out_dim)).eval()
    x = torch.randn(1, 4, 1, 4, 4).expand(1, 4, 3, 4, 4).contiguous()
    cond = torch.cat([torch.randn(1, 4, 1, 4, 4).expand(1, 4, 3, 4, 4), torch.zeros(1, 1, 3, 4, 4)], dim=1)
    ctx, lens, pooled = torch.randn(1, 6, 32), torch.tensor([6]), torch.randn(1, 32)
    seen = []
    dit.proj_out.register_forward_hook(lambda m, i, o: seen.append(o))  # the network's output [B, T, S, .]
    with torch.no_grad():
        dit.denoise(x, torch.full((1,), 0.7), cond, ctx, lens, pooled)
        assert (seen[-1][:, 1] - seen[-1][:, 2]).abs().max() > 1e-3
        dit.pos_embed.weight.zero_()
        dit.pos_embed.bias.zero_()
        dit.denoise(x, torch.full((1,), 0.7), cond, ctx, lens, pooled)
    torch.testing.assert_close(seen[-1][:, 1], seen[-1][:, 2])  # without it the frames are indistinguishable


def test_warp_moves_content_by_the_flow():
    z = torch.randn(2, 3, 2, 6, 7)
    torch.testing.assert_close(warp(z, torch.zeros(2, 2, 2, 6, 7)), z)
    flow = torch.zeros(2, 2, 2, 6, 7)
    flow[:, 0, 1] = 2.0   # frame 1: take the content 2 pixels to the right (it moves left)
    flow[1, 1, 0] = -1.0  # sample 1, frame 0: take the content 1 pixel up (it moves down)
    out = warp(z, flow)
    torch.testing.assert_close(out[:, :, 1, :, :-2], z[:, :, 1, :, 2:])
    torch.testing.assert_close(out[:, :, 1, :, -2:], z[:, :, 1, :, -1:].expand(-1, -1, -1, 2))  # border
    torch.testing.assert_close(out[1, :, 0, 1:], z[1, :, 0, :-1])
    torch.testing.assert_close(out[0, :, 0], z[0, :, 0])
    half = warp(z, torch.full((2, 2, 2, 6, 7), 0.5) * torch.tensor([1.0, 0.0]).view(1, 2, 1, 1, 1))
    torch.testing.assert_close(half[..., :-1], (z[..., :-1] + z[..., 1:]) / 2)  # bilinear between


def test_dit_flow_output_moves_the_first_frame():
    """At t = 1 with a zero correction the clean latent is the first frame warped by the flow head's
    running sum: a step of one pixel per frame moves frame k by k pixels."""
    cfg = small_config()
    dit = VideoDiT(cfg.dit, cfg.vae.latent_channels, cfg.text.out_dim).eval()
    C, p = cfg.vae.latent_channels, cfg.dit.patch
    with torch.no_grad():
        dit.proj_out.bias.view(C + 2, p, p)[C] = 1.0  # flow step dx = 1 everywhere, nothing else
    x, cond = torch.randn(1, C, 3, 4, 6), torch.randn(1, C + 1, 3, 4, 6)
    ctx, lens, pooled = torch.randn(1, 6, 32), torch.tensor([6]), torch.randn(1, 32)
    with torch.no_grad():
        y = dit.denoise(x, torch.ones(1), cond, ctx, lens, pooled)
    z = cond[:, :C]
    torch.testing.assert_close(y[:, :, 0], z[:, :, 0])
    torch.testing.assert_close(y[:, :, 1, :, :-1], z[:, :, 1, :, 1:])
    torch.testing.assert_close(y[:, :, 2, :, :-2], z[:, :, 2, :, 2:])


def test_affine_flow_pan_zoom_rotation():
    from i2v_model.dit import affine_flow

    h, w = 4, 6
    v = (torch.arange(h) - (h - 1) / 2) / (h / 2)
    u = (torch.arange(w) - (w - 1) / 2) / (w / 2)
    params = torch.tensor([[[0, 0, 1.5, 0, 0, -0.5],     # pan: the same (1.5, -0.5) everywhere
                            [-0.3, 0, 0, 0, -0.3, 0],    # zoom in: pointing at the centre
                            [0, 0.2, 0, -0.2, 0, 0]]])   # clockwise turn of the content
    f = affine_flow(params, h, w)
    assert f.shape == (1, 2, 3, h, w)
    torch.testing.assert_close(f[0, :, 0], torch.tensor([1.5, -0.5]).view(2, 1, 1).expand(2, h, w))
    torch.testing.assert_close(f[0, 0, 1], -0.3 * u.expand(h, w))
    torch.testing.assert_close(f[0, 1, 1], -0.3 * v[:, None].expand(h, w))
    torch.testing.assert_close(f[0, 0, 2], 0.2 * v[:, None].expand(h, w))
    torch.testing.assert_close(f[0, 1, 2], -0.2 * u.expand(h, w))
    # Warping an image by the zoom flow enlarges its content about the centre (as the data's zoom in).
    z = torch.zeros(1, 1, 1, 8, 8)
    z[..., 2:6, 2:6] = 1.0
    grown = warp(z, affine_flow(torch.tensor([[[-2.0, 0, 0, 0, -2.0, 0]]]), 8, 8))  # 2x: 2 px in at the edge
    assert grown.sum() > z.sum() * 1.5 and grown[..., 1, 3] > 0.2 and grown[..., 6, 4] > 0.2
    torch.testing.assert_close(grown[..., 3:5, 3:5], z[..., 3:5, 3:5])


def test_dit_camera_head_moves_every_pixel_alike():
    """The global motion head's translation moves the whole frame: its bias alone, a step of one pixel
    per frame, gives the same video as the per-pixel flow output does (the head's mean token has no say
    while its weight is zero)."""
    cfg = small_config()
    dit = VideoDiT(cfg.dit, cfg.vae.latent_channels, cfg.text.out_dim).eval()
    C = cfg.vae.latent_channels
    x, cond = torch.randn(1, C, 3, 4, 6), torch.randn(1, C + 1, 3, 4, 6)
    ctx, lens, pooled = torch.randn(1, 6, 32), torch.tensor([6]), torch.randn(1, 32)
    with torch.no_grad():
        still = dit.denoise(x, torch.ones(1), cond, ctx, lens, pooled)
        torch.testing.assert_close(still, cond[:, :C].expand(-1, -1, 3, -1, -1))  # zero-initialized: a still image
        dit.motion_out.bias[5] = 1.0   # dy = 1 per frame: take the content from below (it moves up)
        y = dit.denoise(x, torch.ones(1), cond, ctx, lens, pooled)
    z = cond[:, :C]
    torch.testing.assert_close(y[:, :, 0], z[:, :, 0])
    torch.testing.assert_close(y[:, :, 1, :-1], z[:, :, 1, 1:])
    torch.testing.assert_close(y[:, :, 2, :-2], z[:, :, 2, 2:])


def test_rope_3d_shape():
    cos, sin = rope_3d(3, 2, 4, 32)
    assert cos.shape == sin.shape == (3, 8, 32)
    torch.testing.assert_close(cos ** 2 + sin ** 2, torch.ones_like(cos))


def test_vae_kernels_match_plain_and_shapes():
    cfg = small_config()
    a, b = twins(CausalVAE, cfg.vae)
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        za, zb = a.encode(x), b.encode(x)
        assert za.shape == (1, 4, 3, 4, 4)
        torch.testing.assert_close(za, zb, atol=1e-5, rtol=1e-5)
        ya, yb = a.decode(za), b.decode(za)
    assert ya.shape == x.shape
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        a.encode(x[:, :, :8])


def test_vae_shortcut_reshapes_invert_each_other():
    """The parameter-free Downsample/Upsample shortcuts: channel folding is exactly undone, in space and
    in causal time (frame 0 alone), and averaging/repeating channels are each other's inverse on
    repeated inputs."""
    from i2v_model.vae import average_channels, channels_to_space, repeat_channels, space_to_channels

    x = torch.randn(2, 3, 9, 8, 6)
    s = space_to_channels(x, temporal=False)
    assert s.shape == (2, 12, 9, 4, 3)
    torch.testing.assert_close(channels_to_space(s, temporal=False, first=True), x, rtol=0, atol=0)
    t = space_to_channels(x, temporal=True)
    assert t.shape == (2, 24, 5, 4, 3)
    # Output frame j holds input frames (2j - 1, 2j): the frames a causal stride-2 conv output j ends on.
    # Channels are (c, dt, dy, dx); frame 0 is its own pair.
    for j, (a, b) in enumerate([(0, 0), (1, 2), (3, 4)]):
        torch.testing.assert_close(t[:, 0, j], x[:, 0, a, ::2, ::2], rtol=0, atol=0)
        torch.testing.assert_close(t[:, 4, j], x[:, 0, b, ::2, ::2], rtol=0, atol=0)
        torch.testing.assert_close(t[:, 5, j], x[:, 0, b, ::2, 1::2], rtol=0, atol=0)
        torch.testing.assert_close(t[:, 6, j], x[:, 0, b, 1::2, ::2], rtol=0, atol=0)
    torch.testing.assert_close(channels_to_space(t, temporal=True, first=True), x, rtol=0, atol=0)
    assert channels_to_space(t[:, :, 1:], temporal=True, first=False).shape == (2, 3, 8, 8, 6)
    y = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(average_channels(repeat_channels(y, 12), 4), y)
    assert torch.equal(repeat_channels(y, 8)[:, 2:4], y[:, 1:2].expand(2, 2, 3, 5))


def test_vae_is_causal():
    """Latent frame 0 depends on video frame 0 alone; decoded frame 0 on latent frame 0 alone."""
    vae = CausalVAE(small_config().vae).eval()
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    x2 = x.clone()
    x2[:, :, 1:] = torch.rand_like(x2[:, :, 1:])
    with torch.no_grad():
        z, z2 = vae.encode(x), vae.encode(x2)
        torch.testing.assert_close(z[:, :, :1], z2[:, :, :1])
        assert not torch.allclose(z[:, :, 1:], z2[:, :, 1:])
        torch.testing.assert_close(vae.decode(z)[:, :, :1], vae.decode(z[:, :, :1]))


def test_vae_streaming_decode_equals_whole():
    vae = CausalVAE(small_config().vae).eval()
    z = torch.randn(1, 4, 4, 2, 2)
    with torch.no_grad():
        whole = vae.decode(z)
        assert whole.shape == (1, 3, 13, 16, 16)
        for chunk in (1, 2, [1, 1, 2]):
            torch.testing.assert_close(vae.decode(z, chunk=chunk), whole, atol=1e-5, rtol=1e-5, msg=str(chunk))
        # A stream across calls (a long video's chunks): each call continues the latent of the one before.
        from i2v_kernels.nn import ConvCache

        state = ConvCache()
        first = vae.decode(z[:, :, :2], state=state)
        assert first.shape[2] == 5 and len(state) > 0
        rest = vae.decode(z[:, :, 2:], chunk=1, state=state)
        assert rest.shape[2] == 8
        torch.testing.assert_close(torch.cat([first, rest], 2), whole, atol=1e-5, rtol=1e-5)
        fresh = vae.decode(z[:, :, 2:], chunk=1, state=ConvCache())        # a new video: not the continuation
        assert fresh.shape[2] == 5


def test_text_encoder():
    tok = ByteTokenizer(8)
    ids, lens = tok(["Hi  THERE", "", "é"])
    assert ids.shape == (3, 8) and lens.tolist() == [8, 2, 4]  # cut at max_len; BOS+EOS; 2 UTF-8 bytes
    assert ids[1, 2:].eq(0).all()
    assert tok(["hi there"])[0].equal(tok(["  HI there "])[0])
    cfg = small_config().text
    a, b = twins(TextEncoder, cfg)
    with torch.no_grad():
        ta, la, pa = a(["pan left", "zoom in on the scene"])
        tb, lb, pb = b(["pan left", "zoom in on the scene"])
        alone = a(["pan left"])[2]
    assert ta.shape == (2, cfg.max_len, cfg.out_dim) and la.tolist() == [10, 16]
    torch.testing.assert_close(ta, tb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], pa[0], atol=1e-5, rtol=1e-5)  # batch neighbours do not leak in


# --------------------------------------------------------------------------------------------------
# Sampler and pipeline


def test_sampler():
    times = shifted_timesteps(5, shift=2.0)
    assert times.shape == (6,) and times[0] == 1 and times[-1] == 0 and (times[1:] < times[:-1]).all()
    first = torch.randn(2, 4, 1, 4, 4)
    noise = torch.randn(2, 4, 3, 4, 4)
    calls = []

    def velocity(x, t):
        calls.append(t)
        torch.testing.assert_close(x[:, :, :1], first)
        return torch.ones_like(x)

    out = euler_sample(velocity, noise, first, times)
    assert len(calls) == 5 and calls[0].shape == (2,)
    torch.testing.assert_close(out[:, :, :1], first)
    torch.testing.assert_close(out[:, :, 1:], noise[:, :, 1:] - 1)  # integrates -1 over t: 1 -> 0
    cond = image_condition(first, 3)
    assert cond.shape == (2, 5, 3, 4, 4) and cond[:, 4, 0].eq(1).all() and cond[:, 4, 1:].eq(0).all()
    assert torch.equal(cond[:, :4], first.expand(-1, -1, 3, -1, -1))

    model_calls = []

    def model(x, t, c, tokens, lens, pooled):
        model_calls.append(x.shape[0])
        return tokens.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) * torch.ones_like(x)

    ctx = (torch.ones(2, 3, 8), torch.tensor([3, 3]), torch.ones(2, 8))
    null = (torch.zeros(2, 3, 8), torch.tensor([2, 2]), torch.zeros(2, 8))
    v = guided(model, cond, ctx, null, 3.0)(noise, torch.ones(2))
    torch.testing.assert_close(v, 3.0 * torch.ones_like(noise))  # 0 + 3 (1 - 0)
    assert model_calls == [4]  # one batch for both halves
    # The clean-latent loss is the velocity loss of v = (x_t - x0) / t weighted by t^2.
    z0, denoise = torch.randn(2, 4, 3, 4, 4), lambda x, t: 0.5 * x
    t = torch.full((2,), 0.3)
    x0_loss = x0_matching_loss(denoise, z0, t, generator=torch.Generator().manual_seed(1))
    v_loss = flow_matching_loss(lambda x, t: (x - denoise(x, t)) / 0.3, z0, t, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(x0_loss, 0.09 * v_loss)
    # A per-sample weight scales each sample's error (the EDM weighting of the trainer).
    t2 = torch.tensor([0.2, 0.7])
    g = torch.Generator().manual_seed(3)
    n = torch.randn(z0.shape, generator=g)  # the same noise the batched call draws
    xt = torch.cat([z0[:, :, :1], ((1 - t2.view(-1, 1, 1, 1, 1)) * z0 + t2.view(-1, 1, 1, 1, 1) * n)[:, :, 1:]], 2)
    per_sample = ((0.5 * xt - z0)[:, :, 1:] ** 2).flatten(1).mean(1)
    weighted = x0_matching_loss(denoise, z0, t2, generator=torch.Generator().manual_seed(3),
                                weight=torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(weighted, (per_sample[0] + 4 * per_sample[1]) / 2)
    loss = flow_matching_loss(lambda x, t: torch.zeros_like(x), torch.randn(2, 4, 3, 4, 4), torch.rand(2))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_pipeline_same_video_with_and_without_kernels():
    cfg = small_config()
    torch.manual_seed(1)
    pa = I2VPipeline(cfg, use_kernels=True)
    randomize(pa.dit)
    pb = I2VPipeline(cfg, use_kernels=False)
    pb.load_state_dict(pa.state_dict())
    image = torch.rand(3, 32, 32) * 2 - 1
    va, ta = pa.eval().generate(image, "the camera pans right", seed=3)
    vb, _ = pb.eval().generate(image, "the camera pans right", seed=3)
    assert va.shape == (3, 9, 32, 32) and set(ta) == {"encode", "denoise", "decode", "render"}
    torch.testing.assert_close(va[:, 0], image)  # the rendered first frame is the input itself
    torch.testing.assert_close(va, vb, atol=1e-4, rtol=1e-4)
    vc, _ = pa.generate(image, "the camera pans right", seed=4)
    assert not torch.allclose(va, vc)
    vd, _ = pa.generate(image, "the camera pans right", seed=3, decode_chunk=1)
    torch.testing.assert_close(vd, va, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        pa.generate(image, "x", frames=8)
    with pytest.raises(ValueError, match="image must be"):
        pa.generate(image[0], "x")
    with pytest.raises(ValueError, match="image must be"):
        pa.generate(image[:, :4], "x")
    with pytest.raises(ValueError, match="render=False"):
        pa.generate(torch.zeros(3, 48, 48), "x", render=False)
    # Any output size: the DiT samples at its own size, the frames are the input's.
    big = torch.nn.functional.interpolate(image[None], size=(40, 56), mode="bilinear")[0]
    ve, _ = pa.generate(big, "the camera pans right", seed=3)
    assert ve.shape == (3, 9, 40, 56) and torch.equal(ve[:, 0], big.clamp(-1, 1))
    raw, _ = pa.generate(image, "the camera pans right", seed=3, render=False)
    assert raw.shape == (3, 9, 32, 32) and not torch.allclose(raw[:, 1:], va[:, 1:])


# --------------------------------------------------------------------------------------------------
# Data and motion measurement


def test_phase_correlation_sign():
    img = torch.rand(3, 32, 32) * 2 - 1
    img = torch.nn.functional.avg_pool2d(img[None], 3, 1, 1)[0]
    dx, dy = phase_correlation(img, torch.roll(img, (2, -3), dims=(1, 2)))  # down 2, left 3
    assert abs(dx + 3) < 0.3 and abs(dy - 2) < 0.3


def test_clip_conventions_and_determinism():
    """Camera pans right -> content moves left; tilt up -> content moves down; zoom in -> grows;
    'rotates clockwise' -> the content turns clockwise: measured by the eval's own estimators."""
    src = ClipSource(0, 9, 32)
    canvas = torch.from_numpy(src.image(3)).permute(2, 0, 1).float() / 127.5 - 1
    for kind in CAMERA_MOTIONS:
        m = estimate_motion(render_clip(canvas, Motion(kind, speed=1.0), 9, 32))
        assert motion_matches(kind, m, 32), (kind, str(m))
    m = estimate_motion(render_clip(canvas, Motion("pan_right"), 9, 32))
    assert m.dx < -4
    a, pa, ma = src.sample(7)
    b, pb, mb = src.sample(7)
    assert a.equal(b) and pa == pb and ma == mb and a.shape == (3, 9, 32, 32)
    assert -1 <= a.min() and a.max() <= 1
    held = ClipSource(0, 9, 32, split="heldout")
    assert not held.sample(7)[0].equal(a)



@pytest.mark.parametrize("kind", CAMERA_MOTIONS + ("object_left",))
def test_camera_flow_maps_the_first_frame_onto_each_frame(kind):
    """The camera-flow target of training: the first frame warped by :func:`camera_flow` (through the
    DiT's own affine_flow and warp) is the rendered frame, wherever both see the canvas."""
    from i2v_model.data import camera_flow
    from i2v_model.dit import affine_flow

    g = torch.Generator().manual_seed(0)
    canvas = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 96, 96, generator=g) * 4 - 2, 7, 1, 3)[0]
    motion = Motion(kind, speed=1.3, zoom=1.4, angle=25.0)
    clip = render_clip(canvas, motion, 9, 48)
    params = camera_flow(motion, 9, 48)
    assert params.shape == (9, 6) and params[0].abs().max() < 1e-6
    moved = warp(clip[None, :, :1].expand(-1, -1, 9, -1, -1), affine_flow(params[None] * 24, 48, 48))[0]
    c = slice(14, 34)  # the centre: no border effects
    if kind in ("static", "object_left"):  # the object moves, not the camera
        assert params.abs().max() < 1e-6
        return
    # Sampled twice (canvas -> first frame -> warp) vs once: equal up to interpolation blur, far closer
    # than the still first frame is.
    err_moved = (moved[:, 1:, c, c] - clip[:, 1:, c, c]).abs().mean(dim=(0, 2, 3))   # per frame
    err_still = (clip[:, :1, c, c] - clip[:, 1:, c, c]).abs().mean(dim=(0, 2, 3))
    assert err_still[-1] > 0.05 and (err_moved < 0.25 * err_still).all(), (err_moved, err_still)
    assert err_moved[-1] < 0.1 * err_still[-1], (err_moved, err_still)

# --------------------------------------------------------------------------------------------------
# I/O


def _save(tmp_path, name, img):
    p = tmp_path / name
    img.save(p)
    return p


def test_load_image_modes_and_sizes(tmp_path):
    from PIL import Image

    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent red -> white
    x = load_image(_save(tmp_path, "a.png", rgba), 16, 16)
    assert x.shape == (3, 16, 16) and torch.allclose(x, torch.ones_like(x))
    gray = Image.fromarray(np.full((23, 37), 64, np.uint8), "L")
    x = load_image(_save(tmp_path, "g.png", gray), 32, 32)
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.full_like(x, 64 / 127.5 - 1), atol=1e-2)
    pal = Image.new("RGB", (7, 91), (0, 0, 255)).convert("P")
    x = load_image(_save(tmp_path, "p.gif", pal), 24, 24)
    assert x.shape == (3, 24, 24) and x[2].min() > 0.9 and x[0].max() < -0.9
    deep = Image.fromarray(np.full((10, 12), 65535, np.uint16))
    x = load_image(_save(tmp_path, "d.png", deep), 8, 8)
    assert torch.allclose(x, torch.ones_like(x))
    # Center crop: a wide image keeps its middle.
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255
    x = load_image(_save(tmp_path, "w.png", Image.fromarray(wide)), 10, 10)
    assert x.min() > 0.9
    jpg = _save(tmp_path, "c.jpg", Image.new("CMYK", (20, 20), (0, 0, 0, 0)))
    assert load_image(jpg, 8, 8).shape == (3, 8, 8)


def test_load_image_errors(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png", 8, 8)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match="not an image"):
        load_image(text, 8, 8)
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path, 8, 8)
    from PIL import Image

    good = tmp_path / "t.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageError):
        load_image(truncated, 8, 8)


@pytest.mark.parametrize("suffix,size", [(".mp4", 32), (".gif", 32), (".mp4", 33)], ids=["mp4", "gif", "mp4-odd"])
def test_save_video_round_trip(tmp_path, suffix, size):
    frames = np.zeros((5, size, size, 3), np.uint8)
    for t in range(5):
        frames[t, :, : 4 + 4 * t] = (200, 60, 30)
    path = save_video(frames, tmp_path / f"v{suffix}", fps=8)
    back = read_video(path)
    assert back.shape[0] == 5 and back.shape[3] == 3 and back.shape[1] >= size
    err = np.abs(back[:, :size, :size].astype(int) - frames.astype(int)).mean()
    assert err < 12, err
    assert sorted(os.listdir(tmp_path)) == [f"v{suffix}"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)


def test_save_video_failure_leaves_nothing(tmp_path, monkeypatch):
    import i2v_model.io as io

    def broken(frames, path, fps):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("encoder died")

    monkeypatch.setattr(io, "_write_gif", broken)
    with pytest.raises(io.OutputError, match="encoder died"):
        save_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "x.gif")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="does not exist"):
        save_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "no" / "x.gif")
    with pytest.raises(ValueError, match="must end in"):
        save_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "x.avi")


# --------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run_cli(argv, capsys):
    from i2v_model.cli import main

    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--image", "missing.png"], "--image: no such file"),
    (["generate", "--image", "notes.txt"], "not an image"),
    (["generate", "--frames", "8"], "--frames must be 1 + 4k"),
    (["generate", "--frames", "0"], "--frames must be 1 + 4k"),
    (["generate", "--model", "huge"], "unknown model"),
    (["generate", "--backend", "quantum"], "unknown backend"),
    (["generate", "--out", "no/such/folder/v.mp4"], "output folder does not exist"),
    (["generate", "--out", "v.avi"], "--out must end in"),
    (["generate", "--steps", "0"], "--steps must be in [1, "),
    (["generate", "--frames", "x"], "invalid int value"),
    (["generate", "--nope"], "unrecognized arguments"),
    (["eval", "--model", "huge"], "unknown model"),
    (["eval", "--motions", "pan_sideways"], "unknown motion"),
    (["generate", "--weights", "missing.safetensors"], "--weights: no such file"),
    (["eval", "--weights", "notes.txt"], "--weights: cannot load notes.txt"),
], ids=["missing", "not-image", "frames-8", "frames-0", "model", "backend", "out-folder", "out-suffix", "steps",
        "frames-type", "unknown-flag", "eval-model", "eval-motion", "weights-missing", "weights-not-safetensors"])
def test_cli_bad_input(in_tmp, capsys, argv, message):
    (in_tmp / "notes.txt").write_text("hello")
    before = sorted(os.listdir(in_tmp))
    rc, out, err = _run_cli(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("i2v: error: ") and message in lines[0], err
    assert sorted(os.listdir(in_tmp)) == before


@pytest.fixture
def small_tiny(monkeypatch):
    """Registry entry "tiny" replaced by the small test config (random weights): fast CLI and training."""
    cfg = small_config()
    cfg.name = "tiny"
    monkeypatch.setitem(CONFIGS, "tiny", cfg)
    return cfg


def test_cli_generate(in_tmp, capsys):
    rc, out, err = _run_cli(["generate", "--frames", "5", "--steps", "1", "--out", "clip", "--seed", "1"], capsys)
    assert rc == 0, err
    assert sorted(os.listdir(in_tmp)) == ["clip.gif", "clip.mp4"]
    assert "denoise" in out and "decode" in out and str(in_tmp / "clip.mp4") in out
    assert read_video(in_tmp / "clip.gif").shape == (5, 256, 256, 3)  # the default size
    rc, out, err = _run_cli(["generate", "--frames", "5", "--steps", "1", "--out", "wide.gif", "--size", "96x64"],
                            capsys)
    assert rc == 0, err
    assert read_video(in_tmp / "wide.gif").shape == (5, 64, 96, 3)
    for bad in ("0", "12x", "abc", "100000", "8x8"):
        rc, _, err = _run_cli(["generate", "--size", bad, "--out", "bad.gif"], capsys)
        assert rc == 2 and "--size" in err and not (in_tmp / "bad.gif").exists(), (bad, err)


def test_cli_eval(small_tiny, capsys):
    rc, out, err = _run_cli(["eval", "--images", "1", "--steps", "1", "--motions", "pan_right,zoom_in"], capsys)
    assert rc == 0, err
    assert "motion adherence" in out and "cleanliness" in out and "consistency" in out and "pan_right" in out
    assert "static" not in out


def test_cli_info(capsys):
    rc, out, _ = _run_cli(["info"], capsys)
    assert rc == 0 and "backends" in out


# --------------------------------------------------------------------------------------------------
# Training


def model_file_of_other_shapes(tmp_path: Path) -> Path:
    """A weights file of the test config with a wider DiT."""
    from safetensors.torch import save_file

    cfg = small_config()
    cfg.dit.width = 64
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in I2VPipeline(cfg, use_kernels=False).state_dict().items()}, str(path))
    return path


def test_training_smoke_resume_and_export(small_tiny, tmp_path, capsys):
    from i2v_model import train

    run = tmp_path / "run"
    argv = ["--run", str(run), "--vae-steps", "2", "--vae-batch", "1", "--vae-frames", "5", "--vae-crop", "16",
            "--stats-clips", "2",
            "--dit-steps", "2", "--dit-batch", "2", "--pool", "2", "--refresh-every", "1", "--refresh", "1",
            "--log-every", "1", "--ckpt-every", "1", "--warmup", "1"]
    assert train.main(argv) == 0
    log = (run / "log.txt").read_text()
    assert "vae step 2/2" in log and "dit step 2/2" in log
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["dit_batch"] == 2 and cfg["model"]["dit"]["width"] == small_tiny.dit.width
    # Resume: two more DiT steps continue from the checkpoint.
    assert train.main([a if a != "2" or argv[i - 1] != "--dit-steps" else "4" for i, a in enumerate(argv)]) == 0
    log = (run / "log.txt").read_text()
    assert "dit step 3/4" in log and log.count("dit step 1/") == 1
    with pytest.raises(ValueError, match="resume it unchanged"):
        train.main(["--run", str(run), "--dit-batch", "3"])
    # The decoder stage refines the decoder only; the export takes its VAE.
    vae_before = torch.load(run / "vae.pt", weights_only=False)["model"]
    assert train.main(["--run", str(run), "--stage", "decoder", "--decoder-steps", "2"]) == 0
    assert "decoder step 2/2" in (run / "log.txt").read_text()
    refined = torch.load(run / "decoder.pt", weights_only=False)["model"]
    assert all(torch.equal(refined[k], v) for k, v in vae_before.items() if k.startswith("encoder."))
    assert not all(torch.equal(refined[k], v) for k, v in vae_before.items() if k.startswith("decoder."))
    out = tmp_path / "w.safetensors"
    assert train.main(["--run", str(run), "--export", "--weights", str(out)]) == 0
    pipe = I2VPipeline.from_pretrained("tiny", weights=out)
    assert pipe.pretrained and pipe.vae.latent_std.item() != 1.0
    torch.testing.assert_close(pipe.vae.decoder.conv_out.weight, refined["decoder.conv_out.weight"])
    torch.testing.assert_close(pipe.vae.encoder.conv_in.weight, vae_before["encoder.conv_in.weight"])
    rc, out_text, err = _run_cli(["eval", "--weights", str(out), "--images", "1", "--steps", "1", "--motions",
                                  "static"], capsys)
    assert rc == 0 and "motion adherence" in out_text, err
    # A new run seeded with that VAE skips the VAE stage and trains the DiT on its latents.
    run2 = tmp_path / "run2"
    assert train.main(["--run", str(run2), "--vae-from", str(out), "--vae-steps", "3", "--stats-clips", "2",
                       "--dit-steps", "1", "--dit-batch", "2", "--pool", "2", "--log-every", "1", "--warmup", "1"]) == 0
    log2 = (run2 / "log.txt").read_text()
    assert "vae taken from" in log2 and "vae step" not in log2 and "dit step 1/1" in log2
    seeded = torch.load(run2 / "vae.pt", weights_only=False)
    assert seeded["step"] == 3
    torch.testing.assert_close(seeded["model"]["decoder.conv_out.weight"], pipe.vae.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="needs a new --run"):
        train.main(["--run", str(run2), "--vae-from", str(out)])
    # Fine-tuning: a run whose DiT and text encoder start from the exported ones.
    run3 = tmp_path / "run3"
    assert train.main(["--run", str(run3), "--vae-from", str(out), "--dit-from", str(out), "--stage", "dit",
                       "--dit-steps", "1", "--dit-batch", "2", "--pool", "2", "--log-every", "1", "--warmup", "1",
                       "--dit-lr", "0"]) == 0
    assert "dit and text encoder taken from" in (run3 / "log.txt").read_text()
    tuned = torch.load(run3 / "dit.pt", weights_only=False)
    torch.testing.assert_close(tuned["dit"]["proj_out.weight"], pipe.dit.proj_out.weight)  # lr 0: unchanged
    assert tuned["pool_camera"].shape == (2, 3, 6)  # each pooled clip's camera path on its latent frames
    del tuned["pool_camera"]
    torch.save(tuned, run3 / "dit.pt")
    with pytest.raises(ValueError, match="camera"):  # a checkpoint from before the camera loss
        train.main(["--run", str(run3), "--dit-steps", "2"])
    with pytest.raises(FileNotFoundError, match="--dit-from"):
        train.main(["--run", str(tmp_path / "run4"), "--vae-from", str(out), "--dit-from", str(tmp_path / "nope"),
                    "--stage", "dit", "--dit-steps", "1", "--pool", "2"])
    with pytest.raises(ValueError, match="--dit-from"):  # a file of another model's shapes
        train.main(["--run", str(tmp_path / "run5"), "--vae-from", str(out), "--stage", "dit", "--dit-steps", "1",
                    "--pool", "2", "--dit-from", str(model_file_of_other_shapes(tmp_path))])
    capsys.readouterr()


# --------------------------------------------------------------------------------------------------
# The bundled trained weights: they must exist, reconstruct held-out clips and follow the prompt.


@pytest.fixture(scope="module")
def bundled():
    import i2v_model

    assert i2v_model.BUNDLED, "model/weights/tiny.safetensors is missing (i2v train --export writes it)"
    pipe = I2VPipeline.from_pretrained("tiny")
    assert pipe.pretrained
    return pipe


def _heldout_images(n: int, size: int = 64) -> list:
    source = ClipSource(7, 17, size, split="heldout")
    canvases = [torch.from_numpy(source.image(i)).permute(2, 0, 1).float() / 127.5 - 1 for i in range(n)]
    return canvases, [render_clip(c, Motion("static"), 1, size)[:, 0] for c in canvases]


@pytest.mark.slow
def test_bundled_vae_reconstructs_heldout_clips(bundled):
    from i2v_model.evaluate import psnr

    canvases, _ = _heldout_images(3)
    scores = []
    with torch.no_grad():
        for canvas, kind in zip(canvases, ("pan_left", "zoom_out", "rotate_cw")):
            clip = render_clip(canvas, Motion(kind), 17, 64)
            recon = bundled.vae.decode(bundled.vae.encode(clip[None]), chunk=1)[0].clamp(-1, 1)
            scores.append(psnr(recon, clip))
    assert min(scores) > 25.0 and sum(scores) / len(scores) > 27.0, scores


@pytest.mark.slow
def test_bundled_model_keeps_the_input_as_frame_0(bundled):
    """A held-out image and the bundled sample: a full-length video whose first frame is the input,
    the VAE's own frames (``render=False``) within 25 dB of it."""
    from i2v_model.data import PROMPTS
    from i2v_model.evaluate import psnr
    from i2v_model.io import load_image
    import i2v_model

    _, images = _heldout_images(1)
    for image, kind in zip(images + [load_image(i2v_model.SAMPLE_IMAGE, 64, 64)], ("pan_right", "zoom_in")):
        video, timings = bundled.generate(image, PROMPTS[kind][0], seed=3, steps=4, render=False)
        assert video.shape == (3, 17, 64, 64) and torch.isfinite(video).all()
        assert set(timings) == {"encode", "denoise", "decode", "render"}
        assert psnr(video[:, 0], image) > 25.0


def _eval_set(n: int, size: int) -> list:
    """Held-out pictures as ``i2v eval`` makes them (other seeds than its default)."""
    from i2v_model.cli import _eval_images

    return [image for _, image in _eval_images(n, 5, size, size)]


@pytest.mark.slow
def test_bundled_model_follows_every_camera_prompt(bundled):
    """Every camera motion, on held-out photo-like and procedural pictures in turn, with each prompt's
    second phrasing, scored as ``i2v eval`` scores it: the accumulated frame-to-frame motion points the
    prompt's way on at least 8 of 9, and every video is clean and consistent."""
    from i2v_model.data import PROMPTS
    from i2v_model.evaluate import score_video

    images = _eval_set(2, 96)
    results = []
    for i, kind in enumerate(CAMERA_MOTIONS):
        image = images[i % 2]
        video, _ = bundled.generate(image, PROMPTS[kind][1], seed=i, steps=4)
        results.append((kind, score_video(video, image, kind)))
    assert sum(s.matches for _, s in results) >= 8, [(k, str(s.motion)) for k, s in results if not s.matches]
    assert all(s.clean and s.consistent for _, s in results), [(k, s.hf_ratio, s.consistency) for k, s in results]


@pytest.mark.slow
def test_random_dit_weights_destroy_adherence(bundled):
    """The motion comes from the DiT: the same pipeline with its DiT weights drawn at random (each tensor
    from a normal of its trained mean and std; VAE and text encoder kept) no longer follows the prompts
    that the trained one follows (previous test)."""
    import copy

    from i2v_model.data import PROMPTS
    from i2v_model.evaluate import score_video

    image = _eval_set(1, 64)[0]
    shuffled = copy.deepcopy(bundled)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in shuffled.dit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.std().nan_to_num(0.02) + p.mean())
    shuffled.__dict__["_dit_fn"] = shuffled.dit.predict_motion
    moving = [k for k in CAMERA_MOTIONS if k != "static"]
    found = [score_video(shuffled.generate(image, PROMPTS[k][0], steps=2)[0], image, k) for k in moving]
    assert sum(s.matches for s in found) <= 2, [str(s.motion) for s in found]


@pytest.mark.slow
def test_long_video_chunks_continue_one_latent_stream(bundled, monkeypatch):
    """33 frames = two 17-frame chunks (the VAE's own frames, ``render=False``): the second chunk starts
    from the first one's last latent frame, and the decoder's caches carry over, so the frames are those
    of the two chunks' latents decoded as one video. Starting the second chunk from anything else (here
    the input's latent, as a restart would) changes the second chunk and only it."""
    image = _eval_set(1, 64)[0]
    real, seen = bundled._sample_chunk, []

    def spy(first, *args, **kwargs):
        if seen and swap:
            first = seen[0][0]
        latent, flow, camera = real(first, *args, **kwargs)
        seen.append((first, latent))
        return latent, flow, camera

    monkeypatch.setattr(bundled, "_sample_chunk", spy)
    swap = False
    video = bundled.generate(image, "the camera pans left", frames=33, steps=2, render=False)[0]
    (_, first_latent), (carried, second_latent) = seen
    assert torch.equal(carried, first_latent[:, :, -1:])
    whole = bundled.vae.decode(torch.cat([first_latent, second_latent[:, :, 1:]], dim=2))[0].clamp(-1, 1)
    torch.testing.assert_close(video[:, 1:], whole[:, 1:], atol=1e-4, rtol=0)
    seen.clear()
    swap = True
    restarted = bundled.generate(image, "the camera pans left", frames=33, steps=2, render=False)[0]
    torch.testing.assert_close(restarted[:, :17], video[:, :17], atol=0, rtol=0)
    assert (restarted[:, 17:] - video[:, 17:]).abs().mean() > 0.05


@pytest.mark.slow
def test_long_video_has_no_seams_and_no_drift(bundled):
    """33 rendered frames (two chunks) of a pan and of a zoom out: the first chunk is the 17-frame video
    itself; the motion measured frame to frame over the whole video is the motion the DiT sampled (the
    composed camera maps: scale within 3%, a pan's shift within 10%); content that stays in view keeps
    its brightness (against frame 0 and against one chunk back); the pair of frames across the seam
    changes no more than the other pairs do."""
    from i2v_model.evaluate import matrix_motion, measure_drift

    image = _eval_set(1, 64)[0]
    pan17 = bundled.generate(image, "the camera pans left", steps=3)[0]
    for prompt, kind in (("the camera pans left", "pan_left"), ("zoom out", "zoom_out")):
        video = bundled.generate(image, prompt, frames=33, steps=3)[0]
        assert video.shape == (3, 33, 64, 64) and bundled.camera_maps.shape == (33, 3, 3)
        asked = matrix_motion(bundled.camera_maps[-1], 64, 64)
        d = measure_drift(video, chunk=16)
        assert motion_matches(kind, d.motion, 64) and motion_matches(kind, asked, 64), (str(d.motion), str(asked))
        assert abs(d.motion.scale / asked.scale - 1) < 0.03, (kind, str(d.motion), str(asked))
        assert d.brightness < 0.01 and d.brightness_chunk < 0.01, (kind, d)
        assert d.seam_change < 1.5 and d.seam_psnr > d.other_psnr - 2, (kind, d)
        if kind == "pan_left":
            torch.testing.assert_close(video[:, :17], pan17)
            assert abs(d.motion.dx - asked.dx) < 0.1 * abs(asked.dx), (str(d.motion), str(asked))


# --------------------------------------------------------------------------------------------------
# The renderer and the evaluation's measures (no weights)


def _smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h // 4 + 2, w // 4 + 2, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(-1, 1)


def test_render_pans_the_full_resolution_image():
    """A camera pan of ``a`` latent pixels moves the full-size image by ``8 a`` pixels exactly (bicubic at
    whole pixels), frame 0 is the image itself, and the fill shows only past the image's edge."""
    from i2v_model.render import frame_motion, render, source_grid

    image = _smooth_image(32, 48)
    camera = torch.zeros(3, 6)
    camera[:, 2] = torch.tensor([0.0, 1.0, 2.0])      # content found 1, 2 latent pixels to the right
    flow = torch.zeros(2, 3, 4, 6)
    per_flow, per_camera = frame_motion(flow, camera, 9, 4)
    assert torch.allclose(per_camera[:, 2], torch.arange(9) / 4)     # linear between latent frames
    grid = source_grid(per_flow, per_camera, 32, 48)
    fill = torch.full((3, 9, 4, 6), 0.5)
    video = render(image, grid, fill, match_sigma=0)
    assert video.shape == (3, 9, 32, 48)
    torch.testing.assert_close(video[:, 0], image, atol=1e-5, rtol=0)
    torch.testing.assert_close(video[:, 4, :, :-8], image[:, :, 8:], atol=1e-5, rtol=0)   # 1 latent px = 8 px
    torch.testing.assert_close(video[:, 8, :, :-16], image[:, :, 16:], atol=1e-5, rtol=0)
    torch.testing.assert_close(video[:, 8, :, -12:], torch.full((3, 32, 12), 0.5))          # past the edge + feather
    with pytest.raises(ValueError, match="fill"):
        render(image, grid, fill[:, :3])
    with pytest.raises(ValueError, match="grid"):
        render(image, grid[..., 0], fill)
    with pytest.raises(ValueError, match="camera"):
        frame_motion(flow, camera[:2], 9, 4)
    with pytest.raises(ValueError, match="frames"):
        frame_motion(flow, camera, 13, 4)


def test_render_chunks_compose_into_one_resampling():
    """The camera's maps are exact 3x3 matrices: two chunks' pans composed equal the whole pan, two zooms
    out compose to the product also where the first leaves the frame (a grid sampled there would hold
    its border value), a per-pixel residual is added where the new frame samples it; a zoom of the camera
    head's size is measured by the evaluation's fit as the scale it makes."""
    from i2v_model.evaluate import fit_similarity, motion_of
    from i2v_model.render import camera_matrix, compose, matrix_grid, render, source_grid

    still = torch.zeros(1, 2, 4, 4)
    cam = torch.zeros(1, 6)
    cam[0, 2], cam[0, 5] = 0.75, -0.5
    M = camera_matrix(cam, 4, 4)[0]
    one = source_grid(still, cam, 64, 64)
    torch.testing.assert_close(one, matrix_grid(M[None], 64, 64), atol=1e-6, rtol=0)
    torch.testing.assert_close(compose(M, one), source_grid(still, 2 * cam, 64, 64), atol=1e-5, rtol=0)
    out = torch.zeros(1, 6)
    out[0, 0] = out[0, 4] = 0.6        # zoom out: the frame's edge samples 1.3 half-widths out
    Z = camera_matrix(out, 4, 4)[0]
    twice = compose(Z, source_grid(still, out, 64, 64))
    torch.testing.assert_close(twice, matrix_grid((Z @ Z)[None], 64, 64), atol=1e-5, rtol=0)
    assert twice.abs().max() > 1.6
    residual = torch.zeros(64, 64, 2)
    residual[..., 0] = 0.25
    torch.testing.assert_close(compose(M, one, residual), compose(M, one) + residual, atol=1e-6, rtol=0)
    zoom = torch.zeros(1, 6)
    zoom[0, 0] = zoom[0, 4] = -0.6     # u' = u (1 - 0.6 / 2): the content grows by 1 / 0.7
    image = _smooth_image(96, 96, seed=1)
    frame = render(image, source_grid(still, zoom, 96, 96), torch.zeros(3, 1, 4, 4))[:, 0]
    m = motion_of(fit_similarity(image, frame))
    assert abs(m.scale - 1 / 0.7) < 0.02 and abs(m.dx) < 0.5 and abs(m.angle) < 0.5, str(m)


def test_fill_canvas_keeps_what_came_into_view():
    """A pan in two chunks whose fill is a different flat colour on every frame: ground that came into
    view on frame f keeps frame f's colour on every later frame (it moves with the camera, across the
    chunk seam too), where the canvas-free renderer shows each frame's own fill; two chunks give what
    one call over all the frames gives."""
    from i2v_model.render import FillCanvas, camera_matrix, compose, matrix_grid, render, source_grid

    image = _smooth_image(32, 32, seed=2)
    still = torch.zeros(4, 2, 4, 4)
    cam = torch.zeros(4, 6)
    cam[:, 2] = torch.arange(1, 5.0)                 # frame f of a chunk samples half a width further right
    colours = torch.linspace(-0.8, 0.7, 8)
    fill = colours.view(1, 8, 1, 1).expand(3, 8, 16, 16)
    canvas, so_far, chunks, matrices = FillCanvas(16, 16, extent=6), torch.eye(3, dtype=torch.float64), [], []
    for c in range(2):
        mats = so_far @ camera_matrix(cam, 4, 4)
        grids = compose(so_far, source_grid(still, cam, 32, 32))
        chunks.append(render(image, grids, fill[:, 4 * c:4 * c + 4], canvas=canvas, matrix=mats, match_sigma=0))
        matrices.append(mats)
        so_far = mats[-1]
    video = torch.cat(chunks, 1)                     # frame f (1..8) shows source x in [f / 2 - 1, f / 2 + 1]
    centres = (2 * torch.arange(32) + 1) / 32 - 1

    def shows(f: int, lo: float, hi: float) -> torch.Tensor:
        """Frame ``f``'s pixels (all rows) at source x in (lo, hi)."""
        x = centres + f / 2
        return video[:, f - 1, :, (x > lo) & (x < hi)]

    # Source x in (2.2, 2.45) first comes into view on frame 3 (frame 2 painted up to 2 + 1/8); on
    # frames 4, 5 (the next chunk) and 6 it has moved left and still shows frame 3's colour.
    for f in (3, 4, 5, 6):
        region = shows(f, 2.2, 2.45)
        assert region.numel() > 0
        torch.testing.assert_close(region, torch.full_like(region, colours[2].item()), atol=1e-5, rtol=0,
                                   msg=f"frame {f}")
    region = shows(8, 4.2, 4.45)                     # first shown on frame 7
    torch.testing.assert_close(region, torch.full_like(region, colours[6].item()), atol=1e-5, rtol=0)
    mats = torch.cat(matrices)
    grids = matrix_grid(mats, 32, 32)
    whole = render(image, grids, fill, canvas=FillCanvas(16, 16, extent=6), matrix=mats, match_sigma=0)
    torch.testing.assert_close(whole, video, atol=1e-5, rtol=0)
    plain = render(image, grids, fill, match_sigma=0)          # no canvas: frame 8 shows its own colour
    assert (plain[:, 7] - colours[7]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="matrix"):
        render(image, grids, fill, canvas=FillCanvas(16, 16))


def test_fill_colours_are_matched_to_what_the_frame_shows():
    """A fill whose colours are off by a constant is brought back onto the content it continues, also
    where the frame shows none of it (the offset is carried from where it does)."""
    from i2v_model.render import colour_offset

    shown = _smooth_image(16, 16, seed=3)[None]
    fill = shown + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)
    weight = torch.zeros(1, 1, 16, 16)
    weight[..., :6] = 1.0                                       # the frame shows content on the left only
    offset = colour_offset(fill, shown, weight, 3.0)
    torch.testing.assert_close(fill + offset, shown, atol=1e-5, rtol=0)
    torch.testing.assert_close(colour_offset(fill, shown, torch.zeros_like(weight), 3.0), torch.zeros_like(fill))


def test_video_scores_on_known_motion_and_on_noise():
    """Clips filmed with a known camera motion score right on motion and consistency; a texture that stays put
    scores 0% adherence on every moving prompt; frames of fresh noise are not tracked, noise added to
    later frames fails cleanliness, and a flicker fails consistency."""
    from i2v_model.evaluate import score_video

    canvas = torch.from_numpy(ClipSource(3, 17, 96, split="heldout").image(0)).permute(2, 0, 1).float() / 127.5 - 1
    truth = {"pan_right": ("dx", -24.0), "pan_left": ("dx", 24.0), "tilt_up": ("dy", 24.0), "tilt_down": ("dy", -24.0),
             "zoom_in": ("scale", 1.5), "zoom_out": ("scale", 1 / 1.5), "rotate_cw": ("angle", 20.0),
             "rotate_ccw": ("angle", -20.0), "static": ("dx", 0.0)}
    for kind, (field, value) in truth.items():
        clip = render_clip(canvas, Motion(kind, speed=3.0, zoom=1.5, angle=20.0), 9, 96)
        s = score_video(clip, clip[:, 0], kind)
        # (Not s.clean: real footage can bring busier texture into view, and a zoom out shrinks it.)
        assert s.matches and s.consistent and s.first_psnr == float("inf"), (kind, str(s.motion))
        assert abs(getattr(s.motion, field) - value) < 0.03 * max(abs(value), 1) + 0.3, (kind, str(s.motion))
    g = torch.Generator().manual_seed(0)
    still_noise = (torch.rand(3, 1, 96, 96, generator=g) * 2 - 1).expand(3, 9, 96, 96)
    moving = [k for k in CAMERA_MOTIONS if k != "static"]
    assert sum(score_video(still_noise, still_noise[:, 0], k).matches for k in moving) == 0
    fresh = torch.rand(3, 9, 96, 96, generator=g) * 2 - 1
    assert not score_video(fresh, fresh[:, 0], "static").tracked
    clip = render_clip(canvas, Motion("pan_left", speed=3.0), 9, 96)
    noisy = torch.cat([clip[:, :1], clip[:, 1:] + 0.1 * torch.randn(3, 8, 96, 96, generator=g)], dim=1)
    assert not score_video(noisy, clip[:, 0], "pan_left").clean
    flicker = clip * torch.tensor([1.0, 0.6] * 4 + [1.0]).view(1, 9, 1, 1)
    assert not score_video(flicker, clip[:, 0], "pan_left").consistent
    with pytest.raises(ValueError, match="video"):
        score_video(clip[:, :1], clip[:, 0], "pan_left")
    with pytest.raises(ValueError, match="image"):
        score_video(clip, clip[:, 0, :8], "pan_left")
