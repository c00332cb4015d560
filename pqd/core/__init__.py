"""Pure-torch quantization core: no file I/O, no diffusers, no mlflow.

Modules, from the bottom: ``qtypes`` (integer grids), ``affine`` (quantize / dequantize math), ``packing``
(4-bit storage), ``timegroups`` (time groups and selecting them), ``observers``, ``guards`` (numerical
checks), ``onnx_qdq`` (Q/DQ steps that trace into ONNX), ``adaround``, ``modules`` (quantized layers),
``quantize`` (fit / apply / read a QState), ``reconstruct`` (block reconstruction). Import from the
module that defines a name: this package imports nothing, so a part of the product that needs only time
groups (the sampler) does not load, or depend on, the rest.
"""
