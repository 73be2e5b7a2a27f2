"""``rebuild-codec-server``: decodes payloads for the Temporal Web UI and CLI (the codec protocol).

POST ``/decode`` and ``/encode`` take and return ``{"payloads": [...]}`` in protobuf JSON, for a caller
with a bearer token of the tokens file (``NAME TOKEN`` lines, as the API's; scopes are not used here:
whoever may decode, may decode everything). Without a token a payload stays sealed: the codec server
is the key's proxy, so it is guarded like the key.

Callers: the Temporal CLI (``--codec-endpoint ... --codec-auth 'Bearer TOKEN'``), and the Web UI, which
calls from the operator's browser. The UI sends its user's access token as ``Authorization`` when
``TEMPORAL_CODEC_PASS_ACCESS_TOKEN=true``; so the tokens the UI's sign-in issues, or a proxy in front
that checks them and sets one of this file's, are what reach it. CORS: only the origin named with
``--web-origin`` gets CORS headers; a preflight (``OPTIONS``, which carries no token) from it is answered
with the methods and headers the UI sends, any other origin's is refused (403); every answer says
``Vary: Origin`` so no cache hands one origin's answer to another.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from aiohttp import hdrs, web
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from common.codec import CodecKeyError, EncryptionCodec, load_key
from starter.api_clients import ApiClients, TokensFileError

app = typer.Typer(add_completion=False)
# What the Web UI sends with a codec call (its namespace, and the token when it passes one).
ALLOWED_HEADERS = "authorization,content-type,x-namespace"
PREFLIGHT_MAX_AGE = "600"


def build_app(codec: EncryptionCodec, web_origin: str | None, clients: ApiClients) -> web.Application:
    def cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        response.headers[hdrs.VARY] = "Origin"
        if web_origin and request.headers.get(hdrs.ORIGIN) == web_origin:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = web_origin
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
        return response

    async def preflight(request: web.Request) -> web.StreamResponse:
        if not web_origin or request.headers.get(hdrs.ORIGIN) != web_origin:
            return cors(request, web.json_response({"error": "origin not allowed"}, status=403))
        response = web.Response(status=204)
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = "POST, OPTIONS"
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ALLOWED_HEADERS
        response.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = PREFLIGHT_MAX_AGE
        return cors(request, response)

    def handler(
        step: Callable[[Sequence[Payload]], Awaitable[list[Payload]]],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            if clients.identify(request.headers.get(hdrs.AUTHORIZATION, "")) is None:
                refused = web.json_response({"error": "missing or wrong bearer token"}, status=401)
                refused.headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
                return cors(request, refused)
            try:
                payloads = json_format.Parse(await request.read(), Payloads())
                result = Payloads(payloads=await step(payloads.payloads))
            except (json_format.ParseError, CodecKeyError, ValueError) as err:
                return cors(request, web.json_response({"error": str(err)}, status=400))
            return cors(
                request, web.Response(text=json_format.MessageToJson(result), content_type="application/json")
            )

        return handle

    application = web.Application()
    application.router.add_route("OPTIONS", "/{tail:.*}", preflight)
    application.router.add_post("/decode", handler(codec.decode))
    application.router.add_post("/encode", handler(codec.encode))
    return application


def _credential(name: str) -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    path = Path(directory, name) if directory else None
    return path if path is not None and path.exists() else None


@app.command()
def run(
    key_file: Annotated[
        Path | None,
        typer.Option(
            envvar="REBUILD_CODEC_KEY_FILE",
            help="The 256-bit key (64 hex digits) workers and starters use "
            "(default: $CREDENTIALS_DIRECTORY/codec-key).",
        ),
    ] = None,
    tokens_file: Annotated[
        Path | None,
        typer.Option(
            envvar="REBUILD_CODEC_TOKENS_FILE",
            help="Who may decode: NAME TOKEN a line (default: $CREDENTIALS_DIRECTORY/codec-tokens).",
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8081,
    listen: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    web_origin: Annotated[
        str | None, typer.Option(help="The Web UI's origin allowed to call (e.g. http://localhost:8233).")
    ] = None,
) -> None:
    """Serve the codec protocol so the Web UI shows encrypted rebuild inputs to those with a token."""
    try:
        key_file = key_file or _credential("codec-key")
        tokens_file = tokens_file or _credential("codec-tokens")
        if key_file is None:
            raise CodecKeyError("no codec key: give --key-file or load the credential codec-key")
        if tokens_file is None:
            raise TokensFileError("no tokens file: give --tokens-file or load the credential codec-tokens")
        codec = EncryptionCodec(load_key(key_file))
        clients = ApiClients.load(tokens_file)
    except (CodecKeyError, TokensFileError) as err:
        print(f"rebuild-codec-server: {err}")
        raise typer.Exit(2) from None
    web.run_app(build_app(codec, web_origin, clients), host=listen, port=port, print=None)


def main() -> None:
    app()
