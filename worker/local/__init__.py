"""Local-run tooling: the demo, the platform stand-in, the local stack and the tiny models.

Used by `make demo`, the tests and the benchmarks; never imported by production processes.
"""
