"""The WAN worker: settings, jobs, generation, the bridge and the command line."""

#: The project's version (pyproject.toml says the same; a test keeps them equal).
__version__ = "0.1.0"
