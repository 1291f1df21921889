"""Whether the Hugging Face Hub can be reached, so that a name that is no local folder fails at once offline.

``huggingface_hub`` retries a request that cannot connect five times with back-off (about 25 s) before it looks in
its cache. A name that is not a local folder is tried as a Hub repo id; where the Hub's host does not even resolve
or accept a connection, the package asks the cache only (``local_files_only``), which answers at once with the
same error. Behind a proxy (``HTTPS_PROXY`` and friends) no direct connection is tried and the Hub is assumed to be
reachable.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT = 2.0  # seconds to wait for the Hub's host to accept a TCP connection
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@functools.lru_cache(maxsize=None)
def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def hub_unreachable() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set or the Hub endpoint's host accepts no connection within 2 s (checked once
    per process); pass it as ``local_files_only`` to a Hub download."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return False
    endpoint = urlparse(constants.ENDPOINT)
    return not _reachable(endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https"
                                                                                    else 80))
