"""Scale-out on Ray (`pip install "tokenmill[ray]"`): one batch job across a cluster's replicas."""

from tokenmill.ray.job import RayJobSummary, run_batch

__all__ = ["RayJobSummary", "run_batch"]
