"""Operations on finished results: reading them (result), lineage tags, MLflow tracking (the only mlflow
import), the release gate and registry, the sampler a release loads (serving), the audit, the report."""
