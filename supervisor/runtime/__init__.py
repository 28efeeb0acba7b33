"""The I/O edges: the container engine, the model servers' HTTP APIs, the host's hardware, GGUF files."""
