"""Which index an `--index` value (or MIMIC_INDEX) names, and opening it behind the one interface.

    DIR                                  an hnswlib + SQLite folder (DocumentIndex), the default
    milvus:<uri>[#<collection>]          Milvus (MilvusIndex): <uri> is what MilvusClient(uri=...) takes
        milvus:./mimic.db                  Milvus Lite, in this process (a path ending in .db)
        milvus:http://10.0.0.5:19530#webqa Milvus Standalone / Distributed / Zilliz Cloud

The collection defaults to `mimic_<first 16 characters of the model id>`; a server's token comes from
MIMIC_MILVUS_TOKEN (never from the command line, so it stays out of process listings and logs).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import ConfigError
from .base import VectorIndex

MILVUS_PREFIX = "milvus:"
TOKEN_ENV = "MIMIC_MILVUS_TOKEN"
SERVER_SCHEMES = ("http://", "https://", "tcp://")
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
EXAMPLES = "milvus:./mimic.db, milvus:http://127.0.0.1:19530 or milvus:http://127.0.0.1:19530#webqa"


@dataclass(frozen=True)
class MilvusTarget:
    uri: str
    collection: str | None  # None: named after the model id


def milvus_target(spec: str) -> MilvusTarget | None:
    """The Milvus URI and collection an `--index` value names, or None for a folder."""
    if not spec.startswith(MILVUS_PREFIX):
        return None
    uri, _, collection = spec[len(MILVUS_PREFIX):].partition("#")
    if not (uri.endswith(".db") or (uri.startswith(SERVER_SCHEMES) and len(uri.split("://", 1)[1]) > 0)):
        raise ConfigError(f"--index {spec!r}: after 'milvus:' expected a Milvus Lite file ending in .db or a server "
                          f"URI http(s)://host:port, optionally followed by #<collection>; e.g. {EXAMPLES}")
    if collection and not _COLLECTION_NAME.fullmatch(collection):
        raise ConfigError(f"--index {spec!r}: collection {collection!r} is not a Milvus collection name (a letter or _, "
                          "then letters, digits or _, at most 255)")
    return MilvusTarget(uri, collection or None)


def open_index(spec: str, dim: int, model_id: str, M: int | None = None, ef_construction: int | None = None,
               ef: int | None = None, legacy_model_ids: tuple = ()) -> VectorIndex:
    """Open or create the index `spec` names (module doc) for vectors of `model_id` (dim `dim`)."""
    target = milvus_target(spec)
    if target is None:
        from .document_index import DocumentIndex

        return DocumentIndex(spec, dim, model_id, M=M, ef_construction=ef_construction, ef=ef,
                             legacy_model_ids=legacy_model_ids)
    from .milvus import MilvusIndex

    return MilvusIndex(target.uri, dim, model_id, target.collection, M=M, ef_construction=ef_construction, ef=ef,
                       token=os.environ.get(TOKEN_ENV), legacy_model_ids=legacy_model_ids)


def describe_index(spec: str) -> dict:
    """Stats of the index `spec` names without knowing its model (`mimic-engine index info`). A folder
    is read without being opened (safe while a server holds it); Milvus Lite cannot be read while
    another process holds its file (ask that server's /v1/info)."""
    target = milvus_target(spec)
    if target is None:
        from .document_index import describe

        return describe(spec)
    from .milvus import describe_milvus

    return describe_milvus(target.uri, target.collection, os.environ.get(TOKEN_ENV))
