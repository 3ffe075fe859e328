"""i2v_model: the reference DiT image-to-video model built on i2v_kernels.

* :mod:`i2v_model.config` -- dataclass configs and the named registry (``tiny``, ``*-like`` shapes);
* :mod:`i2v_model.vae`, :mod:`i2v_model.dit`, :mod:`i2v_model.text` -- the three networks;
* :mod:`i2v_model.sampler` -- rectified-flow loss and Euler sampler with classifier-free guidance;
* :mod:`i2v_model.pipeline` -- image + prompt -> video; :mod:`i2v_model.io` -- images in, MP4/GIF out;
* :mod:`i2v_model.data`, :mod:`i2v_model.train` -- procedural training clips and the training loop;
* :mod:`i2v_model.cli` -- the ``i2v`` command (``generate``, ``eval``, ``train``, ``info``).

``BUNDLED`` is True when the trained ``tiny`` weights ship with the package.
"""

from pathlib import Path

__all__ = ["BUNDLED", "SAMPLE_IMAGE"]

BUNDLED = (Path(__file__).parent / "weights" / "tiny.safetensors").is_file()
SAMPLE_IMAGE = Path(__file__).parent / "assets" / "landscape.png"
