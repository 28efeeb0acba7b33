"""The HTTP faces: the OpenAI/Ollama proxy and the control API, their metrics and their errors."""
