"""Joining the hub: a project registers its signed bundle, a node enrolls for its volunteer."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select, update

from hub.db import (
    BUNDLES,
    ENROLLMENT_TOKENS,
    NODES,
    PROJECTS,
    VOLUNTEERS,
    StoreBase,
    project_info,
)
from hub.events import ProjectInfo
from hub.models import Bundle, EnrollmentToken, Node, Project, Volunteer
from issc.errors import AuthError, KeyFormatError, StoreError
from issc.manifest import Manifest
from issc.nodeauth import node_id_for


def hash_token(token: str) -> str:
    """The stored form of an enrollment token.

    A plain SHA-256 is enough: tokens are 192 random bits, so there is nothing to guess
    that a slow hash would protect; the hash only keeps a stolen database from holding
    usable tokens.
    """
    return hashlib.sha256(token.encode()).hexdigest()


class EnrollmentStore(StoreBase):
    """Part of ``Store``: projects and their bundles, volunteers and their nodes."""

    # ---- projects and bundles ---------------------------------------------------------

    def register_bundle(
        self,
        manifest: Manifest,
        digest: str,
        content: bytes,
        now: float,
        rotated_from: str | None = None,
    ) -> tuple[ProjectInfo, bool]:
        """Register a new project or a newer version; returns (project, changed).

        ``rotated_from``: the pinned owner key from which the caller verified an
        endorsement chain to this bundle's signer (``issc.rotation``); the pin moves on.

        Raises StoreError if another key signed the project before (and it is not
        ``rotated_from``), or if the version is not newer than the registered one (an
        identical bundle is not an error).
        """
        with self.engine.begin() as conn:
            row = conn.execute(select(PROJECTS).where(Project.name == manifest.name)).first()
            if row is not None:
                if row.owner_key not in (manifest.owner_key, rotated_from):
                    raise StoreError(
                        f"project {manifest.name!r} is registered with another owner key "
                        f"({row.owner_key}); this bundle is signed by {manifest.owner_key}"
                    )
                if row.digest == digest:
                    return project_info(row), False
                if manifest.version <= row.version:
                    raise StoreError(
                        f"project {manifest.name!r} version {manifest.version} is not newer "
                        f"than the registered version {row.version}"
                    )
            values = {
                "version": manifest.version,
                "digest": digest,
                "size": len(content),
                "mode": manifest.mode,
                "quorum": manifest.quorum,
                "output_mb": manifest.limits.output_mb,
                "wall_seconds": manifest.limits.wall_seconds,
                "tolerance": manifest.tolerance,
            }
            if row is None:
                project_id = conn.execute(
                    insert(PROJECTS).values(
                        name=manifest.name,
                        owner_key=manifest.owner_key,
                        paused=False,
                        created_at=now,
                        **values,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            else:
                project_id = row.id
                values["owner_key"] = manifest.owner_key  # the same, or rotated to
                conn.execute(update(PROJECTS).where(Project.id == project_id).values(**values))
            conn.execute(
                insert(BUNDLES).values(
                    digest=digest,
                    project_id=project_id,
                    version=manifest.version,
                    size=len(content),
                    content=content,
                    created_at=now,
                )
            )
            fresh = conn.execute(select(PROJECTS).where(Project.id == project_id)).one()
            return project_info(fresh), True

    def bundle_content(self, digest: str) -> bytes | None:
        with self.engine.connect() as conn:
            return conn.execute(select(Bundle.content).where(Bundle.digest == digest)).scalar()

    def bundles_by(self, project_id: int, at: float, count: int = 2) -> list[str]:
        """Digests of the project's newest ``count`` bundles registered by ``at``, newest first.

        What a lease offered at ``at`` may have named: the bundle current then, or the one
        before it if the scheduler had not yet heard of the newer one.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(Bundle.digest)
                .where(Bundle.project_id == project_id, Bundle.created_at <= at)
                .order_by(Bundle.version.desc())
                .limit(count)
            )
            return [digest for (digest,) in rows]

    # ---- volunteers and nodes ---------------------------------------------------------

    def enroll_node(
        self,
        volunteer: str,
        public_key: str,
        token: str | None,
        open_registration: bool,
        address: str,
        slots: int,
        now: float,
        projects: Sequence[str] = (),
    ) -> str:
        """Admit a node that has proved it holds ``public_key``; returns its node id.

        The node's project list (from its hello) is remembered, replacing the last one.

        A known key must be enrolled for ``volunteer`` (its token, if any, is ignored).
        A new key enrolls for ``volunteer``: with a token, the token must be an unused
        one of that volunteer's and is used up by this node; without one, only under
        open registration, which also creates an unknown volunteer.

        Raises:
            AuthError: the node may not join (the message says why and what to do).
        """
        try:
            node_id = node_id_for(public_key)
        except KeyFormatError as exc:
            raise AuthError(f"the node's public key is not valid: {exc}") from None
        with self.engine.begin() as conn:
            vol_id = conn.execute(select(Volunteer.id).where(Volunteer.name == volunteer)).scalar()
            row = conn.execute(select(NODES).where(Node.id == node_id)).first()
            if row is not None:
                _check_known_node(conn, row, node_id, public_key, volunteer, vol_id)
                conn.execute(
                    update(NODES)
                    .where(Node.id == node_id)
                    .values(
                        last_seen=now,
                        address=address,
                        slots=slots,
                        projects=json.dumps(list(projects)),
                    )
                )
                return node_id
            if vol_id is None:
                if not open_registration:
                    raise AuthError(
                        f"volunteer {volunteer!r} is unknown and registration is closed: the "
                        f"hub's admin creates it with `issc-ctl volunteer add {volunteer}`, "
                        "which prints an enrollment token for `token` in node.yaml"
                    )
                vol_id = conn.execute(
                    insert(VOLUNTEERS).values(
                        name=volunteer, credit=0.0, tasks_completed=0, created_at=now
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            if token is not None:
                _use_token(conn, vol_id, volunteer, token, node_id, open_registration, now)
            elif not open_registration:
                raise AuthError(
                    f"registration is closed: a new node of volunteer {volunteer!r} needs an "
                    f"enrollment token (token: in node.yaml) from `issc-ctl volunteer add "
                    f"{volunteer}`"
                )
            conn.execute(
                insert(NODES).values(
                    id=node_id,
                    volunteer_id=vol_id,
                    public_key=public_key,
                    address=address,
                    slots=slots,
                    projects=json.dumps(list(projects)),
                    first_seen=now,
                    last_seen=now,
                )
            )
            return node_id

    def issue_token(self, volunteer: str, now: float) -> str:
        """A new one-time enrollment token for ``volunteer`` (created if new).

        Only the token's SHA-256 is stored; the token is returned once, to be printed.
        """
        token = "issc-" + secrets.token_urlsafe(24)
        with self.engine.begin() as conn:
            vol_id = conn.execute(select(Volunteer.id).where(Volunteer.name == volunteer)).scalar()
            if vol_id is None:
                vol_id = conn.execute(
                    insert(VOLUNTEERS).values(
                        name=volunteer, credit=0.0, tasks_completed=0, created_at=now
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            conn.execute(
                insert(ENROLLMENT_TOKENS).values(
                    token_hash=hash_token(token), volunteer_id=vol_id, created_at=now
                )
            )
        return token


def _check_known_node(
    conn: Any, row: Any, node_id: str, public_key: str, volunteer: str, vol_id: int | None
) -> None:
    """A returning node must present the key it enrolled with, for the same volunteer.

    Raises:
        AuthError: it does not.
    """
    if row.public_key != public_key:
        # Two keys whose ids share 32 bits: rare, but the first one keeps the id.
        raise AuthError(
            f"node id {node_id} already belongs to another key; this node must make a new "
            "one (stop it, delete node.key in its data_dir, start it again)"
        )
    if row.volunteer_id != vol_id:
        # The node proved it holds this key, so it may learn whose node it is.
        owner = conn.execute(select(Volunteer.name).where(Volunteer.id == row.volunteer_id))
        raise AuthError(
            f"node {node_id} is enrolled for volunteer {owner.scalar()!r}, not {volunteer!r}: "
            "a node's key belongs to one volunteer (a node with a new data_dir enrolls afresh)"
        )


def _use_token(
    conn: Any,
    vol_id: int,
    volunteer: str,
    token: str,
    node_id: str,
    open_registration: bool,
    now: float,
) -> None:
    """Use up one of the volunteer's enrollment tokens for ``node_id``.

    The presented token's hash is compared with every token hash of the volunteer in
    constant time (hmac.compare_digest, no early exit), so timing says nothing about
    how much of a guess was right.

    Raises:
        AuthError: the token is not one of the volunteer's, or was used already.
    """
    digest = hash_token(token)
    rows = conn.execute(
        select(EnrollmentToken.token_hash, EnrollmentToken.used_by).where(
            EnrollmentToken.volunteer_id == vol_id
        )
    ).all()
    match = None
    for row in rows:
        if hmac.compare_digest(row.token_hash, digest):
            match = row
    if match is None:
        raise AuthError(
            f"the enrollment token in node.yaml is not a token of volunteer {volunteer!r} "
            f"(check token: and volunteer:, or ask for one: `issc-ctl volunteer add {volunteer}`)"
        )
    # The WHERE on used_at makes using a token atomic, should two nodes race for it.
    used = conn.execute(
        update(ENROLLMENT_TOKENS)
        .where(EnrollmentToken.token_hash == digest, EnrollmentToken.used_at.is_(None))
        .values(used_at=now, used_by=node_id)
    )
    if used.rowcount != 1:
        hint = (
            " or remove token: from node.yaml (registration is open)" if open_registration else ""
        )
        raise AuthError(
            f"the enrollment token of volunteer {volunteer!r} was already used by node "
            f"{match.used_by}; a token enrolls one node: ask for another with `issc-ctl "
            f"volunteer add {volunteer}`{hint}"
        )
