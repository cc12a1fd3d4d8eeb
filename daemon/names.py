"""Names the daemon's parts must agree on, and how addresses are shown.

One definition each, imported by the modules that own the outside systems
(``stream/store.py``, ``stream/source.py``) as well as by ``config.py`` and the
query service, so none of them needs another's heavy imports:

- :data:`MODEL_NAME_PATTERN` / :data:`MODEL_NAME_RE`: model names become part of
  Redis keys and URL paths, so they stay plain;
- :func:`dlq_topic_for`: the dead-letter topic of a source topic;
- :func:`process_identity`: ``host:pid``, the lease owner and snapshot writer;
- :func:`mask_url_credentials`: a URL's password replaced by :data:`URL_MASK`
  wherever a URL is printed or logged.

This module imports only the standard library.
"""

from __future__ import annotations

import os
import re
import socket
from typing import Final

__all__ = [
    "MODEL_NAME_PATTERN",
    "MODEL_NAME_RE",
    "URL_MASK",
    "dlq_topic_for",
    "mask_url_credentials",
    "process_identity",
]

#: Model names become part of Redis keys and of the query API's paths: keep them plain.
MODEL_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MODEL_NAME_RE: Final = re.compile(MODEL_NAME_PATTERN)

#: What a URL's password is shown as.
URL_MASK: Final = "***"

# scheme://[user]:password@ -- the password runs to the last "@" before the
# authority ends ("/", whitespace, a quote or a closing bracket), as in
# urllib.parse.urlsplit, which splits userinfo at the last "@" of the netloc.
_URL_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)"
    r"(?P<user>[^:/@\s'\"<>()\[\]]*):"
    r"(?P<password>[^/\s'\"<>()\[\]]*)@"
)


def dlq_topic_for(topic: str) -> str:
    """Name of the dead-letter topic of ``topic``: ``<topic>.dlq``.

    >>> dlq_topic_for("telemetry")
    'telemetry.dlq'
    """
    return f"{topic}.dlq"


def process_identity() -> str:
    """This process as a lease owner / snapshot writer: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def mask_url_credentials(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` URL in it masked.

    Works on a bare URL and on any message that embeds one (an exception's
    text, a log line); the user name, host, port and path stay readable.
    A URL without a password is returned unchanged.

    >>> mask_url_credentials("redis://:s3cret@cache:6379/0")
    'redis://:***@cache:6379/0'
    >>> mask_url_credentials("error at rediss://app:p@ss@db:6380/1 (ping)")
    'error at rediss://app:***@db:6380/1 (ping)'
    >>> mask_url_credentials("redis://cache:6379/0")
    'redis://cache:6379/0'
    """
    if "://" not in text:
        return text
    return _URL_USERINFO.sub(
        lambda m: f"{m['scheme']}{m['user']}:{URL_MASK}@" if m["password"] else m[0], text
    )
