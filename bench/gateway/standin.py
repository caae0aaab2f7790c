"""An instant stand-in for llama-server, for measuring the gateway's own latency.

    python -m bench.gateway.standin PORT [DELAY_MS]

Answers `/health` and `/v1/chat/completions` at once: a short JSON completion, or,
for `stream: true`, nine SSE events shaped like llama-server's and `[DONE]`, closing
the connection after a stream as llama-server does. With no model in the way,
the difference between asking it directly and through the gateway is the
gateway's own cost. DELAY_MS (default 0) holds every completion that long
before its answer, as a host computing it would: the gateway then waits idle
between requests, as it does in front of llama-server.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

EVENTS = 9
DELAY = web.AppKey("delay", float)


def _event(index: int) -> bytes:
    chunk = {
        "choices": [{"finish_reason": None, "index": 0, "delta": {"content": f" t{index}"}}],
        "created": 0,
        "id": "chatcmpl-standin",
        "model": "standin",
        "object": "chat.completion.chunk",
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


STREAM = [_event(i) for i in range(EVENTS)] + [b"data: [DONE]\n\n"]
ANSWER = json.dumps(
    {
        "choices": [{"finish_reason": "length", "index": 0, "message": {"content": "t0"}}],
        "object": "chat.completion",
        "usage": {"completion_tokens": 1, "prompt_tokens": 5, "total_tokens": 6},
    }
).encode()


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    delay = request.app[DELAY]
    if delay:
        await asyncio.sleep(delay)
    if body.get("stream") is not True:
        return web.Response(body=ANSWER, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    response.force_close()
    await response.prepare(request)
    for event in STREAM:
        await response.write(event)
    await response.write_eof()
    return response


def main(argv: list[str]) -> int:
    app = web.Application()
    app[DELAY] = float(argv[1]) / 1000 if len(argv) > 1 else 0.0
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=int(argv[0]), access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
