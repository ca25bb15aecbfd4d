"""A `Plan` for people (a table) and for programs (JSON, every field of the dataclass)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from tokenmill.plan.planner import Plan


def plan_json(plan: Plan) -> dict[str, Any]:
    return asdict(plan)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f} s"


def _bytes(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in sorted(counts.items(), key=lambda kv: -kv[1]))


def format_table(plan: Plan) -> str:
    calibration = plan.calibration
    rows = [
        ("lines", f"{plan.lines:,}" + (f"  ({_counts(plan.lines_by_endpoint)})" if plan.lines_by_endpoint else "")),
        ("error lines", f"{plan.error_lines:,}" + (f"  ({_counts(plan.error_codes)})" if plan.error_codes else "")),
        ("prompt tokens", f"{plan.prompt_tokens:,}  per line: p50 {plan.prompt_tokens_p50:,}, "
                          f"p95 {plan.prompt_tokens_p95:,}, max {plan.prompt_tokens_max:,}"),
        ("n > 1", f"{plan.lines_with_n_above_1:,} lines, {plan.samples_of_n_above_1:,} samples"),
        ("output tokens", f"estimated {plan.estimated_output_tokens:,}; max_tokens ask {plan.requested_output_tokens:,}"
                          + (f" ({plan.requests_without_max_tokens:,} requests set none)"
                             if plan.requests_without_max_tokens else "")
                          + f"; the context allows {plan.context_allowed_output_tokens:,}"),
        ("prefix cache", f"saves {plan.estimated_cached_prompt_tokens:,} prompt tokens "
                         f"({plan.estimated_prefix_cache_hit_rate:.1%}) in prefix order, "
                         f"{plan.input_order_cached_prompt_tokens:,} ({plan.input_order_prefix_cache_hit_rate:.1%}) "
                         "with --input-order"),
        *(("shared prefix", f"{p.tokens:,} tokens x {p.prompts:,} prompts, starting {p.starts_with!r}")
          for p in plan.shared_prefixes),
        ("time", f"~{_duration(plan.estimated_seconds)} after the model loads"
                 + (f" ({plan.model_load_seconds:.1f} s here)" if plan.model_load_seconds is not None else "")
                 + f"; {plan.estimated_output_tokens_per_s:,.0f} output tok/s, "
                   f"{plan.estimated_total_tokens_per_s:,.0f} total tok/s"),
        ("KV memory", f"peak {_bytes(plan.peak_kv_bytes)} of a {_bytes(plan.kv_pool_bytes)} pool"),
        ("this machine", f"prompt {plan.prompt_tokens_per_s:,.0f} tok/s, decode {plan.decode_tokens_per_s:,.0f} tok/s "
                         f"at the job's batch ({calibration.threads} threads, {calibration.cpu}); calibration "
                         + ("measured now" if calibration.ran_engine else "from the cache")
                         + f" ({calibration.sample_lines} sample lines, {calibration.timed_steps} timed steps)"),
    ]
    if plan.ray is not None:
        ray = plan.ray
        threads = f"{ray.threads_per_replica} thread{'s' if ray.threads_per_replica > 1 else ''}"
        rows.append((f"ray x{ray.replicas}", f"~{_duration(ray.estimated_seconds)} ({threads} a replica, the model "
                                              f"loads included, Ray's own start-up not); "
                                              f"{ray.estimated_total_tokens_per_s:,.0f} total tok/s, prefix cache "
                                              f"{ray.estimated_prefix_cache_hit_rate:.1%}, KV peak "
                                              f"{_bytes(ray.peak_kv_bytes_per_replica)} a replica"))
    width = max(len(name) for name, _ in rows)
    lines = [f"tokenmill plan: {plan.input} on {plan.model}", *(f"  {name:<{width}}  {value}" for name, value in rows)]
    if plan.first_errors:
        lines.append(f"  first error records, as tokenmill run writes them ({len(plan.first_errors)} of "
                     f"{plan.error_lines:,}):")
        lines += [f"    {json.dumps(record, ensure_ascii=False)}" for record in plan.first_errors]
    return "\n".join(lines)
