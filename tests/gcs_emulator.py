"""Runs gcp-storage-emulator (same arguments as `python -m gcp_storage_emulator`) with one fix to its responses.

Real Cloud Storage sends an object's generation as the `x-goog-generation` header (and `x-goog-metageneration`)
with every media download (`?alt=media`); the emulator does not. tensorstore's GCS driver, which writes orbax's
checkpoints, reads a whole object as a media download and takes its generation from that header: without it the
generation is 0, which is no valid GCS generation, and the next conditional write on that object (OCDBT's
manifest, `ifGenerationMatch=<generation>`) fails with "Malformed StorageGeneration". Here the emulator's download
handler adds both headers, as real Cloud Storage does. Its other gaps are left as they are; the one that matters
here: preconditions (`ifGenerationMatch`, `ifGenerationNotMatch`) are ignored, which only one writer per object
(as in these tests) does not notice.

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


# Before the server module is imported: its routing table holds the handler functions themselves.
objects.download = _with_generation_headers(objects.download)
assert "gcp_storage_emulator.server" not in sys.modules

from gcp_storage_emulator.__main__ import main

if __name__ == "__main__":
    main()
