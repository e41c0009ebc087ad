"""genq: GPU generation tools as queued jobs behind one REST API.

The shared domain lives here (job and tool models, ports, adapters, settings, constants);
the three deployables live in ``genq.api``, ``genq.worker`` and ``genq.operator``.
"""

__version__ = "0.1.0"
