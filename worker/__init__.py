"""The WAN worker: settings, jobs, generation, the bridge and the command line."""
