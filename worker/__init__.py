"""The WAN worker by concern: jobs/, flow/, generation/, api/, observe/, local/ (README "Layout").

The root holds what every layer uses and imports no room (settings, errors, devices, clock,
model files, test faults), and the entry points that may import any: __main__ and cli.
"""

#: The project's version (pyproject.toml says the same; a test keeps them equal).
__version__ = "0.1.0"
