"""Developer tools that run without a GPU: the ahead-of-time Triton compile check and the static
resource report of every kernel (``python -m i2v_kernels.tools.static_report``)."""
