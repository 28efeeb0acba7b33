"""Writing small, valid GGUF models with random weights.

They let a CPU-only or offline host (and the test suite) run a real
llama-server: the text is noise, but loading, tokens, timings and the
metadata a memory estimator reads are all real. ``localllmctl model
generate`` is the command; ``blocks`` and ``embedding`` scale the file.

Three kinds (``kind=``, ``--kind``):

``chat``
    The default: a llama-architecture model with no chat template (llama-server
    falls back to its built-in one). Its bytes depend only on the shape, seed
    and name.
``reranker``
    A Qwen3-Reranker-shaped model for llama-server ``--reranking`` (``/v1/rerank``):
    architecture ``qwen3`` (a llama with per-head Q/K norms, ``blk.N.attn_q_norm``
    and ``blk.N.attn_k_norm``, which it requires), ``qwen3.pooling_type = 4`` (RANK),
    ``qwen3.classifier.output_labels = ["yes", "no"]`` (two outputs), the
    classification head ``cls.output.weight`` (2 x embedding), and the prompt
    ``tokenizer.chat_template.rerank`` with ``{query}`` and ``{document}``. llama.cpp
    loads ``cls.output`` only for the bert family and qwen3/qwen3vl (a llama file
    carrying it fails to load: one tensor too many), reads the last token's state
    through it and, for qwen3, takes a softmax: the score is P("yes"), in (0, 1).
``tools``
    A llama model for tool use. Its ``tokenizer.chat_template`` has Qwen2.5's
    (Hermes 2 Pro's) layout: tools listed in ``<tools>``, each call as
    ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, results as
    ``<tool_response>``. llama-server's jinja engine (on by default in this build)
    derives a tool-call parser and grammar from it, for ``/v1/chat/completions``,
    ``/v1/responses`` and ``/v1/messages`` alike. The markers are tokens of their own,
    appended after the words so that other token ids stay put: ``<|im_start|>``,
    ``<|im_end|>`` (control; llama.cpp takes it as end of turn), ``<tool_call>`` and
    ``</tool_call>`` (user-defined); the space prefix is off, so the grammar sees the
    tokens the prompt has. The grammar of a required call still admits free text
    before it, which random weights fill until ``max_tokens``; so a few embedding
    dimensions are designed (``STEERING``): the model ends its turn when it may,
    else opens a call, closes it after the arguments, and ends strings at once.
    With ``tool_choice`` ``"required"`` (Anthropic: ``any`` or ``tool``) the answer
    is one well-formed call; otherwise it is empty. Tied embeddings are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
WORDS = [
    "hello",
    "world",
    "the",
    "a",
    "model",
    "local",
    "llm",
    "ok",
    "yes",
    "no",
    "▁hello",
    "▁world",
    "▁the",
    "▁a",
    "▁is",
    "▁ok",
    "▁yes",
    "▁no",
    "▁model",
    "▁test",
    "▁local",
    "▁llm",
    "▁chat",
    "▁answer",
    "▁question",
    "▁ping",
    "▁pong",
    "▁data",
    "▁one",
    "▁two",
    "▁three",
    "▁four",
    "▁five",
    "▁six",
    "▁seven",
    "▁eight",
    "▁nine",
    "▁ten",
    "▁red",
    "▁blue",
    "▁green",
    "▁cat",
    "▁dog",
    "▁sun",
    "▁moon",
    "▁sky",
    "▁tree",
    "▁rock",
    "▁fish",
    "▁bird",
    "▁car",
    "▁road",
]


KINDS = ("chat", "reranker", "tools")

# With ``fim``: the keys llama.cpp reads its fill-in-the-middle tokens from, and the words named so.
FIM_KEYS = ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id")
FIM_WORDS = ("▁model", "▁test", "▁local")

# The tokens the tool template's markers get (kind "tools"), appended after the words: (text, type name).
TOOL_TOKENS = (
    ("<|im_start|>", "CONTROL"),
    ("<|im_end|>", "CONTROL"),
    ("<tool_call>", "USER_DEFINED"),
    ("</tool_call>", "USER_DEFINED"),
)

# Qwen2.5's tool-use layout (Hermes 2 Pro's): llama.cpp's autoparser reads the call format off the template
# by rendering it with and without tool calls (common/chat.cpp: common_chat_templates_apply_jinja).
TOOL_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + (tool | tojson) }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within ' }}
    {{- '<tool_call></tool_call> XML tags:\\n<tool_call>{"name": <function-name>, "arguments": <args-json-object>}' }}
    {{- '</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>{"name": "' + tool_call.name + '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# The "tools" kind's designed features (the rest is random). Each is an embedding dimension that only some
# tokens set, that no layer writes (that row of every attn_output and ffn_down is zero), so it passes the
# residual stream untouched from the current token to the output head, which reads it as a preference for
# the next token:
#   - after a line break or </tool_call>: end the turn (<|im_end|>), else open a call (<tool_call>);
#   - after "}": close the call (</tool_call>), rather than spell the tag byte by byte;
#   - after anything, mildly: a double quote, so that free strings in arguments end at once.
# The generation prompt ends in a line break, so: where the turn may end (no tools, tool_choice auto or none)
# the answer is empty; where llama-server's grammar forbids ending before a call (tool_choice "required",
# Anthropic's "any") the model opens one, the grammar spells it out, and after </tool_call> the turn ends.
# Random weights alone fill the text the grammar allows before a call (common/chat-auto-parser-generator.cpp:
# build_tool_parser_json_native, ``optional(content(until(tool_start)))``) until max_tokens, and may open
# more calls after one (``one_or_more``).
# A steering value is a share of embedding * sqrt(blocks): some 100 times the size of what the random weights
# add up to in the other dimensions of the residual stream (about 0.008 * embedding * sqrt(blocks)), so that
# it decides the next token at any size and any temperature.
STEERING = (
    # (dimension, the tokens that set it (None: all), to what share, {the token it favours: head weight})
    (0, ("<0x0A>", "</tool_call>"), 1.0, {"<|im_end|>": 2.0, "<tool_call>": 1.0}),
    (1, ("<0x7D>",), 1.0, {"</tool_call>": 1.0}),
    (2, None, 0.1, {"<0x22>": 1.0}),
)

# Qwen3-Reranker's prompt shortened (its system and instruction lines left out: this vocabulary spells them
# byte by byte, some 400 tokens a document). llama.cpp's conversion/qwen.py writes the full one as
# tokenizer.chat_template.rerank; llama-server puts the query and the document in and tokenizes it as it is,
# with no BOS (tools/server/server-common.cpp: format_prompt_rerank).
RERANK_TEMPLATE = "<|im_start|>user\n<Query>: {query}\n<Document>: {document}<|im_end|>\n<|im_start|>assistant\n"
RERANK_LABELS = ("yes", "no")  # the classifier's outputs; the score llama-server reports is the first's


@dataclass(frozen=True)
class Shape:
    """The dimensions of a generated model; checked on creation."""

    embedding: int = 64
    blocks: int = 2
    heads: int = 4
    kv_heads: int = 2
    feed_forward: int = 0  # 0: twice the embedding
    context: int = 2048
    extra_vocab: int = 0  # more normal tokens, to make the vocabulary (and the output head) bigger
    tied_embeddings: bool = False  # no output.weight: the head is the token embedding (Gemma, Llama 3.2 1B/3B)
    kind: str = "chat"  # one of KINDS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        for what in ("embedding", "blocks", "heads", "kv_heads", "context"):
            if getattr(self, what) <= 0:
                raise ValueError(f"{what} must be a positive number (got {getattr(self, what)})")
        for what in ("feed_forward", "extra_vocab"):
            if getattr(self, what) < 0:
                raise ValueError(f"{what} must not be negative (got {getattr(self, what)})")
        if self.embedding % self.heads or self.heads % self.kv_heads:
            raise ValueError("embedding must divide by heads, and heads by kv_heads")
        if self.kind == "tools" and self.tied_embeddings:
            raise ValueError("a tools model needs its own output head: it cannot have tied embeddings")
        if self.kind == "tools" and self.embedding <= len(STEERING):
            raise ValueError(f"a tools model needs an embedding of more than {len(STEERING)}")

    @property
    def head_dim(self) -> int:
        return self.embedding // self.heads

    @property
    def ffn(self) -> int:
        return self.feed_forward or self.embedding * 2

    @property
    def words(self) -> list[str]:
        return WORDS + [f"▁w{i}" for i in range(self.extra_vocab)]

    @property
    def added(self) -> tuple[tuple[str, str], ...]:
        """Tokens after the words, with their type's name: the tool template's markers."""
        return TOOL_TOKENS if self.kind == "tools" else ()

    @property
    def architecture(self) -> str:
        return "qwen3" if self.kind == "reranker" else "llama"

    @property
    def tokens(self) -> list[str]:
        return SPECIAL_TOKENS + [f"<0x{i:02X}>" for i in range(256)] + self.words + [t for t, _ in self.added]


def write_tiny_model(
    path: Path,
    *,
    embedding: int = 64,
    blocks: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    feed_forward: int | None = None,
    context: int = 2048,
    extra_vocab: int = 0,
    tied_embeddings: bool = False,
    seed: int = 0,
    name: str = "localllm-tiny",
    kind: str = "chat",
    fim: bool = False,
) -> Path:
    """Write a random-weight model of ``kind`` (see the module's doc) to ``path`` (atomically) and return it.

    With ``tied_embeddings`` the file has no ``output.weight``, and llama.cpp uses ``token_embd`` as
    the output head, duplicating it onto the GPU. With ``fim``, three of its words are named its
    fill-in-the-middle tokens, so that llama-server serves ``/infill`` with it (code completion).
    """
    import gguf  # imported here: only this command needs it at run time

    shape = Shape(embedding, blocks, heads, kv_heads, feed_forward or 0, context, extra_vocab, tied_embeddings, kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), shape.architecture)
    try:
        _write_metadata(writer, gguf, shape, name)
        if fim:  # llama-server's /infill needs a prefix, a suffix and a middle token (server-context.cpp)
            words = shape.words
            for key, word in zip(FIM_KEYS, FIM_WORDS, strict=True):
                writer.add_uint32(key, 3 + 256 + words.index(word))
        _write_tensors(writer, shape, np.random.default_rng(seed))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(path)
    return path


def _write_metadata(writer, gguf, shape: Shape, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.embedding)
    writer.add_block_count(shape.blocks)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    words = shape.words
    writer.add_token_list(shape.tokens)
    added = shape.added
    writer.add_token_scores([0.0] * 3 + [-1000.0] * 256 + [-float(i) for i in range(len(words))] + [0.0] * len(added))
    writer.add_token_types(
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.BYTE] * 256
        + [gguf.TokenType.NORMAL] * len(words)
        + [gguf.TokenType[type_name] for _, type_name in added]
    )
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if shape.kind == "tools":
        writer.add_chat_template(TOOL_TEMPLATE)
        writer.add_add_space_prefix(False)
    elif shape.kind == "reranker":
        writer.add_pooling_type(gguf.PoolingType.RANK)
        writer.add_classifier_output_labels(list(RERANK_LABELS))
        writer.add_chat_template([{"name": "rerank", "template": RERANK_TEMPLATE}])


def _write_tensors(writer, shape: Shape, rng: np.random.Generator) -> None:
    vocab, embd, kv = len(shape.tokens), shape.embedding, shape.kv_heads * shape.head_dim

    def tensor(name: str, *dims: int, ones: bool = False) -> None:
        data = np.ones(dims, np.float32) if ones else (rng.standard_normal(dims) * 0.02).astype(np.float32)
        if shape.kind == "tools":
            _steer(name, data, shape)
        writer.add_tensor(name, data)

    tensor("token_embd.weight", vocab, embd)
    tensor("output_norm.weight", embd, ones=True)
    if not shape.tied_embeddings:
        tensor("output.weight", vocab, embd)
    if shape.kind == "reranker":
        tensor("cls.output.weight", len(RERANK_LABELS), embd)  # the rank head: a score per label
    for block in range(shape.blocks):
        prefix = f"blk.{block}."
        tensor(prefix + "attn_norm.weight", embd, ones=True)
        tensor(prefix + "ffn_norm.weight", embd, ones=True)
        if shape.kind == "reranker":  # qwen3 normalizes each head's queries and keys
            tensor(prefix + "attn_q_norm.weight", shape.head_dim, ones=True)
            tensor(prefix + "attn_k_norm.weight", shape.head_dim, ones=True)
        tensor(prefix + "attn_q.weight", embd, embd)
        tensor(prefix + "attn_k.weight", kv, embd)
        tensor(prefix + "attn_v.weight", kv, embd)
        tensor(prefix + "attn_output.weight", embd, embd)
        tensor(prefix + "ffn_gate.weight", shape.ffn, embd)
        tensor(prefix + "ffn_up.weight", shape.ffn, embd)
        tensor(prefix + "ffn_down.weight", embd, shape.ffn)


def _steer(name: str, data: np.ndarray, shape: Shape) -> None:
    """Set the steering dimensions of a "tools" model's tensor ``name`` (random so far) in place."""
    if name.endswith((".attn_output.weight", ".ffn_down.weight")):
        data[[dim for dim, *_ in STEERING], :] = 0.0  # no layer writes them
        return
    if name not in ("token_embd.weight", "output.weight"):
        return
    ids = {token: number for number, token in enumerate(shape.tokens)}
    scale = shape.embedding * shape.blocks**0.5
    for dim, inputs, share, favoured in STEERING:
        data[:, dim] = share * scale if name == "token_embd.weight" and inputs is None else 0.0
        if name == "token_embd.weight" and inputs is not None:
            data[[ids[token] for token in inputs], dim] = share * scale
        elif name == "output.weight":
            for token, weight in favoured.items():
                data[ids[token], dim] = weight
