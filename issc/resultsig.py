"""What a node signs when it sends a result, so nothing between it and the hub can alter it.

A relay (or anyone in the path before TLS) could change a task's input on its way to a
node, or the result on its way back. The node therefore signs, with its own key, a
transcript of what it was given and what it returns; the hub rebuilds the "given" half
from what it offered and checks the signature against the node's enrolled key. Any
change to the task, bundle digest, input, input files, result, error, times or output
files makes the check fail.

JSON values enter the transcript as the SHA-256 of their canonical JSON (sorted keys,
no spaces, UTF-8), so the node and the hub agree on the bytes whatever order a map's
keys travelled in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from issc.errors import AuthError

DOMAIN = b"issc-result-v1\x00"  # like issc-node-auth-v1 and issc-bundle-v1
"""Prefix of every transcript: a result signature is never valid as anything else."""


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
    """The bytes a node signs for one result."""
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


def sign_result(key: Ed25519PrivateKey, node_id: str, given: Given, returned: Returned) -> bytes:
    """The node's signature over one result."""
    return key.sign(transcript(node_id, given, returned))


def verify_result(
    public_key: Ed25519PublicKey, signature: bytes, node_id: str, given: Given, returned: Returned
) -> None:
    """Raise AuthError unless ``signature`` is the node's over exactly this result."""
    try:
        public_key.verify(signature, transcript(node_id, given, returned))
    except InvalidSignature:
        raise AuthError(
            "the result's signature does not match what the hub offered and the node "
            "returned (altered on the way)"
        ) from None
