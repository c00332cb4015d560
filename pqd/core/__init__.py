"""Pure-torch quantization core: no file I/O, no diffusers, no mlflow.

Import from the module that defines a name: this package imports nothing, so a part of the product that needs
only time groups (the sampler) does not load, or depend on, the rest.
"""
