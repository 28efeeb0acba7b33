// One streamed chat turn the way LibreChat sends it to a custom OpenAI-compatible endpoint:
// @langchain/openai's ChatOpenAI (Chat Completions API, streaming) over the openai SDK.
//
//   node stream_chat.mjs <baseURL> <model> [maxTokens]      (env OPENAI_API_KEY: the key; default "no-key")
//
// Prints one JSON line per chunk LangChain yields, then one "final" line with the aggregate, e.g.
//   {"ms":12,"type":"chunk","message":"ai","content":"","reasoning":"loading slow…","finish_reason":null,...}
//   {"ms":2400,"type":"final","content":"…","reasoning":"loading slow…\nslow is ready (2 s).\n\n","finish_reason":"length",...}
// or {"type":"error",...} with exit status 1. "reasoning" is `additional_kwargs.reasoning_content`:
// where @langchain/openai (converters/completions.js) puts a chunk's `delta.reasoning_content`, and
// where LibreChat's agents read a custom endpoint's reasoning from (their default reasoningKey).
import { ChatOpenAI } from "@langchain/openai";

const [baseURL, model, maxTokens = "8"] = process.argv.slice(2);
if (!baseURL || !model) {
  console.error("usage: node stream_chat.mjs <baseURL> <model> [maxTokens]");
  process.exit(2);
}

const started = Date.now();
const print = (line) => process.stdout.write(JSON.stringify({ ms: Date.now() - started, ...line }) + "\n");

// As LibreChat configures a custom endpoint: the model, the key, the base URL, streaming; no stream_options.
const llm = new ChatOpenAI({
  model,
  apiKey: process.env.OPENAI_API_KEY || "no-key",
  configuration: { baseURL },
  streaming: true,
  maxTokens: Number(maxTokens),
  temperature: 0,
  maxRetries: 0,
});

try {
  let total;
  let chunks = 0;
  for await (const chunk of await llm.stream([{ role: "user", content: "hi" }])) {
    chunks += 1;
    total = total === undefined ? chunk : total.concat(chunk);
    print({
      type: "chunk",
      message: chunk.getType(),
      id: chunk.id ?? null,
      content: chunk.content,
      reasoning: chunk.additional_kwargs?.reasoning_content ?? null,
      finish_reason: chunk.response_metadata?.finish_reason ?? null,
      blocks: chunk.contentBlocks.map((block) => block.type),
    });
  }
  if (total === undefined) throw new Error("the stream yielded no chunk");
  print({
    type: "final",
    chunks,
    id: total.id ?? null,
    content: total.content,
    reasoning: total.additional_kwargs?.reasoning_content ?? null,
    finish_reason: total.response_metadata?.finish_reason ?? null,
    model_name: total.response_metadata?.model_name ?? null,
    usage: total.usage_metadata ?? null,
  });
} catch (error) {
  print({ type: "error", name: error?.constructor?.name ?? null, status: error?.status ?? null, message: String(error) });
  process.exit(1);
}
