"""localllm: a supervisor for local LLM servers in Docker. See DESIGN.md beside this file."""

__version__ = "0.1.0"
