"""The benchmark runner: many (dataset, task, scenario, model, seed) jobs, resumable."""

from pertbench.benchmark.config import BenchmarkConfig, load_config
from pertbench.benchmark.runner import BenchmarkResult, run_benchmark

__all__ = ["BenchmarkConfig", "BenchmarkResult", "load_config", "run_benchmark"]
