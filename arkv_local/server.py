"""`arkv-server`: llama-cpp-python's OpenAI-compatible server, serving `arkv_local.Llama`.

The app, its routes (/v1/completions, /v1/chat/completions, /v1/models, ...), its settings
and its flags are llama_cpp.server's; this module adds arkv_local.Llama's KV knobs as flags
(`--kv_policy`, `--kv_budget`, ...: every kv_* / arkv_* argument of Llama.__init__), loads the
model through arkv_local.Llama, and shows the KV memory: `GET /v1/kv` (kv_stats() as JSON)
and the `X-KV-Bytes-Used` / `X-KV-Bytes-Budget` headers on every /v1 response.

Under a policy without --n_ctx, a conversation may run to the model's trained length in the
budget's memory (default 2048 tokens, llama_cpp.server's n_ctx); --kv_policy full is
llama_cpp.server's own f16 cache.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import re
import sys
import types
import typing
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, NoReturn, Optional, Union

try:
    import uvicorn
    from fastapi import APIRouter, Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from pydantic import Field, ValidationError, create_model
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import MutableHeaders
    from starlette.responses import JSONResponse
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as e:  # pragma: no cover: the message is the point
    raise SystemExit(f"arkv-server needs the server extra: pip install 'arkv_local[server]' "
                     f"({e})") from None

# the package's __init__ has bound llama_cpp to our libllama before any of these imports
import llama_cpp
import llama_cpp.server.app as lcs_app
import llama_cpp.server.model as lcs_model
from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
from llama_cpp.server.errors import ErrorResponseFormatters, RouteErrorHandler
from llama_cpp.server.settings import ConfigFileSettings, ModelSettings, ServerSettings

from .llama import KV_POLICIES, Llama
from .models import default_model_path

DEFAULT_POLICY = "arkv"  # the server's point is a bounded cache; "full" is llama_cpp's own
# where the server's defaults differ from Llama's (its docstring gives the help of each knob)
SERVER_NOTES = {
    "kv_policy": "Here: a policy name; the server's default is arkv.",
    "kv_budget": "Here, under a policy with no --n_ctx: 2048 (llama_cpp.server's n_ctx), "
                 "and the window is the model's trained length.",
}
HEADER_USED = "X-KV-Bytes-Used"
HEADER_BUDGET = "X-KV-Bytes-Budget"


# --- settings: llama_cpp.server's, plus arkv_local.Llama's knobs --------------------------

def _cli_type(hint: Any) -> Any:
    """The type a knob takes as a flag or a setting (None: none it can spell). Unions lose
    what a flag cannot spell (a Policy instance), paths are strings, tuples are lists (so
    that llama_cpp's add_args_from_model gives them nargs="*"); typing.Optional, not `|`,
    because add_args_from_model recognizes typing.Union only."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [t for t in map(_cli_type, args) if t is not None and t is not type(None)]
        if not options:
            return None
        return Optional[options[0]] if type(None) in args else options[0]  # noqa: UP045
    if origin in (tuple, list):
        item = _cli_type(args[0]) if args else str
        return None if item is None else list[item]
    if hint is os.PathLike or origin is os.PathLike:
        return str
    if origin is Literal:
        return hint
    return hint if hint in (str, int, float, bool, type(None)) else None


def _knob_help(name: str, doc: str) -> str:
    """The entry of Llama's docstring that names the knob, on one line."""
    for entry in re.split(r"\n(?=\S)", doc):  # an entry: a line and its indented ones
        if re.search(rf"\b{name}\b", entry):
            return " ".join(entry.split())
    return f"arkv_local.Llama's {name}"


def llama_knobs() -> dict[str, inspect.Parameter]:
    """The KV arguments of arkv_local.Llama.__init__ (every kv_* / arkv_* one), read from its
    signature so that a knob added there is a flag here without a change."""
    params = inspect.signature(Llama.__init__).parameters
    return {name: p for name, p in params.items()
            if name.startswith(("kv_", "arkv_")) and name not in ModelSettings.model_fields}


def _knob_fields() -> dict[str, Any]:
    """pydantic field definitions for the knobs: their types, defaults and help."""
    hints = typing.get_type_hints(Llama.__init__)
    doc = inspect.getdoc(Llama) or ""
    fields: dict[str, Any] = {}
    for name, param in llama_knobs().items():
        default = DEFAULT_POLICY if name == "kv_policy" else param.default
        if default is inspect.Parameter.empty:
            default = None  # not given: Llama's own error names it
        kind = _cli_type(hints.get(name, str)) or str
        if isinstance(default, tuple):
            default = list(default)
        help_text = " ".join(filter(None, (_knob_help(name, doc), SERVER_NOTES.get(name))))
        fields[name] = (kind, Field(default=default, description=help_text))
    return fields


ArkvModelSettings = create_model(  # type: ignore[call-overload]
    "ArkvModelSettings",
    __base__=ModelSettings,
    __doc__="llama_cpp.server's model settings plus arkv_local.Llama's KV knobs.",
    model=(Optional[str], Field(  # noqa: UP045
        default=None, description="GGUF file (default: arkv_local's default model, "
                                  "SmolLM2-135M-Instruct, cached from PyPI)")),
    **_knob_fields(),
)


class ArkvSettings(ServerSettings, ArkvModelSettings):  # type: ignore[misc, valid-type]
    """Every flag: the server's and the model's."""


class ArkvConfigFileSettings(ConfigFileSettings):
    """A --config_file whose models may set the KV knobs."""

    models: list[ArkvModelSettings] = Field(default=[], description="Model configs")  # type: ignore[valid-type]


def llama_kwargs(settings: ModelSettings, kwargs: dict[str, Any]) -> dict[str, Any]:
    """llama_cpp.server's arguments for a model (`kwargs`) as arkv_local.Llama takes them:
    the knobs given added (and kv_policy, whose default here is arkv); under a policy with no
    n_ctx set, no n_ctx (the window is the trained length), logits_all off unless set (its
    buffer grows with the window: set it, with --n_ctx, for logprobs), and a budget of
    llama_cpp.server's n_ctx unless one is set."""
    kwargs = dict(kwargs)
    for name in llama_knobs():
        if name not in settings.model_fields_set and name != "kv_policy":
            continue  # not given: Llama's own default (kv_policy: the server's)
        kwargs[name] = _llama_value(getattr(settings, name, None))
    policy = kwargs.get("kv_policy", "full")
    if policy != "full" and "n_ctx" not in settings.model_fields_set:
        if "logits_all" not in settings.model_fields_set:
            kwargs["logits_all"] = False
        if not kwargs.get("logits_all"):
            kwargs.pop("n_ctx", None)
        if kwargs.get("kv_budget") is None and kwargs.get("kv_budget_bytes") is None:
            kwargs["kv_budget"] = settings.n_ctx
    return kwargs


def _llama_value(value: Any) -> Any:
    """A setting's value as Llama takes it: "none" is a flag's way to say None (--kv_spill
    none), a list stands for a tuple (a flag's nargs, a config file's array)."""
    if isinstance(value, str) and value.lower() == "none":
        return None
    return tuple(value) if isinstance(value, list) else value


# --- the model: arkv_local.Llama, its KV bytes recorded per request -----------------------

# per request (set by KVHeaders, filled in the worker thread that served it): its KV bytes
_request_kv: ContextVar[dict[str, int] | None] = ContextVar("arkv_request_kv", default=None)
_last_kv: dict[str, int] = {}  # after the last request served, for answers sent before theirs


class ServedLlama(Llama):
    """arkv_local.Llama that records its KV bytes after each completion (chat completions go
    through create_completion too), while it still holds the server's model lock."""

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        result = super().create_completion(*args, **kwargs)
        if isinstance(result, dict):
            self._record_kv()
            return result
        return self._record_after(result)

    def _record_after(self, chunks: Iterator[Any]) -> Iterator[Any]:
        """A streamed completion: the bytes once its last chunk is out."""
        yield from chunks
        self._record_kv()

    def _record_kv(self) -> None:
        stats = self.kv_stats()
        kv = {HEADER_USED: stats.bytes_used, HEADER_BUDGET: stats.bytes_budget}
        _last_kv.update(kv)
        holder = _request_kv.get()
        if holder is not None:
            holder.update(kv)


@dataclasses.dataclass
class _Loader:
    """What llama_cpp.server's loader calls `llama_cpp.Llama`: ServedLlama with the knobs."""

    settings: ModelSettings

    def __call__(self, model_path: str | None = None, **kwargs: Any) -> Llama:
        return ServedLlama(model_path, **llama_kwargs(self.settings, kwargs))

    def from_pretrained(self, repo_id: str, filename: str | None, **kwargs: Any) -> Llama:
        return ServedLlama.from_pretrained(repo_id, filename,
                                           **llama_kwargs(self.settings, kwargs))


class _LlamaCppView(types.SimpleNamespace):
    """The llama_cpp module as llama_cpp.server.model sees it while loading: all of it, but
    `Llama` is our loader (its chat handlers, caches and options stay llama_cpp's)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(llama_cpp, name)


class ArkvLlamaProxy(lcs_model.LlamaProxy):
    """llama_cpp.server's model holder, loading arkv_local.Llama with the settings' knobs."""

    @staticmethod
    def load_llama_from_model_settings(settings: ModelSettings) -> llama_cpp.Llama:
        view = _LlamaCppView(Llama=_Loader(settings))
        with _replaced(lcs_model, "llama_cpp", view):
            return lcs_model.LlamaProxy.load_llama_from_model_settings(settings)


@contextlib.contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """owner.name is value within the block (models load at start-up, or under the lock)."""
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


# --- the app: llama_cpp.server's, plus /v1/kv and the KV headers --------------------------

kv_router = APIRouter()


@kv_router.get("/v1/kv", summary="KV cache", tags=["arkv_local"],
               dependencies=[Depends(lcs_app.authenticate)])
async def get_kv() -> dict[str, Any]:
    """kv_stats() of the model served: bytes in use and budget, per layer O/Q/E counts.
    Under the inner model lock only: waiting for the outer one would interrupt a stream."""
    async with lcs_app.llama_inner_lock:
        # the model loaded now (calling the proxy without a name would load the default one)
        proxy = lcs_app._llama_proxy
        llama = getattr(proxy, "_current_model", None) or proxy()  # type: ignore[misc]
        stats = await run_in_threadpool(llama.kv_stats)
    return {"kv_policy": llama.kv_policy, **dataclasses.asdict(stats)}


class KVHeaders:
    """ASGI middleware: /v1 responses carry the KV bytes in use and the budget, as the
    request left them (a streamed answer's headers go first: as the last request left them)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        holder: dict[str, int] = {}
        token = _request_kv.set(holder)

        async def send_with_kv(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in (holder or _last_kv).items():
                    headers[name] = str(value)
            await send(message)

        try:
            await self.app(scope, receive, send_with_kv)
        finally:
            _request_kv.reset(token)


class RejectBadJSON:
    """ASGI middleware: a POST to /v1 whose body is not a JSON object gets a 400 that says so
    (llama_cpp.server's error handler re-reads the body as JSON, and fails with a bare 500)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" \
                or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        problem = _json_object_problem(body)
        if problem is not None:
            error = {"message": problem, "type": "invalid_request_error", "param": None,
                     "code": None}
            await JSONResponse({"error": error}, status_code=400)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _json_object_problem(body: bytes) -> str | None:
    """What keeps a request body from being a JSON object, or None."""
    if not body.strip():
        return "the request body is empty: send a JSON object"
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"the request body is not valid JSON: {e}"
    if not isinstance(value, dict):
        return f"the request body must be a JSON object, not {type(value).__name__}"
    return None


_lcs_error_message = RouteErrorHandler.error_message_wrapper


def _error_message(route: RouteErrorHandler, error: Exception,
                   body: Any = None) -> tuple[int, Any]:
    """llama_cpp.server's error answer, except that a body that does not validate is the
    client's error: 400, naming the fields (llama_cpp.server answers 500 with a traceback)."""
    if isinstance(error, RequestValidationError):
        problems = [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in error.errors()]
        first = error.errors()[0]["loc"] if error.errors() else ()
        return 400, {"message": "invalid request: " + "; ".join(problems),
                     "type": "invalid_request_error",
                     "param": ".".join(map(str, first[1:])) or None, "code": None}
    return _lcs_error_message(route, error, body)


def _install_error_answers() -> None:
    """llama_cpp.server's route class (its routes are built from it, in this process): bad
    bodies answered 400, and arkv_local.Llama's "N positions exceed the context window of W"
    answered as llama_cpp's own context_length_exceeded (400, naming the window)."""
    RouteErrorHandler.error_message_wrapper = _error_message  # type: ignore[method-assign]
    RouteErrorHandler.pattern_and_formatters.setdefault(
        re.compile(r"(\d+) positions exceed the context window of (\d+)"),
        ErrorResponseFormatters.context_length_exceeded)


def create_app(server_settings: ServerSettings,
               model_settings: list[ModelSettings]) -> FastAPI:
    """llama_cpp.server's app (routes, errors, auth, CORS) over arkv_local.Llama, with
    /v1/kv, the KV headers and 400s for bad bodies. Loads the first model."""
    _install_error_answers()
    with _replaced(lcs_app, "LlamaProxy", ArkvLlamaProxy):
        app = lcs_app.create_app(server_settings=server_settings,
                                 model_settings=model_settings)
    app.include_router(kv_router)
    app.add_middleware(RejectBadJSON)
    app.add_middleware(KVHeaders)
    return app


# --- the command line -------------------------------------------------------------------

def fail(message: str) -> NoReturn:
    """One line naming the problem, exit code 2 (argparse's, for bad input)."""
    print(f"arkv-server: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _one_line(e: ValidationError) -> str:
    """pydantic's errors as one line: '--flag: what is wrong; ...'."""
    return "; ".join(f"--{'.'.join(map(str, err['loc']))}: {err['msg']}"
                     for err in e.errors())


def parse_args(argv: list[str] | None) -> tuple[ServerSettings, list[ModelSettings]]:
    """The flags (llama_cpp.server's and the knobs) or a --config_file, as settings."""
    parser = argparse.ArgumentParser(
        prog="arkv-server",
        description="OpenAI-compatible server (llama_cpp.server) over arkv_local.Llama, "
                    "whose KV cache holds a fixed budget")
    add_args_from_model(parser, ArkvSettings)
    parser.add_argument("--config_file", help="JSON or YAML file of server and model "
                        "settings (llama_cpp.server's format; models may set the KV knobs)")
    args = parser.parse_args(argv)
    config_file = args.config_file or os.environ.pop("CONFIG_FILE", None)
    try:
        if config_file:
            config = _read_config(Path(config_file))
            return ServerSettings.model_validate(config), list(config.models)
        return (parse_model_from_args(ServerSettings, args),
                [parse_model_from_args(ArkvModelSettings, args)])
    except ValidationError as e:
        fail(_one_line(e))


def _read_config(path: Path) -> ArkvConfigFileSettings:
    """A config file (JSON, or YAML by its suffix) as settings."""
    if not path.is_file():
        fail(f"config file {path} not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            text = json.dumps(yaml.safe_load(text))
        except yaml.YAMLError as e:
            fail(f"config file {path} is not valid YAML: {' '.join(str(e).split())}")
    return ArkvConfigFileSettings.model_validate_json(text)


class _Checked(Exception):
    """Raised where llama_cpp.Llama would start loading: the knobs passed Llama's checks."""


class _StopBeforeLoad(llama_cpp.Llama):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise _Checked


class _DryRun(Llama, _StopBeforeLoad):
    """arkv_local.Llama's own argument checks (policy, knobs, budget against the model's
    shape, read from the GGUF header) without loading the weights: its super().__init__,
    the weights' load, is _StopBeforeLoad's."""


def check_model_settings(settings: ModelSettings) -> None:
    """Fail (one line, exit 2) on knobs that arkv_local.Llama would refuse, before any load.
    The default model is filled in (fetched once, then cached)."""
    policy = getattr(settings, "kv_policy", "full")
    if policy not in KV_POLICIES:
        fail(f"unknown --kv_policy {policy!r}: choose one of {', '.join(KV_POLICIES)}")
    if settings.hf_model_repo_id is not None:
        return  # checked when it is downloaded, at load
    if settings.model is None:
        settings.model = str(default_model_path())
    kwargs = llama_kwargs(settings, {"n_ctx": settings.n_ctx, "logits_all": settings.logits_all,
                                     "verbose": False})
    try:
        _DryRun(settings.model, **kwargs)
    except _Checked:
        return
    except (ValueError, OSError) as e:
        fail(str(e).splitlines()[0])


def main(argv: list[str] | None = None) -> None:
    """Parse, check the knobs, load the model, serve until interrupted."""
    server_settings, model_settings = parse_args(argv)
    if not model_settings:
        fail("the config file lists no models")
    for settings in model_settings:
        check_model_settings(settings)
    try:
        app = create_app(server_settings, model_settings)
    except ValueError as e:  # refused at load (a downloaded model's budget, ...)
        fail(str(e).splitlines()[0])
    uvicorn.run(app, host=server_settings.host, port=server_settings.port,
                ssl_keyfile=server_settings.ssl_keyfile,
                ssl_certfile=server_settings.ssl_certfile)


if __name__ == "__main__":
    main()
