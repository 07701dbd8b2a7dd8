"""Real models and data used by tests, benchmarks and evaluation tasks (all offline, from installed packages)."""
