"""``python -m pqd.bench``: the methods benchmark (see :mod:`pqd.bench.methods`)."""

from pqd.bench.methods import main

raise SystemExit(main())
