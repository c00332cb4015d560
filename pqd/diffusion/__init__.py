"""diffusers-specific code: loading pipelines, sampling, architecture knowledge."""
