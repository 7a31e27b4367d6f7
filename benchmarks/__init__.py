"""jaxce benchmarks: ``python -m benchmarks --help``; figures: ``python -m benchmarks.plots``."""
