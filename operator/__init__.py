"""genq's operator: reconciliation beside the job flow, never in its hot path.

- Housekeeping (retention, deadlines, lost and unpublished jobs) lives in
  :mod:`genq.housekeeping`, since ``genq up`` runs it with no operator; a cluster's
  ``genq operator`` runs it under its leader election.
- :mod:`.resources`, :mod:`.scaling`, :mod:`.conditions` — pure functions: the worker
  Deployment of a ToolPool, the replicas it should have, its status conditions.
- :mod:`.backlog` — a ToolPool's JetStream backlog and warm requests.
- :mod:`.handlers` — the kopf handlers (the only module here that imports kopf and the
  Kubernetes client), started by ``genq operator`` through ``lead_and_operate()``.

Neighbours: the ports and adapters only; never the API or the worker.
"""
