"""genq on Kubernetes: jobs as GenerationJobs, API keys as Secrets, tools as ToolPools.

One module per concern (as kopf's ``_cogs/clients``):

- :mod:`.mapping` — Job ↔ GenerationJob, pure functions (no client, no I/O);
- :mod:`.cache` — every job of the namespace in memory, fed by a watch, with indexes;
- :mod:`.store` — :class:`KubernetesStore`, the ``JobStore`` (compare-and-set writes);
- :mod:`.keys` — :class:`KubernetesKeyStore`, the ``KeyStore``;
- :mod:`.toolpools` — :class:`ToolPoolRegistry`, the tools from the namespace's ToolPools;
- :mod:`.client` — the one way to reach the apiserver, shared with the operator.

Neighbours: :mod:`genq.ports` (what these implement), :mod:`genq.constants` (the names
they write), :mod:`genq.conditions` (status conditions), ``genq.runtime`` (builds them).
"""

from genq.adapters.kubernetes.keys import KubernetesKeyStore
from genq.adapters.kubernetes.mapping import job_status, job_to_resource, queue_sequence, resource_name, resource_to_job
from genq.adapters.kubernetes.store import KubernetesStore
from genq.adapters.kubernetes.toolpools import ToolPoolRegistry

__all__ = [
    "KubernetesKeyStore", "KubernetesStore", "ToolPoolRegistry",
    "job_status", "job_to_resource", "queue_sequence", "resource_name", "resource_to_job",
]
