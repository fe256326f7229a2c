"""``issc-project``: the project owner's tool to make keys, pack and verify bundles, and submit.

    issc-project keygen --out KEYFILE
    issc-project pack DIR --key KEYFILE --out BUNDLE
    issc-project verify BUNDLE --pubkey PUBKEY
    issc-project submit FILE... --inbox DIR

Errors print ``issc-project: <subcommand>: <message>`` on stderr and exit with status 1;
usage errors are argparse's (status 2).
"""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from issc.bundle import bundle_digest, pack_bundle, verify_bundle
from issc.errors import IsscError
from issc.keys import generate_key, load_public_key_arg

PROG = "issc-project"
# What the hub's inbox ingests; anything else would only end up in inbox/rejected/.
SUBMITTABLE_SUFFIXES = (".issc", ".yaml", ".yml", ".jsonl")


def cmd_keygen(args: argparse.Namespace) -> None:
    """Create KEYFILE and KEYFILE.pub; print the public key string."""
    print(generate_key(Path(args.out)))


def cmd_pack(args: argparse.Namespace) -> None:
    """Pack and sign DIR into BUNDLE."""
    out = Path(args.out)
    manifest = pack_bundle(Path(args.dir), Path(args.key), out)
    print(
        f"packed {manifest.name} version {manifest.version} -> {out} (sha256 {bundle_digest(out)})"
    )


def cmd_verify(args: argparse.Namespace) -> None:
    """Verify BUNDLE against PUBKEY (a key string or a file holding one)."""
    key = load_public_key_arg(args.pubkey)
    manifest = verify_bundle(Path(args.bundle), key)
    print(f"OK: {manifest.name} version {manifest.version}, {len(manifest.files)} files")


def cmd_submit(args: argparse.Namespace) -> None:
    """Drop each FILE into the inbox atomically, in the order given.

    Every file is checked before the first is copied, so a typo in the last argument does
    not leave the first ones submitted alone.
    """
    inbox = Path(args.inbox)
    if not inbox.is_dir():
        raise IsscError(f"inbox {inbox}: not a directory")
    files = [Path(f) for f in args.files]
    _check_submission(files, inbox)
    for source in files:
        for extra in referenced_input_files(source):  # empty until input files are carried
            drop_into_inbox(extra, inbox)
        target = drop_into_inbox(source, inbox)
        print(f"submitted {source} -> {target}")


def referenced_input_files(task_file: Path) -> list[Path]:
    """Input files a task file names under ``files``, to be carried into the inbox with it.

    Seam for a later issue: carrying input files is not implemented yet, so this returns
    nothing and ``submit`` copies only the files it is given.
    """
    return []


def _check_submission(files: list[Path], inbox: Path) -> None:
    """Raises IsscError if any file cannot be submitted; names the first such file."""
    names: set[str] = set()
    for source in files:
        name = source.name
        if not source.is_file():
            raise IsscError(f"{source}: not a regular file")
        if name.startswith(".") or name.endswith(".part"):
            raise IsscError(f"{source}: the hub ignores names starting with '.' or ending in .part")
        if not name.endswith(SUBMITTABLE_SUFFIXES):
            raise IsscError(
                f"{source}: not a bundle or task file (expected {', '.join(SUBMITTABLE_SUFFIXES)})"
            )
        if name in names:
            raise IsscError(f"{source}: another file named {name} is in the same submission")
        names.add(name)
        if (inbox / name).exists():
            raise IsscError(f"{inbox / name}: already in the inbox (not yet ingested by the hub)")


def drop_into_inbox(source: Path, inbox: Path) -> Path:
    """Copy ``source`` to ``inbox/<name>`` so that the hub never sees a partial file.

    The data goes to a hidden temp name (which the hub ignores), is fsynced, and then
    appears under its real name in one step. An existing ``inbox/<name>`` is never replaced.

    Raises:
        IsscError: the target already exists, or the copy fails (the temp file is removed).
    """
    target = inbox / source.name
    tmp = inbox / f".{source.name}.{secrets.token_hex(8)}.tmp"
    try:
        _copy_synced(source, tmp)
        _publish_no_replace(tmp, target)
        _fsync_directory(inbox)
    except FileExistsError:
        raise IsscError(f"{target}: already in the inbox (not yet ingested by the hub)") from None
    except OSError as exc:
        raise IsscError(f"cannot submit {source} to {inbox}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _copy_synced(source: Path, tmp: Path) -> None:
    """Copy ``source`` to the new file ``tmp`` and fsync it. Raises OSError."""
    with source.open("rb") as src:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())


def _publish_no_replace(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the name ``target`` atomically, failing if ``target`` exists.

    os.rename would silently replace a file the hub has not ingested yet; a hard link fails
    with EEXIST instead, atomically. Where hard links are unsupported, fall back to a
    check-then-rename, which is only racy against another submitter.

    Raises:
        FileExistsError: ``target`` exists.
        OSError: anything else.
    """
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if target.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(target)) from exc
        os.rename(tmp, target)


def _fsync_directory(directory: Path) -> None:
    """Make the new directory entry durable. Raises OSError."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; subcommand names and options are part of the user contract."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Make signing keys, pack and verify project bundles, submit."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = sub.add_parser("keygen", help="create an Ed25519 key pair; print the public key")
    keygen.add_argument("--out", required=True, metavar="KEYFILE", help="private key file")
    keygen.set_defaults(handler=cmd_keygen)

    pack = sub.add_parser("pack", help="pack and sign a project directory into a bundle")
    pack.add_argument("dir", metavar="DIR", help="project directory holding project.yaml")
    pack.add_argument("--key", required=True, metavar="KEYFILE", help="private key file")
    pack.add_argument("--out", required=True, metavar="BUNDLE", help="bundle file to write")
    pack.set_defaults(handler=cmd_pack)

    verify = sub.add_parser("verify", help="verify a bundle against a public key")
    verify.add_argument("bundle", metavar="BUNDLE")
    verify.add_argument(
        "--pubkey", required=True, metavar="PUBKEY", help="public key string or file"
    )
    verify.set_defaults(handler=cmd_verify)

    submit = sub.add_parser("submit", help="drop bundles and task files into a hub's inbox")
    submit.add_argument("files", nargs="+", metavar="FILE")
    submit.add_argument("--inbox", required=True, metavar="DIR", help="the hub's inbox directory")
    submit.set_defaults(handler=cmd_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``issc-project``; return the exit status (argparse exits 2 on usage errors)."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    try:
        handler(args)
    except IsscError as exc:
        print(f"{PROG}: {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
