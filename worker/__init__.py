"""genq's worker: pulls a tool's jobs from the bus, runs the tool, reports status.

Neighbours: it reads ports (:mod:`genq.ports`) only; the API and the operator never import it.
"""
