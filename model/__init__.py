"""i2v_model: the reference DiT image-to-video model built on i2v_kernels.

Placeholder: the model, its trained weights and the `i2v` CLI arrive with the model issue.
"""

BUNDLED = False
