"""An OpenAI-compatible HTTP server for GLM-4 (FastAPI + uvicorn): `glm4 serve` / `python -m paddle_glm4.server`.

This module only parses the command line and starts the server; importing it needs neither FastAPI nor uvicorn,
so the rest of the command line works without them. The API itself is in app.py.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from typing import TYPE_CHECKING

from ..cli_errors import EXIT_ERROR, UsageError
from ..engine import add_engine_arguments

if TYPE_CHECKING:
    from fastapi import FastAPI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens the "
        "server to the network, so set --api-key)",
    )
    parser.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: 8000; 0: any free port, printed at start)"
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("GLM4_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every request (default: $GLM4_API_KEY; "
        "unset: no key needed; an empty KEY is an error, not 'no key')",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=8,
        metavar="N",
        help="requests admitted at once, those generating and those waiting for their turn; "
        "more get HTTP 429 (default: 8)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=8,
        metavar="N",
        help="requests generated together, one batched forward per token for all of them "
        "(continuous batching; default: 8)",
    )
    parser.add_argument(
        "--kv-cache-memory",
        metavar="SIZE",
        help="the most memory the batch's KV cache may take, e.g. 2GB or 512MiB; requests wait "
        "for room (default: --max-num-seqs full contexts, at most half the memory available "
        "once the model is loaded)",
    )
    parser.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model id in /v1/models and in responses (default: the --model directory's name)",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=1024,
        metavar="N",
        help="answer length for requests without max_tokens, capped by the room left in the context (default: 1024)",
    )


def run(args: argparse.Namespace) -> int:
    """Load the model and serve until interrupted. A busy port or a bad flag fails before the (slow) load."""
    if args.max_concurrency < 1 or args.default_max_tokens < 1 or args.max_num_seqs < 1:
        raise UsageError("--max-concurrency, --max-num-seqs and --default-max-tokens must be at least 1")
    kv_cache_memory = None
    if args.kv_cache_memory is not None:
        from ..checkpoint import parse_size

        try:
            kv_cache_memory = parse_size(args.kv_cache_memory)
        except ValueError as err:
            raise UsageError(f"--kv-cache-memory: {err}") from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {args.port}")
    check_api_key(args.api_key)
    try:
        from .app import create_app
    except ImportError as err:
        raise UsageError(
            f"the server needs FastAPI and uvicorn ({err}); install them with "
            "`pip install -e '.[serve]'` in the project's directory"
        ) from None
    from ..engine import load_engine_from_args

    if args.tensor_parallel != 1 and os.environ.get("PADDLE_TRAINER_ID", "0") != "0":
        load_engine_from_args(args)  # another rank than 0: runs rank 0's forwards, never listens, then exits
    sock = bind(args.host, args.port)
    if args.api_key is None and not is_loopback(sock):
        print(
            f"WARNING: listening on {args.host} without --api-key: anyone who can reach this address can use "
            "the model. Set --api-key (or $GLM4_API_KEY), or listen on 127.0.0.1.",
            file=sys.stderr,
            flush=True,
        )
    try:
        model, tokenizer = load_engine_from_args(args)
    except BaseException:
        sock.close()
        raise
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(
        model,
        tokenizer,
        name,
        args.api_key,
        args.max_concurrency,
        args.default_max_tokens,
        args.max_num_seqs,
        kv_cache_memory,
    )
    return serve(app, sock, name)


def check_api_key(key: str | None) -> None:
    """None means no authentication; anything else must be a usable key. An empty key (`--api-key "$UNSET"`)
    must not silently turn authentication off, and a key with surrounding whitespace could never match, since
    HTTP strips it from header values."""
    if key is None:
        return
    if not key.strip():
        raise UsageError("--api-key (or $GLM4_API_KEY) is empty; give a key, or leave both unset to serve without one")
    if key != key.strip() or not key.isprintable() or not key.isascii():
        raise UsageError("--api-key must be printable ASCII without leading or trailing whitespace")


def is_loopback(sock: socket.socket) -> bool:
    """Whether the socket only accepts connections from this machine."""
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def serve(app: FastAPI, sock: socket.socket, name: str) -> int:
    """Serve `app` on `sock` until Ctrl-C or SIGTERM."""
    import uvicorn

    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving {name} at http://{url_host}:{port}/v1 (OpenAI-compatible API)", file=sys.stderr, flush=True)
    # On shutdown, open streams get a few seconds to finish before they are cut (which cancels their generation).
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0 if server.started else EXIT_ERROR
