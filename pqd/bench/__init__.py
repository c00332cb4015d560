"""Benchmarks: ``make bench`` (methods x bits and ablations: :mod:`pqd.bench.methods`, run as
``python -m pqd.bench``), ``make bench-deploy`` (:mod:`pqd.bench.deploy`) and ``make bench-memory``
(:mod:`pqd.bench.memory`)."""
