"""localllm benchmarks: run them all with ``.venv/bin/python -m bench.run`` (see bench/README.md)."""
