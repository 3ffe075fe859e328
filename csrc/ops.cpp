// Every schema of the i2v_kernels namespace lives here; kernels register per dispatch key in the
// family folders (TORCH_LIBRARY_IMPL(i2v_kernels, CPU|CUDA, m)). Importing i2v_kernels._C loads this
// library, which runs the registrations; the Python module itself is empty.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "i2v-kernels C++/CUDA kernels (registered as torch.ops.i2v_kernels.*)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(i2v_kernels, m) {
  // Fused adaLN forward, one row of C channels at a time (x: [..., C]):
  //   r   = x + gate * y                        (y given; gate optional, 1 when absent)
  //   out = r                                   norm == 0 (gated residual)
  //   out = modulate(affine(layer_norm(r)))     norm == 1
  //   out = modulate(affine(rms_norm(r)))       norm == 2
  // with affine(n) = n * weight + bias and modulate(n) = n * (1 + scale) + shift, each term only when
  // its tensor is given. y, gate, shift, scale come expanded to x's shape (stride-0 views, never
  // materialized); weight and bias are [C]. Statistics in fp32 (fp64 for double). `residual` is r in
  // x's dtype when y is given and norm != 0, else an empty tensor.
  m.def(
      "_adaln_fwd(Tensor x, Tensor? y, Tensor? gate, Tensor? shift, Tensor? scale, Tensor? weight, "
      "Tensor? bias, int norm, float eps) -> (Tensor out, Tensor residual)");
  // QK-norm + RoPE forward (CPU and CUDA), one head vector of D elements a row (q, k: [..., D]):
  //   y = rope(affine(norm(x)))  for x = q (with q_weight, q_bias) and x = k (k_weight, k_bias)
  // norm 0 none, 1 LayerNorm, 2 RMSNorm over D; affine(n) = n * weight + bias, each when given;
  // rope(n) = n * cos + rotate(n) * sin when cos/sin are given, pairs (x[2i], x[2i + 1]) or, with
  // half_style, (x[i], x[i + D/2]); rotate = (-b, a) per pair. q, k (one shape and dtype, unit stride
  // on D, any other strides) and cos/sin (q's shape: the table expanded over heads, stride-0 views,
  // one set of strides) are row-strided; weights/biases are [D]. The side tensors share one dtype,
  // q's or float32. Math in fp32; outputs contiguous in q's dtype. D <= 256.
  m.def(
      "_qk_norm_rope_fwd(Tensor q, Tensor k, Tensor? q_weight, Tensor? q_bias, Tensor? k_weight, Tensor? k_bias, "
      "Tensor? cos, Tensor? sin, int norm, float eps, bool half_style) -> (Tensor q_out, Tensor k_out)");
  // Temporal attention (CUDA and CPU): q, k, v [B, T, S, H, D] with unit stride on D, any other
  // strides; each (b, s, h) attends across its T frames; softmax(q k^T * scale) v in fp32 (fp64 for
  // fp64 on the CPU); out contiguous. The CPU kernel applies the non-finite rule of
  // i2v_kernels/ops/attention/semantics.py itself.
  m.def("_temporal_attention_fwd(Tensor q, Tensor k, Tensor v, float scale, bool causal) -> Tensor");
  // Attention through ATen's CPU flash kernel (CPU only) when q, k, v [batch, H, seq, D] (unit stride
  // on D) hold no NaN or infinity; bias is the kernel's additive mask in q's dtype, or None. Returns
  // the kernel's output, or None (the kernel not run) when an input is not finite, for the caller to
  // run the non-finite rule's full path.
  m.def("_sdpa_cpu_checked(Tensor q, Tensor k, Tensor v, Tensor? bias, bool causal, float scale) -> Tensor?");
  // Causal 3D convolution forward (CPU and CUDA; ATen convolution, cuDNN on CUDA): x [B, Cin, T, H, W],
  // weight [Cout, Cin, kt, kh, kw]; x is padded in front in time by P = (kt - 1) * dilation_t frames --
  // `cache` [B, Cin, P, H, W] when given, else the first frame repeated (time_pad == 0, "replicate") or
  // zeros (time_pad == 1, "zeros") -- and symmetrically in space by dilation * (k - 1) // 2 zeros; plus
  // bias [Cout] and residual [B, Cout, T_out, H_out, W_out] when given. Math in x's dtype on CUDA, fp32
  // for fp16/bf16 on CPU (as the reference). Output in x's dtype, channels_last_3d memory format.
  m.def(
      "_causal_conv3d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? cache, Tensor? residual, int[] stride, "
      "int[] dilation, int time_pad) -> Tensor");
}
