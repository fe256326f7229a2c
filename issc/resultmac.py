"""How a result is authenticated, so nothing between the node and the hub can alter it.

A relay (or anyone in the path before TLS) could change a task's input on its way to a
node, or the result on its way back. The node therefore authenticates a transcript of
what it was given and what it returns with an HMAC under its connection's result key
(issc.nodeauth.result_key, which only the node and the hub hold); the hub rebuilds the
"given" half from what it offered and checks the HMAC. Any change to the task, bundle
digest, input, input files, result, error, times or output files makes the check fail.

The HMAC is over the transcript's SHA-256 (``transcript_digest``), so that a node keeps
that digest with its spooled result, computed once, and authenticates it anew on every
connection it sends the result over.

JSON values enter the transcript as the SHA-256 of their canonical JSON (sorted keys,
no spaces, UTF-8), so the node and the hub agree on the bytes whatever order a map's
keys travelled in.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

from issc.errors import AuthError

DOMAIN = b"issc-result-v2\x00"  # like issc-node-auth-v2 and issc-bundle-v1
"""Prefix of every transcript: a result's HMAC is never valid for anything else."""
MAC_BYTES = 32
"""Length of ``result.mac`` (HMAC-SHA256)."""


def json_digest(value: object) -> str:
    """Hex SHA-256 of ``value``'s canonical JSON.

    Raises:
        ValueError: ``value`` is not JSON (NaN or infinity, a string with a lone
            surrogate, which is not UTF-8): nothing the protocol would carry either.
        TypeError: ``value`` holds something JSON has no form for.
    """
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


FileTriple = tuple[str, str, int]  # (name, sha256, size)


@dataclass(frozen=True, slots=True)
class Given:
    """What the hub offered for one lease, as the node received it."""

    lease: int
    project: str
    task: str
    bundle_digest: str
    input_digest: str  # json_digest of the task's input
    input_files: tuple[FileTriple, ...]


@dataclass(frozen=True, slots=True)
class Returned:
    """What the node sends back for that lease."""

    ok: bool
    result_digest: str  # json_digest of the result (of None for a failure)
    error: str | None
    cpu_seconds: float
    wall_seconds: float
    output_files: tuple[FileTriple, ...]


def transcript(node_id: str, given: Given, returned: Returned) -> bytes:
    """The bytes that stand for one result (their SHA-256 is authenticated)."""
    body = [
        node_id,
        given.lease,
        given.project,
        given.task,
        given.bundle_digest,
        given.input_digest,
        [list(f) for f in given.input_files],
        returned.ok,
        returned.result_digest,
        returned.error,
        float(returned.cpu_seconds),
        float(returned.wall_seconds),
        [list(f) for f in returned.output_files],
    ]
    return DOMAIN + msgpack.packb(body, use_bin_type=True)


def files_of(refs: Sequence[object]) -> tuple[FileTriple, ...]:
    """(name, sha256, size) of FileRef-like objects, ``{"name", "sha256", "size"}`` maps
    or such triples already."""
    out = []
    for ref in refs:
        if isinstance(ref, dict):
            out.append((str(ref["name"]), str(ref["sha256"]), int(ref["size"])))
        elif isinstance(ref, tuple | list):
            name, sha256, size = ref
            out.append((str(name), str(sha256), int(size)))
        else:
            out.append((ref.name, ref.sha256, ref.size))  # type: ignore[attr-defined]
    return tuple(out)


def given_of(
    lease: int,
    project: str,
    task: str,
    bundle_digest: str,
    input_value: object,
    files: Sequence[object],
) -> Given:
    """The Given of an offer: its input as json_digest, its files as (name, sha256, size).

    Raises ValueError or TypeError as json_digest.
    """
    return Given(lease, project, task, bundle_digest, json_digest(input_value), files_of(files))


def returned_of(
    ok: bool,
    result: object,
    error: str | None,
    cpu_seconds: float,
    wall_seconds: float,
    files: Sequence[object],
) -> Returned:
    """The Returned of a result's fields as they travel (a failure's ``result`` counts as
    null, as the hub reads it).

    Raises ValueError or TypeError as json_digest.
    """
    digest = json_digest(result if ok else None)
    return Returned(ok, digest, error, cpu_seconds, wall_seconds, files_of(files))


def transcript_digest(node_id: str, given: Given, returned: Returned) -> bytes:
    """SHA-256 of the transcript of one result.

    Raises:
        ValueError: a string in it is not UTF-8 (a lone surrogate): it could not travel.
    """
    return hashlib.sha256(transcript(node_id, given, returned)).digest()


def result_mac(key: bytes, digest: bytes) -> bytes:
    """The ``result.mac`` of a result whose transcript_digest is ``digest``."""
    return hmac.digest(key, digest, "sha256")


def check_result_mac(key: bytes, mac: bytes, digest: bytes) -> None:
    """Raise AuthError unless ``mac`` is the HMAC of ``digest`` under ``key``."""
    if not hmac.compare_digest(result_mac(key, digest), mac):
        raise AuthError(
            "the result's HMAC does not match what the hub offered and the node "
            "returned (altered on the way)"
        )
