"""A real uvicorn server on a loopback port, in a thread, for tests that use real HTTP clients."""
from __future__ import annotations

import contextlib
import threading


@contextlib.contextmanager
def serving(app):
    """Serve `app` on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(400):
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
