"""Cell harness: spec, workloads, metrics, result schema and the `run-cell` entry point."""
