"""Static dispatch defaults: what ``auto`` runs when it may not measure (``I2V_KERNELS_TUNE=0``,
``torch.compile`` tracing, CUDA-graph capture) and has no cached decision for the key.

Each entry is ``(op, device type, dtype, flags, sizes, backend)`` with the flags and sizes of the op's
``dispatch_features``; a call takes the entry with equal op, device type, dtype and flags whose sizes
are nearest (log2 distance, within a factor of 8 in all); with none near, ``native`` runs.

Source: the first H200 run (shared/gpu-results/h200-2026-12-04: bench_attention, bench_adaln and
bench_conv3d; torch 2.11, triton 3.6), transcribed from its tables: spatial, dense and cross attention
lost to SDPA at every shape (so ``native``), Triton temporal attention won at T <= 32 and lost at
T = 49, the CUDA adaLN kernels beat the Triton ones and eager at every row, and the CUDA causal conv3d
was 0.95-0.98x of ``cat`` + cuDNN (so ``native``). Regenerate from newer results files with
``python -m benchmarks.make_dispatch_table``.
"""

_ATTN = (0, 0, "none", "none")  # non-causal, no kv_lens, no QK-norm, no RoPE

TABLE = [
    # spatial attention [B, T, S, H, D]: sizes (B*T*H, S, S, D)
    ("spatial_attention", "cuda", "bfloat16", _ATTN, (512, 256, 256, 72), "native"),
    ("spatial_attention", "cuda", "bfloat16", _ATTN, (1248, 1350, 1350, 64), "native"),
    ("spatial_attention", "cuda", "bfloat16", _ATTN, (840, 1560, 1560, 128), "native"),
    ("spatial_attention", "cuda", "bfloat16", _ATTN, (64, 1024, 1024, 64), "native"),
    ("spatial_attention", "cuda", "bfloat16", _ATTN, (64, 4096, 4096, 128), "native"),
    # temporal attention: sizes (B*S*H, T, T, D)
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (8192, 16, 16, 72), "triton"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (129600, 13, 13, 64), "triton"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (62400, 21, 21, 128), "triton"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (65536, 8, 8, 64), "triton"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (65536, 16, 16, 64), "triton"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (65536, 32, 32, 64), "triton"),
    ("temporal_attention", "cuda", "bfloat16", _ATTN, (65536, 49, 49, 64), "native"),
    # dense / cross attention: sizes (B*H, N, M, D)
    ("attention", "cuda", "bfloat16", _ATTN, (32, 4096, 4096, 72), "native"),
    ("attention", "cuda", "bfloat16", _ATTN, (96, 17550, 17550, 64), "native"),
    ("attention", "cuda", "bfloat16", _ATTN, (32, 4096, 120, 72), "native"),
    ("attention", "cuda", "bfloat16", _ATTN, (96, 17550, 226, 64), "native"),
    ("attention", "cuda", "bfloat16", _ATTN, (40, 32760, 512, 128), "native"),
    # adaLN family [rows, C]: sizes (rows, C)
    ("adaln_modulate", "cuda", "bfloat16", ("sample",), (35100, 3072), "cuda"),
    ("adaln_modulate", "cuda", "bfloat16", ("frame",), (35100, 3072), "cuda"),
    ("gated_residual_adaln", "cuda", "bfloat16", ("sample",), (35100, 3072), "cuda"),
    ("gated_residual", "cuda", "bfloat16", ("sample",), (35100, 3072), "cuda"),
    ("rms_norm", "cuda", "bfloat16", ("none",), (35100, 3072), "cuda"),
]
