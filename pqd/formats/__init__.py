"""On-disk formats, one codec each: files and JSON, images, lineage hashes, the calibration set, the quantizer
state (qmap + safetensors), the pipeline folder's layout, the export folder, reconstruction recordings, and the
stages' metrics. Codecs only: the loaders that rebuild networks from these folders are in pqd.diffusion."""
