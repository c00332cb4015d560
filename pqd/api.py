"""The library's entry points for users, in one place (each lives in its layer):

- :func:`load_pipeline`: an export folder as a diffusers pipeline whose denoiser (UNet or transformer) is the quantized
  one: simulated in torch, or the deployed ONNX graphs in onnxruntime or OpenVINO (``runtime=``);
- :func:`load_deployed_denoiser`: the export's deployed ONNX graphs, run by onnxruntime or OpenVINO;
- :func:`load_sampler`: a registered release (``models:/<name>@<alias>``), verified, ready to sample;
- :class:`Sampler`: the same from an export folder and its sampling protocol file.
"""

from pqd.deploy import load_deployed_denoiser
from pqd.deploy.runtime import load_pipeline
from pqd.ops.serving import Sampler
from pqd.ops.tracking import load_sampler

__all__ = ["Sampler", "load_deployed_denoiser", "load_pipeline", "load_sampler"]
