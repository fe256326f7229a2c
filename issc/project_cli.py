"""``issc-project``: the project owner's tool to make keys, pack and verify bundles, and submit.

    issc-project keygen --out KEYFILE
    issc-project pack DIR --key KEYFILE --out BUNDLE [--endorsements CHAINFILE]
    issc-project verify BUNDLE --pubkey PUBKEY
    issc-project submit FILE... --inbox DIR
    issc-project rotate --project NAME --old OLDKEYFILE --new NEWPUBKEY --out CHAINFILE

``rotate`` has the old key endorse the new one (``issc.rotation``) and appends that to
the chain file, which every bundle packed from then on carries (``pack --endorsements``),
so that nodes and the hub pinning any earlier key accept the new one.

``submit`` carries along the input files a task file names (``files: {NAME: PATH}``),
each to the same place relative to the inbox, before the task file itself.

Errors print ``issc-project: <subcommand>: <message>`` on stderr and exit with status 1;
usage errors are argparse's (status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import filecmp
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from issc.bundle import bundle_digest, pack_bundle, verify_bundle
from issc.errors import IsscError
from issc.fsutil import fsync_dir, rename_no_replace
from issc.keys import generate_key, load_private_key, load_public_key_arg, public_key_string
from issc.names import PLAIN_NAME_RE
from issc.rotation import extend_chain, walked_keys
from issc.taskrefs import FileReference, file_references

PROG = "issc-project"
# What the hub's inbox ingests; anything else would only end up in inbox/rejected/.
SUBMITTABLE_SUFFIXES = (".issc", ".yaml", ".yml", ".jsonl")
# An input file's NAME (``in/NAME`` on the node) and its bounds, as docs/design.md states them
# and the hub checks them (hub/blobs.py, hub/taskfile.py, hub/inputs.py).
MAX_INPUT_FILE_BYTES = 1024**3
MAX_PATH_CHARS = 1024
# The hub's own subdirectories of the inbox; an input file may not land in them.
HUB_INBOX_DIRS = ("accepted", "rejected")


def cmd_keygen(args: argparse.Namespace) -> None:
    """Create KEYFILE and KEYFILE.pub; print the public key string."""
    print(generate_key(Path(args.out)))


def cmd_pack(args: argparse.Namespace) -> None:
    """Pack and sign DIR into BUNDLE."""
    out = Path(args.out)
    chain = Path(args.endorsements) if args.endorsements else None
    manifest = pack_bundle(Path(args.dir), Path(args.key), out, endorsements=chain)
    rotations = f", key rotations: {len(manifest.endorsements)}" if manifest.endorsements else ""
    print(
        f"packed {manifest.name} version {manifest.version} -> {out} "
        f"(sha256 {bundle_digest(out)}{rotations})"
    )


def cmd_verify(args: argparse.Namespace) -> None:
    """Verify BUNDLE against PUBKEY (a key string or a file holding one)."""
    key = load_public_key_arg(args.pubkey)
    manifest = verify_bundle(Path(args.bundle), key)
    walked = walked_keys(manifest, public_key_string(key))
    via = (
        f", signed by {manifest.owner_key} (key rotations walked: {len(walked)})" if walked else ""
    )
    print(f"OK: {manifest.name} version {manifest.version}, {len(manifest.files)} files{via}")


def cmd_rotate(args: argparse.Namespace) -> None:
    """Endorse NEWPUBKEY with OLDKEYFILE for PROJECT; append it to CHAINFILE."""
    old = load_private_key(Path(args.old))
    new = load_public_key_arg(args.new)
    out = Path(args.out)
    chain = extend_chain(out, args.project, old, new)
    print(
        f"{args.project}: {public_key_string(old.public_key())} endorses "
        f"{public_key_string(new)} -> {out} (rotations in the chain: {len(chain)}); "
        f"pack every later bundle with --key NEWKEYFILE --endorsements {out}"
    )


def cmd_submit(args: argparse.Namespace) -> None:
    """Drop each FILE into the inbox atomically, in the order given, input files first.

    A task file's input files (``files: {NAME: PATH}``) go to the same place relative to
    the inbox as they have relative to the task file, before the task file itself, so the
    hub finds them when it reads the task file. Everything is checked before the first
    file is copied, so a typo in the last argument does not leave the first ones submitted
    alone.
    """
    inbox = Path(args.inbox)
    if not inbox.is_dir():
        raise IsscError(f"inbox {inbox}: not a directory")
    files = [Path(f) for f in args.files]
    _check_submission(files, inbox)
    inputs = plan_input_files(files, inbox)
    for source in files:
        for item in inputs[source]:
            if item.present or not copy_input_file(item.source, item.target):
                # Fresh mtime: the hub keeps recent input files for task files still coming.
                with contextlib.suppress(FileNotFoundError):
                    os.utime(item.target)
                print(f"{item.target}: already in the inbox with the same content, left alone")
            else:
                print(f"submitted {item.source} -> {item.target}")
        target = drop_into_inbox(source, inbox)
        print(f"submitted {source} -> {target}")


@dataclass(frozen=True, slots=True)
class InputCopy:
    """One input file to carry: ``source`` beside the task file, ``target`` in the inbox.

    ``present``: the target already holds the same content and is left alone.
    """

    source: Path
    target: Path
    present: bool


def plan_input_files(files: list[Path], inbox: Path) -> dict[Path, list[InputCopy]]:
    """The input files each task file in ``files`` brings along, each distinct path once.

    Raises:
        IsscError: a task file cannot be parsed, or a reference is unusable: a bad NAME,
            a PATH that is absolute, climbs out (``..``), is missing, is not a regular
            file, crosses a symlink, or lands on different content already in the inbox.
            The message names the task file, the line where known, and the path.
    """
    planned: dict[PurePosixPath, tuple[FileReference, InputCopy]] = {}
    plan: dict[Path, list[InputCopy]] = {}
    for task_file in files:
        plan[task_file] = []
        for ref in file_references(task_file):
            rel = _check_reference(ref)
            source = _check_source(ref, rel)
            earlier = planned.get(rel)
            if earlier is not None:
                first, item = earlier
                if not _same_file(item.source, source) and not _same_content(item.source, source):
                    raise IsscError(
                        f"{ref.where()}: input file {ref.name}: {ref.path}: {source} differs "
                        f"from {item.source} ({first.where()}), and both would land at "
                        f"{item.target}"
                    )
                continue
            target = inbox.joinpath(*rel.parts)
            item = InputCopy(source, target, _check_target(ref, source, target, inbox))
            planned[rel] = (ref, item)
            plan[task_file].append(item)
    return plan


def _check_reference(ref: FileReference) -> PurePosixPath:
    """NAME and PATH as written; returns PATH normalised (``./a//b`` is ``a/b``)."""
    if not isinstance(ref.name, str) or not PLAIN_NAME_RE.fullmatch(ref.name):
        raise IsscError(
            f"{ref.where()}: input file name {ref.name!r} must be 1-128 letters, digits, "
            "'_', '.', '-' not starting with '.' or '-'"
        )
    if not isinstance(ref.path, str) or not ref.path:
        raise IsscError(
            f"{ref.where()}: input file {ref.name}: the path must be a string, got {ref.path!r}"
        )
    where = f"{ref.where()}: input file {ref.name}: {ref.path}"
    if len(ref.path) > MAX_PATH_CHARS:
        raise IsscError(f"{where[:300]}...: the path is over {MAX_PATH_CHARS} characters")
    if "\\" in ref.path or "\x00" in ref.path:
        raise IsscError(
            f"{ref.where()}: input file {ref.name}: {ref.path!r}: a path separates its parts "
            "with '/' and holds no '\\' or NUL"
        )
    rel = PurePosixPath(ref.path)
    if rel.is_absolute():
        raise IsscError(f"{where}: an absolute path; give it relative to the task file")
    if ".." in rel.parts:
        raise IsscError(
            f"{where}: climbs out of the task file's directory ('..'); the inbox could not "
            "hold it at the same place"
        )
    if not rel.parts:
        raise IsscError(f"{where}: not a file")
    if len(rel.parts) == 1 and rel.name.endswith(SUBMITTABLE_SUFFIXES):
        raise IsscError(
            f"{where}: at the top of the inbox the hub would take it for a bundle or task file; "
            "rename it or move it into a subdirectory"
        )
    if rel.parts[0] in HUB_INBOX_DIRS:
        raise IsscError(f"{where}: would land in the hub's own inbox/{rel.parts[0]}/ directory")
    return rel


def _check_source(ref: FileReference, rel: PurePosixPath) -> Path:
    """The file beside the task file: a regular file reached without crossing a symlink."""
    where = f"{ref.where()}: input file {ref.name}: {ref.path}"
    path = ref.task_file.parent
    for depth, part in enumerate(rel.parts, start=1):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            raise IsscError(f"{where}: no such file ({path})") from None
        except OSError as exc:
            raise IsscError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
        if stat.S_ISLNK(mode):
            raise IsscError(f"{where}: {path} is a symlink; give the file itself")
        last = depth == len(rel.parts)
        if last and not stat.S_ISREG(mode):
            raise IsscError(f"{where}: not a regular file ({path})")
        if not last and not stat.S_ISDIR(mode):
            raise IsscError(f"{where}: {path} is not a directory")
    size = path.stat().st_size
    if size > MAX_INPUT_FILE_BYTES:
        raise IsscError(
            f"{where}: {size} bytes, over the {MAX_INPUT_FILE_BYTES}-byte limit of an input file"
        )
    return path


def _check_target(ref: FileReference, source: Path, target: Path, inbox: Path) -> bool:
    """Whether ``target`` already holds ``source``'s content; raises if it holds anything else."""
    where = f"{ref.where()}: input file {ref.name}: {ref.path}"
    path = inbox
    parts = target.relative_to(inbox).parts
    for depth, part in enumerate(parts, start=1):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise IsscError(f"{where}: cannot look at {path}: {exc.strerror or exc}") from None
        if stat.S_ISLNK(mode):
            raise IsscError(f"{where}: {path} in the inbox is a symlink")
        last = depth == len(parts)
        if not last and not stat.S_ISDIR(mode):
            raise IsscError(f"{where}: {path} in the inbox is not a directory")
        if last and not stat.S_ISREG(mode):
            raise IsscError(f"{where}: {path} in the inbox is not a regular file")
    if not _same_content(source, target):
        raise IsscError(
            f"{where}: {target} is already in the inbox with different content "
            "(not yet used by the hub?)"
        )
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _same_content(a: Path, b: Path) -> bool:
    """Byte-for-byte equality. Raises IsscError if either cannot be read."""
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError as exc:
        raise IsscError(f"cannot compare {a} with {b}: {exc}") from exc


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
    try:
        _publish(source, target)
    except FileExistsError:
        raise IsscError(f"{target}: already in the inbox (not yet ingested by the hub)") from None
    except OSError as exc:
        raise IsscError(f"cannot submit {source} to {inbox}: {exc}") from exc
    return target


def copy_input_file(source: Path, target: Path) -> bool:
    """Copy an input file to ``target`` in the inbox, as atomically as a task file.

    Missing directories are created. Returns False if an identical ``target`` appeared
    meanwhile (left alone).

    Raises:
        IsscError: ``target`` appeared meanwhile with different content, or the copy failed.
    """
    try:
        _make_directories(target.parent)
        _publish(source, target)
    except FileExistsError:
        if _same_content(source, target):
            return False
        raise IsscError(f"{target}: already in the inbox with different content") from None
    except OSError as exc:
        raise IsscError(f"cannot copy {source} to {target}: {exc}") from exc
    return True


def _publish(source: Path, target: Path) -> None:
    """Copy ``source`` to a hidden temp name beside ``target``, fsync, then give it the name.

    Raises:
        FileExistsError: ``target`` exists (it is never replaced).
        OSError: anything else (the temp file is removed).
    """
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    try:
        _copy_synced(source, tmp)
        _publish_no_replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _make_directories(directory: Path) -> None:
    """``mkdir -p``, making each new directory entry durable. Raises OSError."""
    if directory.is_dir():
        return
    _make_directories(directory.parent)
    try:
        directory.mkdir()
    except FileExistsError:
        if not directory.is_dir():
            raise
        return
    fsync_dir(directory.parent)


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

    os.rename would silently replace a file the hub has not ingested yet. A rename that
    refuses to replace (Linux's renameat2) is the first choice: the hub hears of it at
    once (inotify's IN_MOVED_TO, hub/dirwatch.py). Else a hard link, which fails with
    EEXIST atomically too (the hub then finds the file at its next poll); where hard
    links are unsupported, a check-then-rename, only racy against another submitter.

    Raises:
        FileExistsError: ``target`` exists.
        OSError: anything else.
    """
    if rename_no_replace(tmp, target):
        return
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
    pack.add_argument(
        "--endorsements",
        metavar="CHAINFILE",
        help="key rotation chain (from `rotate`) leading to --key; needed after a rotation",
    )
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

    rotate = sub.add_parser(
        "rotate", help="endorse a new owner key with the old one (appends to a chain file)"
    )
    rotate.add_argument("--project", required=True, metavar="NAME", help="the project's name")
    rotate.add_argument("--old", required=True, metavar="OLDKEYFILE", help="current private key")
    rotate.add_argument(
        "--new", required=True, metavar="NEWPUBKEY", help="new public key string or .pub file"
    )
    rotate.add_argument(
        "--out", required=True, metavar="CHAINFILE", help="chain file to create or extend"
    )
    rotate.set_defaults(handler=cmd_rotate)
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
