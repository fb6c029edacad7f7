"""Flower's SuperLink with only the Fleet API on the sites' address.

Flower 1.41's SuperLink is one FastAPI app serving the Fleet API (``/v1/fleet``: what
sites call), the Control API (``/v1/control``: list runs, register node keys, start runs
with an app bundle whose code then runs on this host) and the Runtime API
(``/v1/runtime``: the ServerApp's) on one host and port; open-source Flower checks no
account on the Control API. Whoever could reach the sites' address could run code here.

So ``fedrnn server`` runs Flower's own app (``flwr.superlink.main.create_app``, configured
by Flower's own flag parser) in one uvicorn server with two listening sockets:

- the sites' address (``--public HOST:PORT``), where an ASGI route filter in front of the
  app answers ``/v1/fleet/...`` and nothing else (404, without reaching Flower's app);
- a loopback port (Flower's ``--host``/``--port``), with everything: ``fedrnn server``
  uses its Control API, and Flower's ServerApp process its Runtime API.

One app, one lifespan: both sockets share Flower's state. TLS, node authentication and
everything else are Flower's, with Flower's flags. The filter keys on the socket a
connection arrived on (ASGI's ``scope["server"]``), so it holds for every peer, loopback
ones included.

Run as ``python -m fedrnn.server.superlink --public HOST:PORT [flower-superlink flags]``.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

FLEET_PREFIX = "/v1/fleet/"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class FleetOnly:
    """ASGI middleware: requests that arrive on ``public_port`` reach the app only for the
    Fleet API; every other path there is answered 404 by this filter itself."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]],
                 public_port: int) -> None:
        self.app = app
        self.public_port = public_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self._public(scope) \
                and not str(scope.get("path", "")).startswith(FLEET_PREFIX):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"not found\n"})
            return
        await self.app(scope, receive, send)

    def _public(self, scope: Scope) -> bool:
        server = scope.get("server")
        # no socket address (never the case with uvicorn's TCP sockets): treat as public
        return server is None or int(server[1]) == self.public_port


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> None:
    """Parse ``--public``, hand the rest to Flower's own SuperLink flag parser, and serve
    Flower's app on both sockets."""
    import importlib

    import uvicorn
    from flwr.superlink.main import create_app

    # the module (its package exports a function of the same name)
    flower = importlib.import_module("flwr.superlink.cli.flower_superlink")

    parser = argparse.ArgumentParser(prog="python -m fedrnn.server.superlink")
    parser.add_argument("--public", required=True, metavar="HOST:PORT",
                        help="the sites' address: the Fleet API only")
    args, flower_args = parser.parse_known_args(argv)
    host, _, port = args.public.rpartition(":")
    public_host, public_port = host.strip("[]"), int(port)

    sys.argv = ["flower-superlink", *flower_args]
    config = flower._parse_superlink_lifespan_config()  # Flower's flags, Flower's checks
    app = FleetOnly(create_app(config, flower.SuperLinkLifespan), public_port)
    sockets = [_bind(public_host, public_port), _bind(config.host, config.port)]
    server = uvicorn.Server(uvicorn.Config(
        app=app, reload=False, access_log=True, workers=1,
        log_config=flower.get_uvicorn_log_config(flower.console_handler.level),
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile))
    server.run(sockets=sockets)


if __name__ == "__main__":
    main()
