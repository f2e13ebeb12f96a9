"""The OpenAI-compatible policy server: agents talk to the policy being trained as if it
were any OpenAI chat model, and every call is recorded, token ids and log-probs included.

Why batching in one worker: decoding is memory-bound, so 16 sequences in one decode loop
cost little more than one. Request handlers only validate, tokenise and enqueue; a single
generation thread takes the first waiting request, waits up to `batch_wait_ms` for others
(up to `max_batch_size` sequences), groups those with identical sampling parameters into
one `GenerationEngine.generate` call (a request's `n` is its prompt's sample count) and
resolves each request's future. The thread holds `model_lock` for each call, and the
trainer holds it while it changes the weights, so no completion mixes two policies.

Why the ids travel with the text: retokenising a completion's text need not give back the
ids the model sampled (Agent Lightning v1's "retokenisation drift"), so the response (with
`return_token_ids`) and the trace store carry exactly the ids the engine was given and
sampled, and the engine's own sampling log-probs, never recomputed.

Choices made where OpenAI leaves room:
* `max_tokens` above `settings.max_tokens` is clipped to it (the record keeps the asked-for
  value as `max_tokens_requested`); a prompt plus `max_tokens` over the context length is
  refused with both counts. Without `max_tokens`, the default is lowered to what fits.
* The rollout id comes from the `X-Rollout-Id` header, else `metadata.rollout_id`; the
  header wins when both are given.
* `model` in a request is accepted whatever it names (agents are often configured with a
  hosted model's name); responses name `model_name`.
* `stream: true` answers with OpenAI's SSE chunks, but the completion is generated whole
  first (one content chunk per choice, then a finish chunk): batching comes before latency.
* `top_logprobs` > 0 is refused (only the sampled token's log-prob is known); `seed`,
  penalties and other unknown fields are ignored, as vLLM does.
* With `forced_sampling` (training, evaluation, APO), every request of a rollout is sampled
  at the trainer's (temperature, top_p) whatever it asks, so recorded log-probs are the ones
  the loss assumes; the record's `params` say what was used (`forced: true`). Requests outside
  any rollout (APO's optimiser writing critiques) keep their own sampling.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations
# (Request, Header) at definition time, and those names are imported inside `_build_app`.
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from brainforge.agents.chat_format import TOOL_CALL_CLOSE, RequestError, encode_prompt, parse_tool_calls, validate_tools
from brainforge.config import PolicyServerSettings
from brainforge.data.traces import tokenizer_fingerprint
from brainforge.errors import BrainforgeError, MissingDependencyError
from brainforge.generation.engine import GenerationEngine, SamplingParams

if TYPE_CHECKING:
    import fastapi

    from brainforge.agents.store import TraceStore

log = logging.getLogger(__name__)

FINAL_STATUSES = ("succeeded", "failed", "timeout")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class _Job:
    """One request waiting for the generation worker."""

    prompt_ids: list[int]
    n: int
    params: SamplingParams
    future: Future = field(default_factory=Future)


@dataclass
class _Choice:
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    truncated: bool


class PolicyServer:
    """See the module docstring. `start()` serves on `settings.host:settings.port` (0 = a
    free port) in background threads; `app` is the FastAPI app for in-process use."""

    def __init__(self, model: Any, tokenizer: Any, chat_template: str, settings: PolicyServerSettings,
                 store: "TraceStore | None", *, model_name: str = "brainforge", context_length: int | None = None,
                 forced_sampling: tuple[float, float] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.settings = settings
        self.store = store
        self.model_name = model_name
        self.context_length = int(context_length or model.config.max_position_embeddings)
        self.forced_sampling = forced_sampling
        self.policy_version = ""
        self.model_lock = threading.RLock()
        self.engine = GenerationEngine.for_chat(model, tokenizer)
        self._tokenizer_id = tokenizer_fingerprint(tokenizer) if store is not None else None
        self._api_key = read_api_key(settings.api_key_env)
        if settings.host not in _LOOPBACK:
            log.warning("policy server binds to %s: the model is reachable from the network%s", settings.host,
                        "" if self._api_key else " without an API key (set algorithm.server.api_key_env)")
        self._queue: deque[_Job] = deque()
        self._queue_cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._stats_lock = threading.Lock()
        self._stats: dict[str, Any] = {"requests": 0, "engine_calls": 0, "sequences": 0,
                                       "batch_sizes": deque(maxlen=1024)}  # the latest engine calls' sequence counts
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self.base_url: str | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Serve in a daemon thread; returns the base URL ("http://HOST:PORT/v1") once the
        socket accepts connections."""
        import uvicorn

        if self._server_thread is not None:
            raise BrainforgeError("this policy server is already started")
        sock = self._bind()  # here, not in uvicorn: a taken port is a clear error, not a SystemExit in a thread
        self._ensure_worker()
        config = uvicorn.Config(self.app, host=self.settings.host, port=self.settings.port, log_level="warning",
                                lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        server = self._server
        self._server_thread = threading.Thread(target=lambda: server.run(sockets=[sock]), name="brainforge-policy-server",
                                               daemon=True)
        self._server_thread.start()
        deadline = time.monotonic() + 120.0  # generous: a loaded machine may take a while to start the loop
        while not server.started:
            if not self._server_thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                sock.close()
                raise BrainforgeError(f"the policy server did not start on {self.settings.host}:{self.settings.port} "
                                      "within 120 s; see the log above")
            time.sleep(0.02)
        port = sock.getsockname()[1]
        host = self.settings.host if ":" not in self.settings.host else f"[{self.settings.host}]"
        self.base_url = f"http://{host}:{port}/v1"
        log.info("policy server listening on %s", self.base_url)
        return self.base_url

    def _bind(self) -> socket.socket:
        host, port = self.settings.host, self.settings.port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise BrainforgeError(f"the policy server could not listen on {host}:{port} ({exc.strerror}); "
                                  "pick another port (--port / algorithm.server.port, 0 = any free one) or host") from exc
        sock.set_inheritable(True)
        return sock

    def stop(self) -> None:
        """Stop serving and the generation worker; waiting requests fail with 503."""
        if self._server is not None:
            self._server.should_exit = True
        if self._server_thread is not None:
            self._server_thread.join(timeout=60)
        self._server_thread = None
        self._server = None
        with self._queue_cv:
            self._stopping = True
            pending = list(self._queue)
            self._queue.clear()
            self._queue_cv.notify_all()
        for job in pending:
            job.future.set_exception(RequestError("the policy server is shutting down", status=503, type="server_error"))
        if self._worker is not None:
            self._worker.join(timeout=60)
        self._worker = None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or `timeout` seconds pass); True when it has stopped."""
        thread = self._server_thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def __enter__(self) -> "PolicyServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def stats(self) -> dict[str, Any]:
        """requests, engine_calls, sequences so far, and the sequence count of the latest 1024 engine calls."""
        with self._stats_lock:
            return {**self._stats, "batch_sizes": list(self._stats["batch_sizes"])}

    # ------------------------------------------------------------------ batching

    def _ensure_worker(self) -> None:
        with self._queue_cv:
            if self._worker is None or not self._worker.is_alive():
                self._stopping = False
                self._worker = threading.Thread(target=self._work, name="brainforge-generation", daemon=True)
                self._worker.start()

    def submit(self, prompt_ids: list[int], n: int, params: SamplingParams) -> Future:
        """Queue one request for the generation worker; the future holds its `_Choice`s."""
        self._ensure_worker()
        job = _Job(prompt_ids, n, params)
        with self._queue_cv:
            self._queue.append(job)
            self._queue_cv.notify()
        return job.future

    def _next_batch(self) -> list[_Job] | None:
        """The first waiting job, plus those that arrive within batch_wait_ms, up to
        max_batch_size sequences. None when stopping."""
        with self._queue_cv:
            while not self._queue:
                if self._stopping:
                    return None
                self._queue_cv.wait(timeout=0.5)
            batch = [self._queue.popleft()]
            sequences = batch[0].n
            deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
            while sequences < self.settings.max_batch_size:
                if not self._queue:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._stopping:
                        break
                    self._queue_cv.wait(timeout=remaining)
                    continue
                if sequences + self._queue[0].n > self.settings.max_batch_size:
                    break  # it heads the next batch
                job = self._queue.popleft()
                batch.append(job)
                sequences += job.n
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            groups: dict[SamplingParams, list[_Job]] = {}
            for job in batch:
                groups.setdefault(job.params, []).append(job)
            for params, jobs in groups.items():
                try:
                    self._generate(params, jobs)
                except Exception as exc:  # resolve every waiting request; the handler answers 500
                    log.exception("generation failed for a batch of %d requests", len(jobs))
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)

    def _generate(self, params: SamplingParams, jobs: list[_Job]) -> None:
        with self.model_lock:
            rollout = self.engine.generate([job.prompt_ids for job in jobs], [job.n for job in jobs], params)
        with self._stats_lock:
            self._stats["engine_calls"] += 1
            self._stats["sequences"] += sum(job.n for job in jobs)
            self._stats["batch_sizes"].append(sum(job.n for job in jobs))
        row = 0
        for job in jobs:
            choices = []
            for _ in range(job.n):
                length = int(rollout.completion_mask[row].sum())
                assert rollout.logprobs is not None
                choices.append(_Choice(completion_ids=rollout.completion_ids[row, :length].tolist(),
                                       logprobs=rollout.logprobs[row, :length].tolist(),
                                       text=rollout.texts[row], truncated=bool(rollout.truncated[row])))
                row += 1
            job.future.set_result(choices)

    # ------------------------------------------------------------------ requests

    def _sampling(self, body: dict[str, Any], prompt_len: int, stops: list[str], tools_on: bool,
                  in_rollout: bool) -> tuple[SamplingParams, dict[str, Any]]:
        """Engine parameters of a request and the `params` to record."""
        cap = self.settings.max_tokens
        asked = body.get("max_completion_tokens", body.get("max_tokens"))
        room = self.context_length - prompt_len
        if room < 1:
            raise RequestError(f"the prompt is {prompt_len} tokens, which leaves no room in the model's context length of "
                               f"{self.context_length} tokens; shorten the messages", param="messages",
                               code="context_length_exceeded")
        record: dict[str, Any] = {}
        if asked is None:
            max_tokens = min(cap, room)
        else:
            max_tokens = min(asked, cap)
            if asked > cap:
                record["max_tokens_requested"] = asked
            if prompt_len + max_tokens > self.context_length:
                raise RequestError(
                    f"this model's context length is {self.context_length} tokens, but the request asks for "
                    f"{prompt_len + max_tokens} ({prompt_len} in the messages, {max_tokens} for the completion); "
                    "shorten the messages or lower max_tokens", param="messages", code="context_length_exceeded")
        if self.forced_sampling is not None and in_rollout:
            temperature, top_p = self.forced_sampling
            record["forced"] = True
        else:
            temperature = 1.0 if body.get("temperature") is None else float(body["temperature"])
            top_p = 1.0 if body.get("top_p") is None else float(body["top_p"])
        engine_stops = tuple(stops) + ((TOOL_CALL_CLOSE,) if tools_on and TOOL_CALL_CLOSE not in stops else ())
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                stop_strings=engine_stops, return_logprobs=True)
        record.update({"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "stop": stops,
                       "n": body.get("n") or 1})
        return params, record

    def _rollout_id(self, header: str | None, body: dict[str, Any]) -> str | None:
        metadata = body.get("metadata") or {}
        rollout_id = header or metadata.get("rollout_id")
        if rollout_id is None:
            return None
        if not isinstance(rollout_id, str) or not rollout_id.strip() or len(rollout_id) > 256:
            raise RequestError("the rollout id (X-Rollout-Id header or metadata.rollout_id) must be a non-empty string "
                               "of at most 256 characters", param="metadata.rollout_id")
        return rollout_id

    def _open_rollout(self, rollout_id: str | None) -> None:
        """Refuse calls for a finished rollout (409); create unknown ones (external agents
        name their own ids)."""
        if self.store is None or rollout_id is None:
            return
        if not self.store.is_open(rollout_id):
            raise RequestError(f"rollout {rollout_id!r} is already finished; start a new rollout id", status=409,
                               param="metadata.rollout_id", code="rollout_finished")
        self.store.ensure_rollout(rollout_id)

    def complete(self, body: Any, rollout_header: str | None = None) -> dict[str, Any]:
        """One chat completion request, blocking (called from the server's thread pool)."""
        body = _validate_body(body)
        specs = validate_tools(body.get("tools"))
        tools_on = bool(specs) and body.get("tool_choice") != "none"
        tools = specs if tools_on else []
        # Handler threads share the tokenizer with the worker: fine, since encoding and decoding without
        # changing its padding/truncation settings never takes the Rust tokenizer's mutable borrow.
        prompt_ids = encode_prompt(self.tokenizer, self.chat_template, body["messages"], tools, body.get("tool_choice"))
        stops = _stop_list(body.get("stop"))
        n = body.get("n") or 1
        if n > self.settings.max_batch_size:
            raise RequestError(f"n is {n}, more than this server's max_batch_size of {self.settings.max_batch_size}; "
                               "ask for fewer choices or raise algorithm.server.max_batch_size", param="n")
        rollout_id = self._rollout_id(rollout_header, body)
        params, record_params = self._sampling(body, len(prompt_ids), stops, tools_on, in_rollout=rollout_id is not None)
        self._open_rollout(rollout_id)
        with self._stats_lock:
            self._stats["requests"] += 1
        choices: list[_Choice] = self.submit(prompt_ids, n, params).result()

        response_choices = []
        call_indices: list[int | None] = []
        for i, choice in enumerate(choices):
            text = _cut_at_stop(choice.text, stops)
            content, tool_calls = parse_tool_calls(text) if tools_on else (text, [])
            finish = "length" if choice.truncated else ("tool_calls" if tool_calls else "stop")
            if self.store is not None:  # after generation: exactly what the client gets
                from brainforge.agents.store import CallRecord

                call = CallRecord(rollout_id=rollout_id, messages=body["messages"], tools=body.get("tools"),
                                  prompt_ids=list(prompt_ids), completion_ids=choice.completion_ids,
                                  logprobs=choice.logprobs, text=choice.text, tool_calls=tool_calls,
                                  finish_reason=finish, params=record_params, policy_version=self.policy_version,
                                  tokenizer=self._tokenizer_id)
                self.store.record_call(call)
                call_indices.append(call.index)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if tool_calls:
                message["tool_calls"] = tool_calls
            entry: dict[str, Any] = {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
            if body.get("logprobs"):
                entry["logprobs"] = {"content": [self._token_logprob(t, lp) for t, lp in zip(choice.completion_ids, choice.logprobs)]}
            if body.get("return_token_ids"):
                entry["token_ids"] = choice.completion_ids
            response_choices.append(entry)
        completion_tokens = sum(len(c.completion_ids) for c in choices)
        response: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name, "choices": response_choices,
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(prompt_ids) + completion_tokens},
            "brainforge": {"rollout_id": rollout_id, "call_indices": call_indices, "policy_version": self.policy_version,
                           "params": record_params},
        }
        if body.get("return_token_ids"):
            response["prompt_token_ids"] = list(prompt_ids)
        return response

    def _token_logprob(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self.tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")), "top_logprobs": []}

    # ------------------------------------------------------------------ app

    def _check_key(self, authorization: str | None) -> None:
        if self._api_key is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._api_key.encode()):
            raise RequestError("missing or wrong API key; send the header 'Authorization: Bearer <key>'", status=401,
                               type="authentication_error", code="invalid_api_key")

    def _build_app(self) -> "fastapi.FastAPI":
        try:
            import fastapi  # noqa: F401
        except ImportError as exc:
            raise MissingDependencyError("fastapi", "agent", "The policy server") from exc
        from fastapi import APIRouter, Depends, FastAPI, Header, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, StreamingResponse
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException as StarletteHTTPException

        app = FastAPI(title="brainforge policy server", docs_url=None, redoc_url=None, openapi_url=None)

        def error(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                  code: str | None = None) -> JSONResponse:
            return JSONResponse(status_code=status, content=RequestError(message, status=status, param=param, type=type,
                                                                         code=code).body())

        @app.exception_handler(RequestError)
        async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
            return JSONResponse(status_code=exc.status, content=exc.body())

        @app.exception_handler(RequestValidationError)
        async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
            first = exc.errors()[0] if exc.errors() else {}
            param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
            return error(400, f"{param or 'request'}: {first.get('msg', 'invalid request')}", param=param)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
            return error(exc.status_code, str(exc.detail), type="invalid_request_error" if exc.status_code < 500 else "server_error")

        @app.exception_handler(Exception)
        async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
            log.error("policy server: unexpected %s: %s", type(exc).__name__, exc, exc_info=exc)
            return error(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error")

        async def check_key(authorization: str | None = Header(default=None)) -> None:
            self._check_key(authorization)

        async def json_body(request: Request) -> Any:
            raw = await request.body()
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(f"the request body is not valid JSON ({exc})") from exc

        v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

        @v1.post("/chat/completions")
        async def chat_completions(request: Request, x_rollout_id: str | None = Header(default=None)) -> Any:
            body = await json_body(request)
            try:
                response = await run_in_threadpool(self.complete, body, x_rollout_id)
            except RequestError:
                raise
            except BrainforgeError as exc:  # the server's side (e.g. the trace store cannot write): one line, logged
                log.error("chat completion failed: %s", exc)
                return error(500, str(exc).splitlines()[0], type="server_error")
            except Exception as exc:  # answered here, so no traceback reaches the client or the ASGI log twice
                log.error("chat completion failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
                return error(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error")
            if isinstance(body, dict) and body.get("stream"):
                return StreamingResponse(_sse_chunks(response), media_type="text/event-stream")
            return response

        @v1.get("/models")
        async def models() -> Any:
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "brainforge"}]}

        @v1.get("/stats")
        async def stats() -> Any:
            return self.stats

        @v1.post("/rollouts/{rollout_id}/reward")
        async def reward(rollout_id: str, request: Request) -> Any:
            body = await json_body(request)
            if not isinstance(body, dict) or not _is_number(body.get("reward")):
                raise RequestError("body must be {\"reward\": <number>, \"call_index\": <optional int>}", param="reward")
            call_index = body.get("call_index")
            if call_index is not None and (not isinstance(call_index, int) or isinstance(call_index, bool) or call_index < 0):
                raise RequestError("call_index must be an integer >= 0", param="call_index")
            store = self._require_store()
            await run_in_threadpool(self._store_op, store.set_reward, rollout_id, float(body["reward"]), call_index)
            return {"rollout_id": rollout_id, "reward": float(body["reward"]), "call_index": call_index}

        @v1.post("/rollouts/{rollout_id}/finish")
        async def finish(rollout_id: str, request: Request) -> Any:
            body = await json_body(request)
            if not isinstance(body, dict) or body.get("status") not in FINAL_STATUSES:
                raise RequestError(f"body must be {{\"status\": one of {', '.join(FINAL_STATUSES)}, \"reward\": <optional number>}}",
                                   param="status")
            if body.get("reward") is not None and not _is_number(body["reward"]):
                raise RequestError("reward must be a number", param="reward")
            error_text = body.get("error")
            if error_text is not None and not isinstance(error_text, str):
                raise RequestError("error must be a string", param="error")
            store = self._require_store()
            await run_in_threadpool(store.ensure_rollout, rollout_id)  # an agent may finish a rollout it made no call in
            reward_value = None if body.get("reward") is None else float(body["reward"])
            if not await run_in_threadpool(self._store_op, store.finish_rollout, rollout_id, body["status"], reward_value, error_text):
                raise RequestError(f"rollout {rollout_id!r} is already finished", status=409, code="rollout_finished")
            return {"rollout_id": rollout_id, "status": body["status"], "reward": reward_value}

        app.include_router(v1)

        @app.get("/health")
        async def health() -> Any:
            return {"status": "ok", "model": self.model_name, "policy_version": self.policy_version}

        return app

    def _require_store(self) -> "TraceStore":
        if self.store is None:
            raise RequestError("this server records no traces (it was started without a store)", status=404)
        return self.store

    @staticmethod
    def _store_op(op: Any, *args: Any) -> Any:
        from brainforge.agents.store import UnknownRolloutError

        try:
            return op(*args)
        except BrainforgeError as exc:  # unknown rollout, call index out of range: the client's to fix
            raise RequestError(str(exc), status=404 if isinstance(exc, UnknownRolloutError) else 400) from exc


# ------------------------------------------------------------------------------ helpers


def read_api_key(env: str | None) -> str | None:
    """The key named by `api_key_env`; a named but unset variable is an error, not an open server."""
    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise BrainforgeError(f"the API key variable {env} (algorithm.server.api_key_env / --api-key-env) is not set; "
                              f"export {env}=<key>, or drop api_key_env to serve without a key")
    return key


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")


def _validate_body(body: Any) -> dict[str, Any]:
    """Type checks of the fields this server reads; each failure is a 400 naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if "messages" not in body:
        raise RequestError("messages is required", param="messages")

    def check(name: str, ok: bool, what: str) -> None:
        if body.get(name) is not None and not ok:
            raise RequestError(f"{name} must be {what}, got {json.dumps(body[name])[:80]}", param=name)

    def number(name: str) -> bool:
        return _is_number(body.get(name))

    def integer(name: str) -> bool:
        return isinstance(body.get(name), int) and not isinstance(body.get(name), bool)

    check("model", isinstance(body.get("model"), str), "a string")
    check("temperature", number("temperature") and body["temperature"] >= 0, "a number >= 0")
    check("top_p", number("top_p") and 0 < body["top_p"] <= 1, "a number in (0, 1]")
    for name in ("max_tokens", "max_completion_tokens"):
        check(name, integer(name) and body[name] >= 1, "an integer >= 1")
    check("n", integer("n") and body["n"] >= 1, "an integer >= 1")
    check("stream", isinstance(body.get("stream"), bool), "true or false")
    check("logprobs", isinstance(body.get("logprobs"), bool), "true or false")
    check("return_token_ids", isinstance(body.get("return_token_ids"), bool), "true or false")
    check("metadata", isinstance(body.get("metadata"), dict), "an object")
    check("tool_choice", body.get("tool_choice") in ("none", "auto", "required") or isinstance(body.get("tool_choice"), dict),
          "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}")
    check("top_logprobs", integer("top_logprobs") and body["top_logprobs"] == 0,
          "0 (this server returns only the sampled token's log-prob)")
    return body


def _stop_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of non-empty strings", param="stop")
    return list(stops)


def _cut_at_stop(text: str, stops: list[str]) -> str:
    """The text up to the first stop string, which OpenAI leaves out of the content (the
    token ids and the recorded text keep it: they are what was sampled)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


async def _sse_chunks(response: dict[str, Any]) -> AsyncIterator[str]:
    """A finished completion as OpenAI's `chat.completion.chunk` events."""
    base = {"id": response["id"], "object": "chat.completion.chunk", "created": response["created"], "model": response["model"]}
    for choice in response["choices"]:
        delta = {"role": "assistant", "content": choice["message"]["content"]}
        if choice["message"].get("tool_calls"):
            delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(choice["message"]["tool_calls"])]
        yield "data: " + json.dumps({**base, "choices": [{"index": choice["index"], "delta": delta, "logprobs": choice["logprobs"],
                                                          "finish_reason": None}]}) + "\n\n"
        yield "data: " + json.dumps({**base, "choices": [{"index": choice["index"], "delta": {},
                                                          "finish_reason": choice["finish_reason"]}]}) + "\n\n"
    yield "data: " + json.dumps({**base, "choices": [], "usage": response["usage"], "brainforge": response["brainforge"]}) + "\n\n"
    yield "data: [DONE]\n\n"
