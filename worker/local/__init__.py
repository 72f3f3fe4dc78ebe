"""Local runs: the demo, the platform stand-in, the local stack and the tiny models.

Beside the entry points, may import any room; used by `make demo`, tests and benchmarks only.
"""
