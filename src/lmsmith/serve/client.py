"""What the HTTP API asks of whatever generates: the in-process engine here, a pool of servers in `upstream`.

The API never touches the engine directly: it hands a `GenerateRequest` (model name, chat messages or a
text prompt, sampling) to a client, which turns it into chunks. `LocalClient` wraps `lmsmith.serve.engine`:
tokenizing runs on a small thread pool (`run_in_executor`), never on the event loop and never on the
engine's thread, so an engine step does not wait on HTTP and HTTP does not wait on a step. Each request's
chunks flow from the engine thread to its consumer through a queue (producer and consumer).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Protocol

from lmsmith.errors import UserError
from lmsmith.serve.config import PushBack
from lmsmith.serve.engine import Chunk, Engine
from lmsmith.serve.protocol import model_card
from lmsmith.serve.sampling import SamplingParams

TOKENIZER_THREADS = 2

log = logging.getLogger("lmsmith.serve")


@dataclass(frozen=True)
class GenerateRequest:
    """One generation as the API understood it: chat `messages`, a text `prompt` or `prompt_ids`, one of them."""

    model: str
    params: SamplingParams
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None  # functions the chat template shows the model

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else "completion"

    @property
    def wants_logprobs(self) -> bool:
        return self.params.logprobs is not None or self.params.prompt_logprobs is not None


@dataclass
class Prepared:
    """A request ready to run: its prompt token ids where the client tokenizes (the local engine does)."""

    request: GenerateRequest
    prompt_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int | None:
        return None if self.prompt_ids is None else len(self.prompt_ids)


class ClientError(Exception):
    """A request the client refuses; the API answers with `status` in OpenAI's error schema."""

    status = 400
    type_ = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class Busy(ClientError):
    """The queue is full: 503 with Retry-After (push-back, not a failure)."""

    status = 503
    type_ = "server_error"
    retry_after_s = 1


class Forbidden(ClientError):
    status = 403
    type_ = "permission_error"


class ModelNotFound(ClientError):
    status = 404

    def __init__(self, requested: str, served: list[str]):
        listed = ", ".join(repr(name) for name in served) or "none"
        super().__init__(f"The model '{requested}' does not exist; served: {listed}", "model", "model_not_found")


class ContextLengthExceeded(ClientError):
    def __init__(self, prompt_tokens: int, window: int, param: str):
        super().__init__(
            f"the input takes {prompt_tokens} tokens; this model's context is {window} "
            f"(send long_doc: true to map-reduce it in chunks)",
            param, "context_length_exceeded",
        )


class NotReady(ClientError):
    status = 503
    type_ = "server_error"


class UpstreamRejected(ClientError):
    """An upstream answered with an error: passed on with its status and message."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message, param, code)
        self.status = status
        self.type_ = type_ or ("server_error" if status >= 500 else "invalid_request_error")


class Tokenizer(Protocol):
    """The slice of an HF fast tokenizer that long_doc uses."""

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


class ModelClient(Protocol):
    """The API's view of a generation backend."""

    @property
    def ready(self) -> bool: ...

    @property
    def alive(self) -> bool: ...

    @property
    def context_window(self) -> int | None: ...

    @property
    def tokenizer(self) -> Tokenizer | None: ...

    def model_cards(self) -> list[dict[str, Any]]: ...

    def check_model(self, model: str) -> None: ...

    async def prepare(self, request: GenerateRequest) -> Prepared: ...

    async def open(self, prepared: Prepared) -> AsyncIterator[Chunk]: ...

    async def add_lora(self, name: str, path: str) -> list[str]: ...

    async def remove_lora(self, name: str) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class LocalClient:
    """The in-process engine behind the API. Created empty, so the server can answer /readyz while loading."""

    def __init__(self, model_name: str, engine: Engine | None = None, adapter_root: Path | None = None,
                 push_back: PushBack | None = None):
        self.model_name = model_name
        self.adapter_root = adapter_root
        # the queue's bounds: requests (and their prompt tokens) waiting for a slot beyond which new ones are
        # turned away; unbounded unless given (the server passes its settings)
        self.push_back = push_back or PushBack(max_waiting=None, max_waiting_tokens=None)
        self.created = int(time.time())
        self._engine = engine
        self._adapters: dict[str, str] = {}  # name -> folder, of the adapters loaded through this client
        self._adapter_lock = asyncio.Lock()
        self._tokenizer_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="lmsmith-tokenize")
        self._ready = threading.Event()
        self.version: dict[str, Any] | None = None  # the registry version served, when serving one
        if engine is not None:
            self._ready.set()

    def attach(self, engine: Engine, adapters: dict[str, str] | None = None) -> None:
        """The engine has loaded (on another thread): load the startup adapters, then start answering."""
        self._engine = engine
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)
        self._ready.set()

    def swap(self, engine: Engine, version: dict[str, Any] | None = None, drain_timeout_s: float = 600.0) -> Engine:
        """Serve `engine` from now on (a registry promote or rollback), without a restart.

        The adapters loaded so far are loaded into it first; requests already running finish on the old
        engine, which is closed on a background thread once it is idle. Returns the old engine."""
        for name, path in self._adapters.items():
            engine.add_lora(name, path)
        old, self._engine, self.version = self._engine, engine, version
        self._ready.set()

        def close_when_idle() -> None:
            deadline = time.monotonic() + drain_timeout_s
            while time.monotonic() < deadline:
                counts = old.stats()
                if not counts.get("running") and not counts.get("waiting"):
                    break
                time.sleep(0.05)
            old.close()

        if old is not None:
            threading.Thread(target=close_when_idle, name="lmsmith-drain", daemon=True).start()
        return old

    async def start(self) -> None:
        """Nothing to start: the engine runs its own thread (the upstream client opens connections here)."""

    @property
    def engine(self) -> Engine:
        if self._engine is None or not self._ready.is_set():
            raise NotReady("the model is still loading; retry when /readyz answers 200")
        return self._engine

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._engine is not None and self._engine.healthy

    @property
    def alive(self) -> bool:
        """False only when the engine's thread has died (liveness); a loading engine is alive."""
        return self._engine is None or self._engine.healthy

    @property
    def context_window(self) -> int | None:
        return self.engine.max_context

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    # ----- models and adapters -----

    def adapter_names(self) -> list[str]:
        return sorted(self._adapters)

    def model_cards(self) -> list[dict[str, Any]]:
        cards = [model_card(self.model_name, self.created)]
        if self.version is not None:
            cards[0]["version"] = self.version
        cards += [model_card(name, self.created, parent=self.model_name) for name in self.adapter_names()]
        return cards

    def check_model(self, model: str) -> None:
        if model != self.model_name and model not in self.adapter_names():
            raise ModelNotFound(model, [self.model_name, *self.adapter_names()])

    def load_adapter(self, name: str, path: str, shown: str | None = None) -> None:
        """Load a peft adapter under `name` now, on this thread (it reads weights): startup and admin calls.

        `shown` is how errors name the folder (the caller's relative name over the API, never the real path)."""
        shown = path if shown is None else shown
        if self._engine is None:
            raise NotReady("the model is still loading")
        if name == self.model_name:
            raise ClientError(f"'{name}' is the base model's name; pick another adapter name", "name")
        if name in self._adapters:
            raise ClientError(f"an adapter named '{name}' is already loaded; DELETE it first", "name", "adapter_exists")
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ClientError(f"{shown}: no such adapter folder", "path")
        try:
            self._engine.add_lora(name, str(folder))
        except (ValueError, OSError, UserError) as exc:
            if shown != path:  # over the API: the reason may hold server paths; the log keeps it
                log.warning("adapter %s (%s) failed to load: %s", name, folder, exc)
                raise ClientError(f"{shown}: not a LoRA adapter this model can load", "path") from None
            raise ClientError(f"{path}: cannot load the adapter: {exc}", "path") from None
        self._adapters[name] = str(folder)

    async def add_lora(self, name: str, path: str) -> list[str]:
        """`POST /admin/loras`: only a folder under `adapter_root`, named relative to it."""
        if not self.ready:
            raise NotReady("the model is still loading; retry when /readyz answers 200")
        folder = self.adapter_folder(path)
        async with self._adapter_lock:
            await asyncio.get_running_loop().run_in_executor(None, self.load_adapter, name, str(folder), path)
        return self.adapter_names()

    def adapter_folder(self, path: str) -> Path:
        """`path` resolved under the adapter root; errors name only what the caller sent."""
        if self.adapter_root is None:
            raise Forbidden("this server loads adapters only at start (--lora); start it with --adapter-root DIR "
                            "to load them by name over the API", "path")
        refused = ClientError(f"path: {path!r} must be a folder name relative to the adapter root", "path")
        if not path.strip() or "\x00" in path or len(path.encode("utf-8", "replace")) > 1024:
            raise refused
        root = self.adapter_root.resolve()
        relative = Path(path)
        if relative.is_absolute() or ".." in relative.parts or path.startswith("~"):
            raise refused
        try:
            folder = (root / relative).resolve()
            if not folder.is_relative_to(root):  # a symlink out of the root
                raise refused
            found = folder.is_dir()
        except (OSError, ValueError, RuntimeError):  # too long a name, a symlink loop: never a 500
            raise refused from None
        if not found:
            raise ClientError(f"path: no adapter {path!r} under the adapter root", "path")
        return folder

    async def remove_lora(self, name: str) -> None:
        engine = self.engine
        async with self._adapter_lock:
            if name not in self.adapter_names():
                raise ModelNotFound(name, self.adapter_names())
            await asyncio.get_running_loop().run_in_executor(None, engine.remove_lora, name)
            del self._adapters[name]

    # ----- generation -----

    async def prepare(self, request: GenerateRequest) -> Prepared:
        """Tokenize on the tokenizer pool: the chat template for messages, the plain text for a prompt."""
        engine = self.engine
        limit = self.push_back.max_waiting
        if limit is not None and engine.stats()["waiting"] >= limit:
            raise Busy(f"the server is overloaded: {limit} requests are already waiting; retry later")
        loop = asyncio.get_running_loop()
        extra: dict[str, Any] = {"engine": engine}
        if request.params.grammar is not None:
            try:
                extra["constraint"] = await loop.run_in_executor(self._tokenizer_pool, engine.constrain,
                                                                 request.params.grammar)
            except ValueError as exc:
                raise ClientError(f"the requested structure cannot be enforced with this model's tokenizer: {exc}",
                                  "tools" if request.tools else "response_format") from None
        if request.messages is not None:
            try:
                ids = await loop.run_in_executor(self._tokenizer_pool, engine.encode_chat, request.messages,
                                                 request.tools)
            except ValueError as exc:
                raise ClientError(str(exc), "tools" if str(exc).startswith("tools:") else "messages") from None
        elif request.prompt_ids is not None:
            ids = list(request.prompt_ids)
            vocab = engine.vocab_size
            if max(ids) >= vocab:
                raise ClientError(f"token id {max(ids)} is outside the model's vocabulary (0..{vocab - 1})", "prompt")
        else:
            ids = await loop.run_in_executor(self._tokenizer_pool, self._encode_text, request.prompt or "")
            if not ids:
                raise ClientError("the prompt is empty", "prompt")
        limit = self.push_back.max_waiting_tokens
        waiting_tokens = engine.stats()["waiting_tokens"]
        if limit is not None and waiting_tokens and waiting_tokens + len(ids) > limit:
            raise Busy(f"the server is overloaded: {waiting_tokens:,} prompt tokens are already waiting; retry later")
        # Opened on the engine that tokenized it, even if a registry swap happens in between.
        return Prepared(request, ids, extra)

    def _encode_text(self, text: str) -> list[int]:
        return [int(i) for i in self.engine.tokenizer(text, add_special_tokens=True)["input_ids"]]

    async def open(self, prepared: Prepared) -> AsyncIterator[Chunk]:
        engine = prepared.extra.get("engine") or self.engine
        assert prepared.prompt_ids is not None, "a LocalClient request is prepared by LocalClient.prepare"
        model = prepared.request.model
        adapter = None if model == self.model_name else model
        return engine.stream(prepared.prompt_ids, prepared.request.params, lora=adapter,
                             constraint=prepared.extra.get("constraint"))

    def stats(self) -> dict[str, Any]:
        if self._engine is None:
            return {}
        return dict(self._engine.stats())

    async def close(self) -> None:
        """Stop the tokenizer threads; the engine belongs to whoever loaded it, who closes it."""
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
