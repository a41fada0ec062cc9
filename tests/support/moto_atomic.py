"""moto's S3 server (``moto_server``) with conditional writes made atomic, as S3 makes them.

moto checks a PUT's ``If-Match`` / ``If-None-Match`` and then stores the object, in one of its
server's threads, with nothing between the two: two conditional PUTs of one key at once can both
pass the check, where S3 refuses the second (412) or answers 409. This runs the same server with
every conditional PutObject checked and stored under one lock; other requests are untouched.
`support.s3.MotoServer` starts this script instead of ``moto_server``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from moto.s3.responses import S3Response
from moto.server import main

_LOCK = threading.Lock()
_put_object = S3Response.put_object


def _put_object_atomically(self: S3Response) -> Any:
    if "If-Match" in self.headers or "If-None-Match" in self.headers:
        with _LOCK:
            return _put_object(self)
    return _put_object(self)


S3Response.put_object = _put_object_atomically  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
