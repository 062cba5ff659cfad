"""`python -m cprec.serve OUT_DIR`: the HTTP recommendation server (see cprec/serve/server.py)."""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import signal
import sys
import time

import uvicorn

from cprec.errors import CprecError, exit_on_user_error
from cprec.serve.http import uvicorn_config
from cprec.serve.recommender import Recommender
from cprec.serve.server import SESSIONS_FILE, Server, ServerConfig


class GracefulServer(uvicorn.Server):
    """uvicorn's server, but SIGTERM / SIGINT end with exit status 0 once the requests in flight are
    answered (uvicorn re-raises a caught signal after its graceful shutdown: the process would die of it)."""

    on_started = staticmethod(lambda: None)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)  # after the lifespan's warm-up: now listening
        if self.started:
            self.on_started()

    @contextlib.contextmanager
    def capture_signals(self):
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _parser() -> argparse.ArgumentParser:
    d = ServerConfig()
    p = argparse.ArgumentParser(prog="python -m cprec.serve", description=__doc__)
    p.add_argument("artifact", help="an export directory (python -m cprec.export RUN OUT_DIR)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="requests per computed batch (1 turns batching off)")
    p.add_argument("--batch-timeout-ms", type=float, default=d.batch_timeout_ms,
                   help="how long the first request of a batch waits for others")
    p.add_argument("--sessions", type=int, default=d.sessions, help="cached sessions (least recently used out)")
    p.add_argument("--session-bytes", type=int, default=d.session_bytes, help="bytes of cached sessions at most")
    p.add_argument("--session-dir", default=None, metavar="DIR",
                   help=f"keep the sessions across restarts: saved to DIR/{SESSIONS_FILE} (atomically) when the "
                        "server stops on SIGTERM / SIGINT, loaded from it at start")
    p.add_argument("--context", choices=("window", "stream"), default="window",
                   help="what a stateless /v1/recommend reads of a history (sessions always stream)")
    p.add_argument("--length-buckets", default="auto", metavar="auto|none|W,W,...",
                   help="history widths a stateless batch is encoded at (auto: 16, 32, ... up to the context; "
                        "none: always the whole context, one compiled width, a faster start)")
    p.add_argument("--no-warmup", action="store_true", help="answer at once and compile shapes on first use")
    p.add_argument("--compile-cache", default="auto", metavar="DIR|auto|none",
                   help="keep compiled programs in DIR (jax's persistent cache): a restart of the same model "
                        f"skips most compilation; auto (default): {default_compile_cache()}; none: off")
    return p


def default_compile_cache() -> str:
    """The persistent compilation cache's default directory: the user's cache directory."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cprec", "jax-compile")


def _length_buckets(text: str) -> str | None | list[int]:
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return [int(w) for w in text.split(",")]
    except ValueError:
        raise CprecError(f"--length-buckets {text!r} is invalid: give auto, none or widths such as 16,32") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    with exit_on_user_error():
        if args.max_batch_size < 1 or args.batch_timeout_ms < 0 or args.sessions < 1:
            raise CprecError("--max-batch-size and --sessions must be >= 1 and --batch-timeout-ms >= 0")
        cache = default_compile_cache() if args.compile_cache == "auto" else args.compile_cache
        if cache != "none":
            import jax

            jax.config.update("jax_compilation_cache_dir", cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        rec = Recommender.load(args.artifact, context=args.context, max_batch=args.max_batch_size,
                               length_buckets=_length_buckets(args.length_buckets))
        config = ServerConfig(max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms,
                              sessions=args.sessions, session_bytes=args.session_bytes, warmup=not args.no_warmup,
                              session_dir=args.session_dir)
        server = Server(rec, config)  # its start-up freezes the long-lived objects out of the gc's way
        loaded = _load_sessions(server, args.session_dir)
        m = rec.artifact.manifest
        print(f"cprec.serve: {args.artifact} ({rec.num_items - 1:,} items, {m.get('param_count', 0):,} parameters, "
              f"{m.get('dtype')}, {m.get('total_bytes', 0):,} bytes); batches of up to {args.max_batch_size} "
              f"within {args.batch_timeout_ms:g} ms{loaded}; compiling...", flush=True)
    uv = GracefulServer(uvicorn_config(server.app, host=args.host, port=args.port, log_level="warning",
                                       timeout_graceful_shutdown=30))
    uv.on_started = lambda: print(f"cprec.serve: ready on http://{args.host}:{args.port} in "
                                  f"{time.perf_counter() - start:.1f} s ({server.compiling} shapes left to compile "
                                  "in the background)", flush=True)
    uv.run()
    print("cprec.serve: stopped", flush=True)
    return 1 if getattr(server, "save_error", None) else 0


def _load_sessions(server: Server, session_dir: str | None) -> str:
    """Loads DIR/sessions.npz if there is one (a CprecError, before anything is written, if it is not
    this model's); a short note for the start-up line."""
    if not session_dir:
        return ""
    directory = pathlib.Path(session_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CprecError(f"--session-dir {directory} cannot be created ({e})") from None
    path = directory / SESSIONS_FILE
    count = server.store.load(path) if path.exists() else 0
    return f"; {count:,} sessions loaded from {path}"


if __name__ == "__main__":
    sys.exit(main())
