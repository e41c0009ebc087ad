"""genq's reconciler: retention, deadlines, lost and unpublished jobs.

``genq up`` runs :class:`~genq.operator.housekeeping.Housekeeper` in-process; the kopf
operator (cluster mode) calls the same decisions. Neighbours: the ports only; never in the
hot path of a job.
"""
