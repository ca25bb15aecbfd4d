"""`tokenmill plan`: a batch job known before it runs.

Given the input file and the engine `tokenmill run` would use, `plan_job` returns a `Plan`: the
error records the run would write (validated by the same code), the job's counts, the prompt
tokens the prefix cache would save (in prefix order and in input order) and the largest shared
prefixes, and the run's wall time, tokens/s and peak KV memory, locally and on Ray with N
replicas. Estimates come from simulating the whole job on the engine's own scheduler and KV cache
with steps priced by a model of this machine, calibrated on a small sample of the job's lines and
cached (planner.py says how; docs/PERFORMANCE.md how close they come).
"""

from tokenmill.plan.calibration_cache import CalibrationCache
from tokenmill.plan.planner import Plan, RayPlan, plan_job
from tokenmill.plan.report import format_table, plan_json

__all__ = ["CalibrationCache", "Plan", "RayPlan", "format_table", "plan_job", "plan_json"]
