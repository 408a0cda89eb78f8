"""A local Cloud Storage server for tests: ``gcp-storage-emulator`` run in-process on 127.0.0.1, with three
fixes the real clients need, and the environment that points them at it (no network, no credentials).

- tensorstore (orbax's array writer) reads an object's generation from ``x-goog-generation`` on
  downloads and relies on ``ifGenerationMatch`` for its OCDBT manifest rewrites; the emulator sends
  neither, so a checkpoint manager's third save fails ("Malformed StorageGeneration").
- gcsfs renames through ``.../moveTo/o/...``, which the emulator lacks (501, then a slow fallback).

Clients: ``TENSORSTORE_GCS_HTTP_URL`` (tensorstore), ``STORAGE_EMULATOR_HOST`` (gcsfs and
google-cloud-storage), anonymous tokens, and gcsfs's bucket-type probe over gRPC turned off.
"""

from __future__ import annotations

import socket
from http import HTTPStatus

from gcp_storage_emulator import server as _server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects as _objects
from gcp_storage_emulator.handlers.buckets import create_bucket


def _generation(storage, bucket: str, name: str) -> str | None:
    try:
        return storage.get_file_obj(bucket, name)["generation"]
    except NotFound:
        return None


def _with_generation_headers(handler):
    def wrapped(req, resp, storage, *args, **kwargs):
        handler(req, resp, storage, *args, **kwargs)
        if resp.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT) and "object_id" in req.params:
            try:
                meta = storage.get_file_obj(req.params["bucket_name"], req.params["object_id"])
            except NotFound:
                return
            resp["x-goog-generation"] = meta["generation"]
            resp["x-goog-metageneration"] = meta["metageneration"]
    return wrapped


def _with_preconditions(handler):
    def wrapped(req, resp, storage, *args, **kwargs):
        name = req.params.get("object_id") or (req.query.get("name") or [None])[0]
        if name:
            current = _generation(storage, req.params["bucket_name"], name) or "0"
            match = (req.query.get("ifGenerationMatch") or [None])[0]
            not_match = (req.query.get("ifGenerationNotMatch") or [None])[0]
            if match is not None and current != match:
                resp.status = HTTPStatus.PRECONDITION_FAILED
                return
            if not_match is not None and current == not_match:
                resp.status = HTTPStatus.NOT_MODIFIED if req.method == "GET" else HTTPStatus.PRECONDITION_FAILED
                return
        return handler(req, resp, storage, *args, **kwargs)
    return wrapped


def _move(req, resp, storage, *args, **kwargs):
    bucket, src, dst = req.params["bucket_name"], req.params["object_id"], req.params["dest_object_id"]
    try:
        out = _objects._copy(req.base_url, storage, bucket, src, bucket, dst)
        storage.delete_file(bucket, src)
        resp.json(out)
    except NotFound:
        resp.status = HTTPStatus.NOT_FOUND


def _patch_handlers() -> None:
    if getattr(_server, "_casa_jax_patched", False):
        return
    routes = [(rf"^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
               {"POST": _move}) for prefix in (_server.settings.API_ENDPOINT, "")]
    for pattern, handlers in _server.HANDLERS:
        handlers = dict(handlers)
        for method, fn in list(handlers.items()):
            if fn in (_objects.get, _objects.download):
                handlers[method] = _with_preconditions(_with_generation_headers(fn))
            elif fn in (_objects.insert, _objects.delete, _objects.xml_upload):
                handlers[method] = _with_preconditions(fn)
        routes.append((pattern, handlers))
    _server.HANDLERS = tuple(routes)
    _server._casa_jax_patched = True


class GcsEmulator:
    """``with GcsEmulator(("bucket",)) as gcs:`` a server on a free port; ``gcs.env`` points clients at it
    (set it before the first ``gs://`` use in a process: gcsfs caches its filesystem)."""

    def __init__(self, buckets=("bucket",)):
        _patch_handlers()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = _server.create_server("127.0.0.1", self.port, in_memory=True)
        for bucket in buckets:
            create_bucket(bucket, self._server._storage)
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "EPATH_USE_TF": "false",
                    "GOOGLE_CLOUD_PROJECT": "casa-jax-test"}

    def __enter__(self) -> "GcsEmulator":
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()
