"""PQD: time-aware post-training quantization of diffusers diffusion models.

Layers, from the bottom (imports only point down): ``errors`` and ``params`` -> ``core`` (pure torch) ->
``diffusion`` (diffusers knowledge) -> ``formats`` / ``deploy`` / ``eval`` -> ``stages`` -> ``ops`` and
``bench``; the Prefect flows (``flows/``) sit on top. What a user calls from Python is in :mod:`pqd.api`.
"""

__version__ = "0.1.0"

