"""Real adapters behind the ports in :mod:`genq.ports`."""
