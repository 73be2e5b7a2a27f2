"""``rebuild-codec-server``: decodes payloads for the Temporal Web UI and CLI (the codec protocol).

POST ``/decode`` and ``/encode`` take and return ``{"payloads": [...]}`` in protobuf JSON. Only the
Web UI origin named with ``--web-origin`` gets CORS headers; bind it where only operators reach it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from aiohttp import hdrs, web
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from common.codec import CodecKeyError, EncryptionCodec, load_key

app = typer.Typer(add_completion=False)


def build_app(codec: EncryptionCodec, web_origin: str | None) -> web.Application:
    def cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        if web_origin and request.headers.get(hdrs.ORIGIN) == web_origin:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = web_origin
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = "POST"
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = "content-type,x-namespace"
        return response

    async def options(request: web.Request) -> web.StreamResponse:
        return cors(request, web.Response())

    def handler(
        step: Callable[[Sequence[Payload]], Awaitable[list[Payload]]],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
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
    application.router.add_route("OPTIONS", "/{tail:.*}", options)
    application.router.add_post("/decode", handler(codec.decode))
    application.router.add_post("/encode", handler(codec.encode))
    return application


@app.command()
def run(
    key_file: Annotated[Path, typer.Option(help="The 256-bit key (64 hex digits) workers and starters use.")],
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8081,
    listen: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    web_origin: Annotated[
        str | None, typer.Option(help="The Web UI's origin allowed to call (e.g. http://localhost:8233).")
    ] = None,
) -> None:
    """Serve the codec protocol so the Web UI shows encrypted rebuild inputs to those who reach it."""
    try:
        codec = EncryptionCodec(load_key(key_file))
    except CodecKeyError as err:
        print(f"rebuild-codec-server: {err}")
        raise typer.Exit(2) from None
    web.run_app(build_app(codec, web_origin), host=listen, port=port, print=None)


def main() -> None:
    app()
