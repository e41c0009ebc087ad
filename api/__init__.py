"""genq's REST API v1 (SPEC §3): a thin FastAPI front door.

It checks and authenticates each job, stores its inputs in object storage, records the job
in the store and publishes it on the bus. Neighbours: the ports in :mod:`genq.ports`; it
never imports the worker or the operator.
"""

from genq.api.app import create_app

__all__ = ["create_app"]
