"""Joining the hub: a project registers its signed bundle, a node enrolls for its volunteer."""

from __future__ import annotations

import hashlib
import secrets

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
from hub.models import Bundle, Node, Project, Volunteer
from issc.errors import StoreError
from issc.manifest import Manifest


def hash_token(token: str) -> str:
    """The stored form of an enrollment token."""
    return hashlib.sha256(token.encode()).hexdigest()


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class EnrollmentStore(StoreBase):
    """Part of ``Store``: projects and their bundles, volunteers and their nodes."""

    # ---- projects and bundles ---------------------------------------------------------

    def register_bundle(
        self, manifest: Manifest, digest: str, content: bytes, now: float
    ) -> tuple[ProjectInfo, bool]:
        """Register a new project or a newer version; returns (project, changed).

        Raises StoreError if another key signed the project before, or if the version
        is not newer than the registered one (an identical bundle is not an error).
        """
        with self.engine.begin() as conn:
            row = conn.execute(select(PROJECTS).where(Project.name == manifest.name)).first()
            if row is not None:
                if row.owner_key != manifest.owner_key:
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

    # ---- volunteers and nodes ---------------------------------------------------------

    def enroll_node(
        self,
        volunteer: str,
        node_id: str | None,
        node_secret: str | None,
        open_registration: bool,
        address: str,
        slots: int,
        now: float,
    ) -> tuple[str, str]:
        """Authenticate a returning node or enroll a new one; returns (node id, secret).

        Raises StoreError naming the reason when the node may not join.
        """
        with self.engine.begin() as conn:
            vol_id = conn.execute(select(Volunteer.id).where(Volunteer.name == volunteer)).scalar()
            if vol_id is None:
                if not open_registration:
                    raise StoreError(f"unknown volunteer {volunteer!r} and registration is closed")
                vol_id = conn.execute(
                    insert(VOLUNTEERS).values(
                        name=volunteer, credit=0.0, tasks_completed=0, created_at=now
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            if node_id is not None:
                row = conn.execute(select(NODES).where(Node.id == node_id)).first()
                if row is not None:
                    if node_secret is None or _hash_secret(node_secret) != row.secret_hash:
                        raise StoreError(f"node {node_id}: wrong node secret")
                    if row.volunteer_id != vol_id:
                        raise StoreError(f"node {node_id} belongs to another volunteer")
                    conn.execute(
                        update(NODES)
                        .where(Node.id == node_id)
                        .values(last_seen=now, address=address, slots=slots)
                    )
                    assert node_secret is not None
                    return node_id, node_secret
            new_id = node_id if node_id is not None else f"n-{secrets.token_hex(4)}"
            secret = secrets.token_urlsafe(24)
            conn.execute(
                insert(NODES).values(
                    id=new_id,
                    volunteer_id=vol_id,
                    secret_hash=_hash_secret(secret),
                    address=address,
                    slots=slots,
                    first_seen=now,
                    last_seen=now,
                )
            )
            return new_id, secret

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
