"""The benchmark runner: many (dataset, task, model, seed) jobs, resumable."""
