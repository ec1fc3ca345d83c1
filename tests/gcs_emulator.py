"""Runs gcp-storage-emulator (same arguments as `python -m gcp_storage_emulator`) with three fixes, all to match
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

3. The emulator ignores preconditions; real Cloud Storage answers 412 to an upload or a delete whose
   `ifGenerationMatch` is not the object's generation (0: the object must not exist). The workdir lock's lease
   relies on them (two starters taking over one lock: one wins). Here uploads and deletes check it.

Its other gaps are left as they are.

And one instrument, for tests that must know who wrote what (one writer per file on a pod), whichever client
library wrote it (gcsfs, google-cloud-storage, tensorstore): `--client-ports=P,Q` serves the same bucket on more
ports, one per client process, and `--writes-log=FILE` records each object created (by an upload, copy or move)
as a line `<port the request came to> <bucket>/<object>`.

Run as a script: `python tests/gcs_emulator.py start --port=... --in-memory ... [--client-ports=...]
[--writes-log=...]`.
"""

import argparse
import functools
import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects
from gcp_storage_emulator.storage import Storage


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


def _with_generation_precondition(handler):
    """Answers 412 where `ifGenerationMatch` is not the object's generation (0 where there is none)."""

    @functools.wraps(handler)
    def wrapped(request, response, storage, *args, **kwargs):
        expected = request.query.get("ifGenerationMatch")
        if expected:
            object_id = request.params.get("object_id") or (request.query.get("name") or [None])[0]
            if object_id is None and isinstance(request.data, dict):  # a multipart upload names it in its metadata
                object_id = request.data["meta"].get("name")
            try:
                generation = int(storage.get_file_obj(request.params["bucket_name"], object_id)["generation"])
            except NotFound:
                generation = 0
            if generation != int(expected[0]):
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "conditionNotMet"}})
                return
        handler(request, response, storage, *args, **kwargs)

    return wrapped


# Before the server module is imported: its routing table holds the handler functions themselves.
objects.download = _with_generation_headers(objects.download)
objects.insert = _with_generation_precondition(objects.insert)
objects.delete = _with_generation_precondition(objects.delete)
assert "gcp_storage_emulator.server" not in sys.modules

from gcp_storage_emulator import server, settings  # after the patch above
from gcp_storage_emulator.__main__ import main

# First: the generic object route would take "<name>/moveTo/o/<new name>" for an object's name.
_MOVE_ROUTE = (rf"^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
               r"(?P<dest_object_id>.*[^/]+)$")
server.HANDLERS = ((_MOVE_ROUTE, {"POST": _move}), *server.HANDLERS)


def _serve_client_ports(ports):
    start = server.Server.start

    def start_with_client_ports(self):
        start(self)
        for port in ports:
            thread = server.APIThread(self._api._host, port, self._storage, daemon=True)
            thread.start()
            thread.is_running.wait()

    server.Server.start = start_with_client_ports
    # The emulator's store was written for one request at a time; its ports take turns.
    one_at_a_time = threading.Lock()
    handle = server.Router.handle

    def handle_in_turn(self, method):
        with one_at_a_time:
            handle(self, method)

    server.Router.handle = handle_in_turn


def _record_writes(log_path):
    create_file = Storage.create_file

    def recorded(self, bucket_name, file_name, *args, **kwargs):
        create_file(self, bucket_name, file_name, *args, **kwargs)
        # Each port is served by a thread of its own (server.APIThread).
        with open(log_path, "a") as log:
            log.write(f"{threading.current_thread()._port} {bucket_name}/{file_name}\n")

    Storage.create_file = recorded


if __name__ == "__main__":
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--client-ports", default="")
    parser.add_argument("--writes-log")
    ours, theirs = parser.parse_known_args()
    _serve_client_ports([int(port) for port in ours.client_ports.split(",") if port])
    if ours.writes_log:
        _record_writes(ours.writes_log)
    main(theirs)
