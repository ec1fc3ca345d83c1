"""Runs gcp-storage-emulator (same arguments as `python -m gcp_storage_emulator`) with two fixes, both to match
what real Cloud Storage does and what the clients the project uses rely on.

1. Real Cloud Storage sends an object's generation as the `x-goog-generation` header (and `x-goog-metageneration`)
   with every media download (`?alt=media`); the emulator does not. tensorstore's GCS driver, which writes orbax's
   checkpoints, reads a whole object as a media download and takes its generation from that header: without it
   the generation is 0, which is no valid GCS generation, and the next conditional write on that object (OCDBT's
   manifest, `ifGenerationMatch=<generation>`) fails with "Malformed StorageGeneration". Here the emulator's
   download handler adds both headers.
2. The emulator has no `objects.move` (`POST .../o/<name>/moveTo/o/<new name>`), which gcsfs tries first for a
   rename (epath's `rename`: the workdir lock's take-over); it answers 501, which gcsfs retries for half a minute
   before copying and deleting instead. Here it moves the object (a copy and a delete in the emulator's store).

Its other gaps are left as they are; the one that matters here: preconditions (`ifGenerationMatch`,
`ifGenerationNotMatch`) are ignored, which only one writer per object (as in these tests) does not notice.

Run as a script: `python tests/gcs_emulator.py start --port=... --in-memory ...`.
"""

import functools
import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _with_generation_headers(download):
    @functools.wraps(download)
    def wrapped(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            try:
                obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            except NotFound:
                return
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])

    return wrapped


def _move(request, response, storage, *args, **kwargs):
    bucket, source, destination = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
    try:
        moved = objects._copy(request.base_url, storage, bucket, source, bucket, destination)
        storage.delete_file(bucket, source)
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    response.json(moved)


# Before the server module is imported: its routing table holds the handler functions themselves.
objects.download = _with_generation_headers(objects.download)
assert "gcp_storage_emulator.server" not in sys.modules

from gcp_storage_emulator import server, settings  # after the patch above
from gcp_storage_emulator.__main__ import main

# First: the generic object route would take "<name>/moveTo/o/<new name>" for an object's name.
_MOVE_ROUTE = (rf"^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
               r"(?P<dest_object_id>.*[^/]+)$")
server.HANDLERS = ((_MOVE_ROUTE, {"POST": _move}), *server.HANDLERS)

if __name__ == "__main__":
    main()
