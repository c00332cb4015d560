"""On-disk formats, one codec each: files and JSON, images, lineage hashes, the calibration set, the quantizer
state (qmap + safetensors), the export folder, reconstruction recordings, and the stages' metrics."""
