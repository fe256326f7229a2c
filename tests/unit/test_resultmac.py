"""Result authentication (issc.resultmac): what a node authenticates, and what the hub checks."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import msgpack
import pytest

from issc.errors import AuthError
from issc.protocol import FileRef
from issc.resultmac import (
    DOMAIN,
    MAC_BYTES,
    Given,
    Returned,
    check_result_mac,
    files_of,
    given_of,
    json_digest,
    result_mac,
    returned_of,
    transcript,
    transcript_digest,
)

KEY = b"\x21" * 32  # a connection's result key (issc.nodeauth.result_key)
OTHER_KEY = b"\x22" * 32
NODE = "n-0badcafe"
SHA_A, SHA_B = "a" * 64, "b" * 64

GIVEN = given_of(
    7,
    "primes",
    "r-17",
    "d" * 64,
    {"n": 1000, "ratio": 0.1, "tags": ["x", "y"]},
    [FileRef(name="data.bin", sha256=SHA_A, size=5120)],
)
RETURNED = returned_of(
    True,
    {"count": 168, "largest": 997, "mean": 453.137},
    None,
    0.41,
    0.5,
    [{"name": "out.txt", "sha256": SHA_B, "size": 12}],
)


def mac_of(given: Given = GIVEN, returned: Returned = RETURNED, node: str = NODE) -> bytes:
    return result_mac(KEY, transcript_digest(node, given, returned))


def check(
    mac: bytes, given: Given = GIVEN, returned: Returned = RETURNED, key: bytes = KEY
) -> None:
    check_result_mac(key, mac, transcript_digest(NODE, given, returned))


def test_a_mac_checks_against_the_same_transcript() -> None:
    check(mac_of())
    assert len(mac_of()) == MAC_BYTES


def test_the_mac_is_deterministic_for_a_key() -> None:
    # A result spooled and sent again over the same connection carries the same bytes.
    assert mac_of() == mac_of()


@pytest.mark.parametrize(
    "change",
    [
        {"lease": 8},
        {"project": "primes2"},
        {"task": "r-18"},
        {"bundle_digest": "e" * 64},
        {"input_digest": json_digest({"n": 1001, "ratio": 0.1, "tags": ["x", "y"]})},
        {"input_files": ()},
        {"input_files": (("data.bin", SHA_B, 5120),)},
        {"input_files": (("data.bin", SHA_A, 5121),)},
        {"input_files": (("other.bin", SHA_A, 5120),)},
    ],
)
def test_any_change_to_what_was_given_fails(change: dict[str, Any]) -> None:
    other = dataclasses.replace(GIVEN, **change)
    with pytest.raises(AuthError, match="altered on the way"):
        check(mac_of(), given=other)


@pytest.mark.parametrize(
    "change",
    [
        {"ok": False},
        {"result_digest": json_digest({"count": 169, "largest": 997, "mean": 453.137})},
        {"result_digest": json_digest(None)},
        {"error": ""},
        {"error": "boom"},
        {"cpu_seconds": 0.42},
        {"wall_seconds": 0.0},
        {"output_files": ()},
        {"output_files": (("out.txt", SHA_A, 12),)},
        {"output_files": (("out.txt", SHA_B, 13),)},
    ],
)
def test_any_change_to_what_was_returned_fails(change: dict[str, Any]) -> None:
    other = dataclasses.replace(RETURNED, **change)
    with pytest.raises(AuthError):
        check(mac_of(), returned=other)


def test_another_key_or_node_id_or_a_truncated_mac_fails() -> None:
    with pytest.raises(AuthError):
        check(mac_of(), key=OTHER_KEY)
    with pytest.raises(AuthError):
        check(mac_of(node="n-00000000"))
    for bad in (b"", mac_of()[:31], mac_of() + b"\x00", bytes(32)):
        with pytest.raises(AuthError):
            check(bad)


def test_the_transcript_is_domain_separated() -> None:
    data = transcript(NODE, GIVEN, RETURNED)
    assert data.startswith(DOMAIN)
    # Nothing else starts like this (proofs, bundles use other domains).
    assert not data.startswith(b"issc-node-auth") and not data.startswith(b"issc-bundle-v1")


def test_map_key_order_does_not_matter() -> None:
    forward = {"a": 1, "b": {"x": [1, 2.5], "y": None}, "c": "é"}
    backward = {"c": "é", "b": {"y": None, "x": [1, 2.5]}, "a": 1}
    assert list(forward) != list(backward)
    assert json_digest(forward) == json_digest(backward)
    returned = returned_of(True, backward, None, 0.41, 0.5, RETURNED.output_files)
    given = dataclasses.replace(GIVEN, input_digest=json_digest(backward))
    mac = mac_of(
        dataclasses.replace(GIVEN, input_digest=json_digest(forward)),
        returned_of(True, forward, None, 0.41, 0.5, RETURNED.output_files),
    )
    check(mac, given, returned)


def test_digests_survive_the_trips_a_value_makes() -> None:
    """A result goes node -> JSON spool -> msgpack -> hub; the digest must not change."""
    value = {
        "f": [0.1, 1e-300, 1.7976931348623157e308, -0.0, 1.0, 2.5e-8],
        "i": [0, -1, 2**63 - 1, -(2**63)],
        "s": ["", "é", "\u2603", "a\nb", "\x00"],
        "nested": [[[]], {}],
        "t": True,
        "n": None,
    }
    through_json = json.loads(json.dumps(value))
    through_msgpack = msgpack.unpackb(msgpack.packb(through_json, use_bin_type=True), raw=False)
    assert json_digest(value) == json_digest(through_json) == json_digest(through_msgpack)
    # ...and the types stay apart: 1 and 1.0 are different results.
    assert json_digest(1) != json_digest(1.0)


def test_a_failure_counts_as_a_null_result() -> None:
    assert returned_of(False, {"ignored": 1}, "boom", 0, 0, []).result_digest == json_digest(None)


def test_values_that_cannot_travel_are_refused() -> None:
    with pytest.raises(ValueError):
        json_digest(float("nan"))
    with pytest.raises(ValueError):
        json_digest({"s": "\ud800"})  # a lone surrogate is not UTF-8


def test_files_of_takes_refs_and_spool_entries_alike() -> None:
    ref = FileRef(name="a", sha256=SHA_A, size=3)
    entry = {"name": "a", "sha256": SHA_A, "size": 3}
    assert files_of([ref]) == files_of([entry]) == (("a", SHA_A, 3),)
