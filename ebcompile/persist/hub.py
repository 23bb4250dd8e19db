"""Hub model names on the command line fail fast: with ``HF_HUB_OFFLINE`` set, or with the hub unreachable (one
TCP connect, ``PROBE_S`` seconds at most), a name not in the local Hugging Face cache is one ``CheckpointError``
line at once, not minutes of retries; a cached one loads from the cache without asking the hub."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

from ..errors import CheckpointError

__all__ = ["hub_kwargs", "PROBE_S"]

PROBE_S = 3.0  # a TCP connect to the hub takes well under a second when it is reachable


def _offline() -> bool:
    import huggingface_hub.constants as hub

    flags = (os.environ.get(k, "").strip().upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return hub.HF_HUB_OFFLINE or any(f in {"1", "ON", "YES", "TRUE"} for f in flags)


def _cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repository id: not cached
        return False


def _reachable(endpoint: str, timeout: float = PROBE_S) -> bool:
    """Whether a TCP connection to ``endpoint`` opens within ``timeout`` (name resolution included)."""
    url = urlsplit(endpoint)
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(ok)


def hub_kwargs(name: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for the hub name ``name`` (not a local folder): ``{}`` when the hub
    is reachable, ``local_files_only=True`` when it is not but ``name`` is cached; otherwise a ``CheckpointError``."""
    import huggingface_hub.constants as hub

    if _offline():
        if _cached(name):
            return {"local_files_only": True}
        raise CheckpointError(f"{name}: no such local folder, and not in the Hugging Face cache (HF_HUB_OFFLINE is set, so "
                              "the hub is not asked). Fix: check the name or path, or unset HF_HUB_OFFLINE to download it.")
    if _reachable(hub.ENDPOINT):
        return {}
    if _cached(name):
        return {"local_files_only": True}
    raise CheckpointError(f"{name}: no such local folder, not in the Hugging Face cache, and the hub ({hub.ENDPOINT}) "
                          f"cannot be reached within {PROBE_S:.0f} s. Fix: check the name or path, or connect to the "
                          "network (set HF_HUB_OFFLINE=1 to use only cached models).")
