"""Benchmarks: ``make bench`` (methods x bits and ablations as DVC experiments: the plan in :mod:`pqd.bench.plan`, the
tables in :mod:`pqd.bench.report`, run by :mod:`flows.bench`), ``make bench-deploy`` (:mod:`pqd.bench.deploy`) and
``make bench-memory`` (:mod:`pqd.bench.memory`). pqd.bench is a client of pqd.ops (results, the release gate)."""
