"""Pipeline stages: each module has run(...) -> metrics and a short main() used by dvc.yaml."""
