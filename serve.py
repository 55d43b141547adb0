"""An OpenAI-compatible HTTP server on the engine, with a chat page.

    python serve.py                                   # the default model on http://127.0.0.1:8000
    python serve.py --checkpoint DIR --dtype bfloat16 --compile --max-num-seqs 32 --api-key KEY
    torchrun --nproc_per_node=2 serve.py --checkpoint DIR   # tensor-parallel: rank 0 serves HTTP

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
"stream": true), GET /v1/models, /health, /metrics (Prometheus text) and / (the chat page, chat.html).
Errors come in OpenAI's envelope {"error": {"message", "type", "param", "code"}} with a 4xx status, and
the server goes on serving. One thread runs the engine, a step at a time; each HTTP request has a thread
of its own that hands its request to the engine and waits for its outputs. A streamed request whose
client goes away is aborted in the engine at once.
"""
import asyncio
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional

import tp
from checkpoint import DTYPES, default_checkpoint, load_model, load_tokenizer, pick_device, pick_dtype, pick_layout
from engine import Engine
from errors import ArgumentParser, UsageError, run_command
from sampling import SamplingParams

try:  # the optional [serve] extra
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route
except ImportError:
    uvicorn = None

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_BODY_BYTES = 1 << 20
# Fields a request may carry; those of the second set change nothing at their neutral values and are
# refused otherwise, so that a client never gets silently less than it asked for.
ACCEPTED = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
            "seed", "stop", "stream", "stream_options", "min_tokens", "ignore_eos", "user", "metadata", "store"}
NEUTRAL = {"n": 1, "best_of": 1, "logprobs": None, "top_logprobs": None, "echo": False, "presence_penalty": 0,
           "frequency_penalty": 0, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
           "response_format": None, "logit_bias": None, "suffix": None, "parallel_tool_calls": None}


@dataclass(frozen=True)
class ServerOptions:
    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000                         # 0: any free port (printed at start)
    device: str = "auto"
    dtype: Optional[str] = None              # None: the device's default (checkpoint.pick_dtype)
    compile: bool = False
    max_num_seqs: int = 32
    kv_cache_tokens: int = 16384
    kv_cache_gb: Optional[float] = None      # size the KV cache by memory instead
    max_waiting: int = 256                   # requests queued beyond this are refused (429)
    api_key: Optional[str] = None            # every /v1 request must then carry it as a bearer token
    model_name: Optional[str] = None         # the name clients use; default: the checkpoint's folder name
    pp: int = 1                              # pipeline stages under torchrun; the rest is tensor-parallel

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise UsageError(f"--port must be in [0, 65535], not {self.port}")
        if self.max_waiting < 1 or self.max_num_seqs < 1 or self.pp < 1:
            raise UsageError("--max-waiting, --max-num-seqs and --pp must be >= 1")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str = None, code: str = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind


# ---------------------------------------------------------------------------------------------------------
# Metrics


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float):
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum, self.count = self.sum + value, self.count + 1

    def render(self, name: str) -> list:
        lines = [f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return lines + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.finished = {}  # finish reason -> requests
        self.ttft = Histogram([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
        self.tpot = Histogram([0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28])
        self.latency = Histogram([0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300])

    def request_done(self, reason: str, start: float, first: Optional[float], end: float, n: int):
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.latency.observe(end - start)
            if first is not None:
                self.ttft.observe(first - start)
                if n > 1:
                    self.tpot.observe((end - first) / (n - 1))

    def render(self, stats: dict) -> str:
        gauges = {"num_requests_running": stats["running"], "num_requests_waiting": stats["waiting"],
                  "kv_blocks_used": stats["kv_blocks_used"], "kv_blocks_total": stats["kv_blocks_total"]}
        counters = {"preemptions_total": stats["preemptions"], "prompt_tokens_total": stats["prompt_tokens"],
                    "generation_tokens_total": stats["generation_tokens"],
                    "prefix_cache_hit_tokens_total": stats["prefix_cache_hit_tokens"]}
        lines = []
        for name, value in gauges.items():
            lines += [f"# TYPE nimblelm_{name} gauge", f"nimblelm_{name} {value}"]
        for name, value in counters.items():
            lines += [f"# TYPE nimblelm_{name} counter", f"nimblelm_{name} {value}"]
        with self.lock:
            lines.append("# TYPE nimblelm_requests_finished_total counter")
            lines += [f'nimblelm_requests_finished_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
            lines += self.ttft.render("nimblelm_time_to_first_token_seconds")
            lines += self.tpot.render("nimblelm_time_per_output_token_seconds")
            lines += self.latency.render("nimblelm_request_latency_seconds")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The engine's thread and the requests' hand-over


class Service:
    """The engine, driven by one thread that alone touches it: the main thread, since PyTorch's CPU kernels
    run at half speed in another thread here. HTTP handlers (uvicorn's thread) post requests and aborts to
    its inbox; it answers each request's outputs into that request's asyncio queue."""

    def __init__(self, engine: Engine, tokenizer, name: str, options: ServerOptions):
        self.engine, self.tokenizer, self.name, self.options = engine, tokenizer, name, options
        self.inbox = queue.Queue()
        self.requests = {}  # request id -> [asyncio queue, its loop, start, first token time, tokens]
        self.metrics = Metrics()
        self.stats = engine.stats()  # a snapshot for /metrics, renewed by the engine's thread
        self.context = engine.model.args.max_seq_len
        self.capacity = min(self.context, engine.num_blocks * engine.block_size)

    def run(self, serving):
        """Step the engine while serving() is true (and, after, while requests remain)."""
        engine = self.engine
        while serving() or engine.has_unfinished():
            items = []
            try:
                if not engine.has_unfinished() and engine.world == 1:
                    items.append(self.inbox.get(timeout=0.1))  # nothing to step: wait for a request
                while True:
                    items.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            for item in items:
                self.handle(item)
            if engine.has_unfinished() or engine.world > 1:  # other ranks wait in each step's broadcast
                outputs = engine.step()
                for out in outputs:
                    self.dispatch(out)
                if not outputs and not engine.has_unfinished():
                    time.sleep(0.005)
            self.stats = engine.stats()

    def handle(self, item):
        if item[0] == "abort":
            self.engine.abort(item[1])
            return
        _, prompt, params, future, loop = item
        try:
            stats = self.engine.stats()  # waiting beyond the free places in the running batch
            if stats["waiting"] - (self.options.max_num_seqs - stats["running"]) >= self.options.max_waiting:
                raise ApiError(429, "too many requests are waiting; retry later", code="rate_limit_exceeded",
                               kind="rate_limit_error")
            rid = self.engine.add_request(prompt, params, request_id=uuid.uuid4().hex)
            q = asyncio.Queue()
            self.requests[rid] = [q, loop, time.perf_counter(), None, 0]
            loop.call_soon_threadsafe(future.set_result, (rid, q))
        except UsageError as e:  # the engine's refusals; max_tokens: the prompt and it do not fit
            error = (ApiError(400, str(e), "messages", "context_length_exceeded") if e.param == "max_tokens"
                     else ApiError(400, str(e), e.param, "invalid_value"))
            loop.call_soon_threadsafe(future.set_exception, error)
        except ApiError as e:
            loop.call_soon_threadsafe(future.set_exception, e)

    def dispatch(self, out):
        entry = self.requests.get(out.request_id)
        if entry is None:
            return
        q, loop, start, first, n = entry
        if out.new_token_ids and first is None:
            entry[3] = first = time.perf_counter()
        entry[4] = n = n + len(out.new_token_ids)
        if out.finished:
            del self.requests[out.request_id]
            self.metrics.request_done(out.finish_reason, start, first, time.perf_counter(), n)
        loop.call_soon_threadsafe(q.put_nowait, out)

    async def submit(self, prompt: list, params: SamplingParams):
        """Queue a request in the engine -> (its id, the asyncio queue of its outputs)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.inbox.put(("add", prompt, params, future, loop))
        return await future

    def cancel(self, rid: str):
        self.inbox.put(("abort", rid))


# ---------------------------------------------------------------------------------------------------------
# Requests: OpenAI's fields into a prompt and SamplingParams


def check_fields(body: dict, service: Service):
    for key, value in body.items():
        if key in ACCEPTED:
            continue
        if key in NEUTRAL:
            if value != NEUTRAL[key] and not (value is None or value is False or value == []):
                raise ApiError(400, f"{key}={json.dumps(value)} is not supported by this server", key,
                               "unsupported_parameter")
            continue
        raise ApiError(400, f"Unrecognized request argument supplied: {key}", key, "unrecognized_argument")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "you must provide a model parameter (a string)", "model")
    if model != service.name:
        raise ApiError(404, f"The model `{model}` does not exist", "model", "model_not_found")


def sampling_params(body: dict, prompt_len: int, service: Service) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = max(1, service.capacity - prompt_len)
    stop = body.get("stop")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=body.get("temperature", 1.0),
                              top_p=body.get("top_p"), top_k=body.get("top_k"), seed=body.get("seed"),
                              stop=() if stop is None else stop, ignore_eos=body.get("ignore_eos", False),
                              min_tokens=body.get("min_tokens", 0))
    except UsageError as e:
        raise ApiError(400, str(e), e.param, "invalid_value")


def chat_prompt(body: dict, tokenizer) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    flat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}] must have a role: system, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, "only text content parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        flat.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return tokenizer.encode_chat(flat)


def completion_prompt(body: dict, tokenizer) -> list:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return tokenizer.encode_prompt(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "prompt must be a non-empty string or list of token ids (one prompt per request)",
                   "prompt")


# ---------------------------------------------------------------------------------------------------------
# HTTP (Starlette, served by uvicorn)


def error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse({"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}},
                        e.status, headers=headers)


def make_app(service: Service) -> Starlette:
    s = service

    def authorize(request: Request):
        key = s.options.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        raw, size = b"", 0
        async for chunk in request.stream():  # an oversized body is read to its end (within reason) so that
            size += len(chunk)                # the client, still sending, gets the 413 and not a broken pipe
            if size <= MAX_BODY_BYTES:
                raw += chunk
            elif size > 16 * MAX_BODY_BYTES:
                break
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})", code="invalid_json")
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        return body

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def metrics(request):
        return PlainTextResponse(s.metrics.render(s.stats), media_type="text/plain; version=0.0.4")

    async def page(request):
        return FileResponse(os.path.join(HERE, "chat.html"), media_type="text/html")

    async def models(request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": s.name, "object": "model", "created": 0,
                                                         "owned_by": "nimblelm", "max_model_len": s.capacity}]})

    async def chat_completions(request):
        return await complete(request, chat=True)

    async def completions(request):
        return await complete(request, chat=False)

    async def complete(request: Request, chat: bool):
        authorize(request)
        body = await read_json(request)
        check_fields(body, s)
        prompt = chat_prompt(body, s.tokenizer) if chat else completion_prompt(body, s.tokenizer)
        params = sampling_params(body, len(prompt), s)
        stream, options = body.get("stream", False), body.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise ApiError(400, "stream must be true or false, stream_options an object", "stream")
        rid, q = await s.submit(prompt, params)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + rid, "created": int(time.time()), "model": s.name}
        if not stream:
            text, n, reason, cached = "", 0, None, 0
            try:
                while reason is None:
                    out = await q.get()
                    text, n, reason, cached = (text + out.text, n + len(out.new_token_ids), out.finish_reason,
                                               out.num_cached_tokens)
            except asyncio.CancelledError:  # the client went away
                s.cancel(rid)
                raise
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                      if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
            return JSONResponse(dict(head, object=kind, choices=[choice], usage=usage(len(prompt), n, cached)))

        chunk_kind = kind + ".chunk" if chat else kind

        def event(choices, **extra) -> str:
            return "data: " + json.dumps(dict(head, object=chunk_kind, choices=choices, **extra)) + "\n\n"

        def choice(text, reason=None, role=False):
            if not chat:
                return [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]
            delta = ({"role": "assistant", "content": text} if role else {"content": text}) if text or role else {}
            return [{"index": 0, "delta": delta, "finish_reason": reason}]

        async def events():
            finished, n = False, 0
            try:
                if chat:
                    yield event(choice("", role=True))
                while not finished:
                    out = await q.get()
                    finished, n = out.finished, n + len(out.new_token_ids)
                    if out.text:
                        yield event(choice(out.text))
                    if finished:
                        yield event(choice("", out.finish_reason))
                        if options.get("include_usage"):
                            yield event([], usage=usage(len(prompt), n, out.num_cached_tokens))
                yield "data: [DONE]\n\n"
            finally:
                if not finished:  # the client went away (or the server is stopping): stop generating for it
                    s.cancel(rid)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def on_api_error(request, e: ApiError):
        return error_response(e)

    async def on_http_error(request, e):  # unknown paths and methods, in the same envelope
        return error_response(ApiError(e.status_code, f"{e.detail}: {request.method} {request.url.path}",
                                       code="not_found" if e.status_code == 404 else None))

    routes = [Route("/health", health), Route("/metrics", metrics), Route("/", page),
              Route("/v1/models", models), Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={ApiError: on_api_error, HTTPException: on_http_error})


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


# ---------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv) -> ServerOptions:
    p = ArgumentParser(description="An OpenAI-compatible server for a LLaMA-family checkpoint.")
    p.add_argument("--checkpoint", help="converted checkpoint directory (default: SmolLM2-135M-Instruct, fetched once)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--compile", action="store_true", help="compile the decode step (one graph per batch size)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests running at once")
    p.add_argument("--kv-cache-tokens", type=int, default=16384)
    p.add_argument("--kv-cache-gb", type=float, default=None, help="size the KV cache by memory instead")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests beyond this get 429")
    p.add_argument("--api-key", default=os.environ.get("NIMBLELM_API_KEY"), help="require this bearer token")
    p.add_argument("--served-model-name", default=None, help="the model's name for clients")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages under torchrun (the rest is tensor-parallel)")
    a = p.parse_args(argv)
    return ServerOptions(checkpoint=a.checkpoint, host=a.host, port=a.port, device=a.device, dtype=a.dtype,
                         compile=a.compile, max_num_seqs=a.max_num_seqs, kv_cache_tokens=a.kv_cache_tokens,
                         kv_cache_gb=a.kv_cache_gb, max_waiting=a.max_waiting, api_key=a.api_key,
                         model_name=a.served_model_name, pp=a.pp)


def main(argv=None):
    o = parse_args(argv)
    if uvicorn is None:
        raise UsageError("serve.py needs its extra: pip install -e '.[serve]' (starlette and uvicorn)")
    checkpoint = o.checkpoint or default_checkpoint()
    device = pick_device(o.device)
    dtype = pick_dtype(o.dtype, device)
    layout = pick_layout(device, o.pp)
    model = load_model(checkpoint, device=device, dtype=dtype, layout=layout)
    tokenizer = load_tokenizer(checkpoint)
    engine = Engine(model, tokenizer, max_num_seqs=o.max_num_seqs, kv_cache_tokens=o.kv_cache_tokens,
                    kv_cache_gb=o.kv_cache_gb, compile=o.compile, layout=layout)
    engine.warm_up()
    if tp.rank() > 0:  # the other ranks step with rank 0 until it stops
        while not engine.stopped:
            engine.step()
        return 0
    name = o.model_name or os.path.basename(os.path.normpath(checkpoint))
    service = Service(engine, tokenizer, name, o)
    app = make_app(service)
    sock = socket.socket(socket.AF_INET6 if ":" in o.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((o.host, o.port))
        sock.listen(2048)  # connections wait in the backlog until uvicorn takes over
    except OSError as e:
        raise UsageError(f"cannot listen on {o.host}:{o.port} ({e.strerror})")
    print(f"nimblelm: serving {name} on http://{o.host}:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    # HTTP in a thread of its own, the engine in this one. SIGTERM or Ctrl-C: uvicorn stops accepting and
    # lets running requests finish (aborting those still streaming after 30 s); then the engine stops.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
    http = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: server.handle_exit(signum, frame))
    http.start()
    service.run(serving=http.is_alive)
    engine.stop()
    return 0


if __name__ == "__main__":
    tp.exit_process(run_command(main))
