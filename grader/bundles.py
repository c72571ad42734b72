"""Where an expected bundle comes from, and which one it is: its content hash.

A bundle is the folder of expected results a lab's reference writes (its ``manifest.json``
holds the profile's ``fingerprint``). It is identified by ``content_hash``, recorded in its
``BUNDLE-HASH`` file. A grading never trains one: ``resolve_bundle`` takes the bundle a lab
ships for the profile (``<shipped_root>/<profile>/``, when its fingerprint is the
profile's), or the folder or .tar.gz/.zip archive given as ``--bundle``, checks its hash
and fingerprint, and refuses anything else with one sentence (``BundleError``).

No torch here: a batch's grading processes unpickle a ``Bundle`` before anything heavy loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from grader.files import write_atomically
from grader.lab import Profile

MANIFEST = "manifest.json"


def read_manifest(bundle_dir: str | Path) -> dict:
    return json.loads((Path(bundle_dir) / MANIFEST).read_text())


# ---------------------------------------------------------------- identity: the content hash

BUNDLE_HASH = "BUNDLE-HASH"
SHIPPED = "shipped"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
# A bundle archive is the TA's own file, but it is unpacked with the care of a stranger's:
# these bound what it may hold (the full profile's bundle is about half a gigabyte).
MAX_ARCHIVE_ENTRIES = 1000
MAX_ARCHIVE_BYTES = 8 * 1024 ** 3
CHUNK = 1 << 20


class BundleError(Exception):
    """No usable expected bundle; the message is one sentence saying what to do."""


@dataclass(frozen=True)
class Bundle:
    """An expected bundle found and checked: its folder, content hash, profile and origin."""

    path: Path
    hash: str
    profile: str
    source: str  # "shipped", or the folder or archive given as --bundle (absolute)

    def to_dict(self) -> dict:
        """What result.json records as ``bundle``."""
        return {"hash": self.hash, "profile": self.profile, "source": self.source}


def _bundle_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative POSIX name, path) of every file of ``folder`` but BUNDLE-HASH; a link or
    anything else that is not a plain file or folder is refused."""
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        mode = path.lstat().st_mode
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise BundleError(f"{path} is a link or a special file: a bundle holds only plain "
                              "files, so copy the file itself there.")
        if name != BUNDLE_HASH:
            yield name, path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_hash(folder: str | Path) -> str:
    """The bundle's identity: sha256 of the lines ``<sha256 of the file>  <relative name>``,
    one per file (BUNDLE-HASH excluded), sorted by name: ``sha256sum``'s own format, so
    ``cd DIR && find . -type f ! -name BUNDLE-HASH -printf '%P\\n' | LC_ALL=C sort |
    xargs sha256sum | sha256sum`` gives the same hash."""
    folder = Path(folder)
    lines = sorted((name, file_sha256(path)) for name, path in _bundle_files(folder))
    text = "".join(f"{digest}  {name}\n" for name, digest in lines)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_bundle_hash(folder: str | Path) -> str:
    """Record the content hash of ``folder`` in its BUNDLE-HASH file; returns it."""
    digest = content_hash(folder)
    write_atomically(Path(folder) / BUNDLE_HASH, digest + "\n")
    return digest


def recorded_hash(folder: str | Path) -> str:
    path = Path(folder) / BUNDLE_HASH
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip() \
            if path.is_file() and not path.is_symlink() else None
    except OSError:
        text = None
    if not text:
        raise BundleError(f"{folder} has no {BUNDLE_HASH} file, so nothing says which bundle "
                          "it is: build it with 'slimgrade reference --profile P --out DIR', "
                          "which records its hash.")
    return text


def verify_bundle(folder: str | Path) -> str:
    """The content hash of ``folder`` when it matches the one its BUNDLE-HASH records."""
    recorded = recorded_hash(folder)
    actual = content_hash(folder)
    if actual != recorded:
        raise BundleError(f"{folder} does not match its {BUNDLE_HASH} (recorded "
                          f"{recorded[:16]}..., its files hash to {actual[:16]}...): a file "
                          "was changed, added or removed, so use an intact copy or build the "
                          "bundle again with 'slimgrade reference --profile P --out DIR'.")
    return actual


def default_cache_root() -> Path:
    """Where bundle archives given as --bundle are unpacked (by their content hash)."""
    root = os.environ.get("SLIMGRADE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "slimgrade")
    return Path(root) / "reference"


def _how_to_build(profile: Profile) -> str:
    where = " (on the course's GPU: it trains the whole lab)" if profile.name == "full" else ""
    return (f"build one with 'slimgrade reference --profile {profile.name} --out DIR'{where} "
            "and pass --bundle DIR")


def _check_profile(folder: Path, profile: Profile, shown: str) -> dict:
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):
        raise BundleError(f"{shown} has no readable {MANIFEST}: give the folder that "
                          f"'slimgrade reference' wrote, or an archive of it.") from None
    found = manifest.get("fingerprint") if isinstance(manifest, dict) else None
    name = (manifest.get("profile") or {}).get("name") if isinstance(manifest, dict) else None
    if found != profile.fingerprint():
        raise BundleError(f"{shown} is an expected bundle of profile {name or '?'} (fingerprint "
                          f"{found}), not of the {profile.name} profile as this slimgrade "
                          f"defines it (fingerprint {profile.fingerprint()}): "
                          f"{_how_to_build(profile)}.")
    return manifest


def resolve_bundle(profile: Profile, bundle: Bundle | str | Path | None = None,
                   cache_root: str | Path | None = None, shipped_root: Path | None = None) -> Bundle:
    """The expected bundle a grading uses, checked by its content hash; never built here.

    ``bundle``: a folder, or a .tar.gz/.zip archive of one (unpacked once under
    ``cache_root``, by its hash), or a ``Bundle`` resolved earlier (a batch's workers get the
    batch's, checked again). Without it, the bundle the lab ships for the profile under
    ``shipped_root`` when its fingerprint matches. Anything else raises BundleError with one sentence.
    """
    if isinstance(bundle, Bundle):
        digest = verify_bundle(bundle.path)
        if digest != bundle.hash:
            raise BundleError(f"The expected bundle in {bundle.path} changed while grading "
                              f"(was {bundle.hash[:16]}..., now {digest[:16]}...): restore it "
                              "or grade again.")
        return bundle
    if bundle is None:
        folder = (shipped_root or Path("/nonexistent")) / profile.name
        if shipped_root is None or not (folder / MANIFEST).is_file():
            raise BundleError(f"No expected bundle ships for the {profile.name} profile and no "
                              f"--bundle was given: {_how_to_build(profile)}.")
        manifest = read_manifest(folder)
        if manifest.get("fingerprint") != profile.fingerprint():
            raise BundleError(f"The shipped {profile.name} bundle was built for another "
                              f"version of the profile (fingerprint {manifest.get('fingerprint')}, "
                              f"this one is {profile.fingerprint()}) and slimgrade never "
                              f"retrains it by itself: {_how_to_build(profile)}.")
        return Bundle(folder, verify_bundle(folder), profile.name, SHIPPED)
    given = Path(bundle).expanduser().resolve()
    if given.is_dir():
        folder = given
    elif given.is_file() and given.name.lower().endswith(ARCHIVE_SUFFIXES):
        folder = unpack_bundle(given, cache_root)
    elif given.exists():
        raise BundleError(f"{given} is neither a bundle folder nor a .tar.gz or .zip archive "
                          "of one: give the folder 'slimgrade reference --out' wrote.")
    else:
        raise BundleError(f"{given} does not exist: check the --bundle path.")
    digest = verify_bundle(folder)
    _check_profile(folder, profile, str(given))
    return Bundle(folder, digest, profile.name, str(given))


# ---------------------------------------------------------------- archives, unpacked safely

def unpack_bundle(archive: Path, cache_root: str | Path | None = None) -> Path:
    """Unpack a bundle archive under ``cache_root`` and return the bundle's folder there.

    Only plain files and folders are taken: no entry may be absolute, climb out with
    ``..``, be a link or a device, appear twice, or push the archive past
    ``MAX_ARCHIVE_ENTRIES`` / ``MAX_ARCHIVE_BYTES``. The bundle may sit at the archive's top
    or in its single folder. It is kept as ``<cache>/bundle-<hash>`` (the hash its
    BUNDLE-HASH records, checked by the caller), so every grading of a batch, and every
    later run, uses the same folder.
    """
    root = Path(cache_root) if cache_root else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".unpack-{secrets.token_hex(6)}"
    staging.mkdir()
    try:
        if archive.name.lower().endswith(".zip"):
            _unzip(archive, staging)
        else:
            _untar(archive, staging)
        folder = staging
        if not (folder / MANIFEST).is_file():
            inside = list(staging.iterdir())
            if len(inside) == 1 and inside[0].is_dir() and (inside[0] / MANIFEST).is_file():
                folder = inside[0]
            else:
                raise BundleError(f"{archive} holds no {MANIFEST} at its top or in its single "
                                  "folder: archive the folder 'slimgrade reference --out' wrote.")
        digest = recorded_hash(folder)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BundleError(f"{archive}'s {BUNDLE_HASH} does not hold a sha256 hash: build "
                              "the bundle again with 'slimgrade reference --profile P --out DIR'.")
        actual = content_hash(folder)
        if actual != digest:
            raise BundleError(f"{archive} does not match its {BUNDLE_HASH} (recorded "
                              f"{digest[:16]}..., its files hash to {actual[:16]}...): a file was "
                              "changed, added or removed, so use an intact archive or build the "
                              "bundle again with 'slimgrade reference --profile P --out DIR'.")
        target = root / f"bundle-{digest}"
        try:
            os.rename(folder, target)
        except OSError:  # unpacked before (maybe at this very moment, by another grading)
            if not (target / MANIFEST).is_file():
                raise
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _entry_name(archive: Path, name: str) -> PurePosixPath | None:
    """The entry's path inside the bundle, None for the archive's own top ("." or "./")."""
    path = PurePosixPath(name.replace("\\", "/"))
    parts = [p for p in path.parts if p not in ("", ".")]
    if path.is_absolute() or ".." in parts or any(":" in p or "\0" in p for p in parts):
        raise BundleError(f"{archive} holds an entry that would land outside its folder "
                          f"({name!r}): a bundle archive holds only relative paths.")
    return PurePosixPath(*parts) if parts else None


class _Budget:
    def __init__(self, archive: Path):
        self.archive, self.entries, self.bytes = archive, 0, 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > MAX_ARCHIVE_ENTRIES:
            raise BundleError(f"{self.archive} holds more than {MAX_ARCHIVE_ENTRIES} entries: "
                              "a bundle archive holds a handful of files.")

    def add(self, size: int) -> None:
        self.bytes += size
        if self.bytes > MAX_ARCHIVE_BYTES:
            raise BundleError(f"{self.archive} unpacks to more than "
                              f"{MAX_ARCHIVE_BYTES // 1024 ** 3} GB: that is not a bundle.")


def _write_entry(archive: Path, staging: Path, relative: PurePosixPath, source, size: int,
                 budget: _Budget) -> None:
    target = staging.joinpath(*relative.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise BundleError(f"{archive} holds {relative} twice: archive the bundle folder "
                          "once.") from None
    with os.fdopen(handle, "wb") as sink:
        written = 0
        while chunk := source.read(CHUNK):
            written += len(chunk)
            budget.add(len(chunk))
            if written > size:
                raise BundleError(f"{archive}'s entry {relative} is larger than it declares: "
                                  "the archive is damaged.")
            sink.write(chunk)


def _mkdir(staging: Path, relative: PurePosixPath | None) -> None:
    if relative is not None:
        staging.joinpath(*relative.parts).mkdir(parents=True, exist_ok=True)


def _untar(archive: Path, staging: Path) -> None:
    budget = _Budget(archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                budget.entry()
                relative = _entry_name(archive, member.name)
                if member.isdir():
                    _mkdir(staging, relative)
                elif member.isreg() and relative is not None:
                    source = tar.extractfile(member)
                    _write_entry(archive, staging, relative, source, member.size, budget)
                else:
                    raise BundleError(f"{archive} holds {member.name!r}, a link or special "
                                      "file: a bundle archive holds only files and folders.")
    except (tarfile.TarError, EOFError, OSError) as error:
        raise BundleError(f"{archive} cannot be unpacked ({error}): give an intact .tar.gz "
                          "of the bundle folder.") from None


def _unzip(archive: Path, staging: Path) -> None:
    budget = _Budget(archive)
    try:
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                budget.entry()
                relative = _entry_name(archive, info.filename)
                kind = stat.S_IFMT(info.external_attr >> 16)
                if info.is_dir():
                    _mkdir(staging, relative)
                elif kind in (0, stat.S_IFREG) and relative is not None:
                    with zipped.open(info) as source:
                        _write_entry(archive, staging, relative, source, info.file_size, budget)
                else:
                    raise BundleError(f"{archive} holds {info.filename!r}, a link or special "
                                      "file: a bundle archive holds only files and folders.")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as error:
        raise BundleError(f"{archive} cannot be unpacked ({error}): give an intact .zip of "
                          "the bundle folder.") from None
