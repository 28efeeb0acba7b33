"""Every route the proxy forwards by ``model``: its path, its dialect, and which backends serve it.

One table, so that a new route is one line, and the README's route table can be checked against it.
``Dialect.ANTHROPIC`` routes answer errors in Anthropic's shape; the others in OpenAI's. A route
a model's backend does not serve is refused before the model is loaded, naming the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from supervisor.core.errors import RouteNotServed

LLAMACPP = frozenset({"llamacpp"})
BOTH = frozenset({"llamacpp", "ollama"})


class Dialect(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


@dataclass(frozen=True)
class Route:
    path: str
    what: str  # for people: the README's route table says the same
    backends: frozenset[str] = LLAMACPP
    dialect: Dialect = Dialect.OPENAI
    chat_chunks: bool = False  # its stream is OpenAI chat chunks (a loading model can be shown as reasoning)


MODEL_ROUTES = (
    Route("/v1/chat/completions", "OpenAI chat", BOTH, chat_chunks=True),
    Route("/v1/completions", "OpenAI text completion", BOTH),
    Route("/v1/embeddings", "OpenAI embeddings", BOTH),
    Route("/v1/responses", "OpenAI Responses", BOTH),
    Route("/v1/responses/input_tokens", "count a Responses request's input tokens"),
    Route("/v1/chat/completions/input_tokens", "count a chat request's input tokens"),
    Route("/v1/messages", "Anthropic Messages", BOTH, Dialect.ANTHROPIC),
    Route("/v1/messages/count_tokens", "count an Anthropic Messages request's tokens", dialect=Dialect.ANTHROPIC),
    Route("/v1/rerank", "rerank documents (a model started with --reranking)"),
    Route("/v1/reranking", "rerank (another spelling)"),
    Route("/rerank", "rerank (another spelling)"),
    Route("/reranking", "rerank (another spelling)"),
    Route("/infill", "fill in the middle (code completion: llama.vscode)"),
    Route("/tokenize", "text to tokens"),
    Route("/detokenize", "tokens to text"),
    Route("/apply-template", "a chat rendered by the model's template, not generated"),
)
ROUTES_BY_PATH = {route.path: route for route in MODEL_ROUTES}


def dialect_of(path: str) -> Dialect:
    route = ROUTES_BY_PATH.get(path)
    return route.dialect if route is not None else Dialect.OPENAI


def check_served(route: Route, model: str, backend: str) -> None:
    if backend not in route.backends:
        served = ", ".join(sorted(route.backends))
        raise RouteNotServed(
            f"{route.path} is not served by model '{model}': its backend, {backend}, has no such route "
            f"(it is served by {served} models)"
        )
