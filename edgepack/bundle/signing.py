"""Offline bundle signatures: Ed25519 keys, ``manifest.sig.json``, and checking it.

Where the signature lives: in ``manifest.sig.json`` beside ``manifest.json``, the one file of a
bundle that the manifest does not list (it could not: it signs the manifest). Adding or
replacing it changes no other byte of the bundle. It is canonical JSON::

    {
      "format": "edgepack.signature", "format_version": "1.0", "algorithm": "ed25519",
      "key": "<fingerprint>", "public_key": "<base64 of the 32-byte raw public key>",
      "manifest_sha256": "<sha256 of the exact manifest.json bytes>",
      "signed_at": "<ISO 8601, UTC>", "expires": "<ISO 8601, UTC>" | null,
      "signature": "<base64 of the 64-byte Ed25519 signature>"
    }

What it covers: the signature is over the canonical JSON of every other field of that object,
so over the sha256 of the canonical manifest bytes (which list every file's size and sha256),
and over the signing time and the expiry (an expiry outside the signed bytes could be removed).
The key's fingerprint is the first 16 hexadecimal digits of the sha256 of its raw public key.

The rules :func:`check` applies: a signature that is present must be well formed, match the
manifest, verify with the public key it names, and not have expired; trusted keys (``verify
--key``) add that a signature must be present and made by one of them. Without trusted keys an
unsigned bundle verifies as before, and a signed one is reported as signed by its fingerprint,
not checked against a trusted key.

Keys: the private key is PKCS#8 PEM (``NAME.key``, mode 0600), the public key
SubjectPublicKeyInfo PEM (``NAME.pub``); OpenSSH Ed25519 keys are read too. ``cryptography``
is imported only here, and only when a key is used.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from edgepack.bundle.archive import _fsync_dir
from edgepack.bundle.manifest import (
    MANIFEST, MAX_SIGNATURE_BYTES, SIGNATURE, NotRegularFile, StrictJSONError, canonical_json, open_regular,
    strict_json,
)
from edgepack.errors import UsageError, VerificationError

SIGNATURE_FORMAT = "edgepack.signature"
SIGNATURE_FORMAT_VERSION = "1.0"
ALGORITHM = "ed25519"
#: The fields of a signature file; every one but ``signature`` is signed.
SIGNATURE_KEYS = ("format", "format_version", "algorithm", "key", "public_key", "manifest_sha256",
                  "signed_at", "expires", "signature")
#: A key file larger than this is not a key file.
MAX_KEY_BYTES = 64 * 2**10

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


def fingerprint(raw_public_key: bytes) -> str:
    """A public key's fingerprint: the first 16 hexadecimal digits of sha256(raw key)."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key: its raw 32 bytes, fingerprint, and where it came from."""

    raw: bytes
    source: str

    @property
    def fingerprint(self) -> str:
        """First 16 hexadecimal digits of sha256(raw key)."""
        return fingerprint(self.raw)


@dataclass(frozen=True)
class KeyFiles:
    """What :func:`keygen` wrote."""

    private: Path
    public: Path
    fingerprint: str


@dataclass
class SignatureCheck:
    """The outcome of :func:`check`.

    :param state: ``unsigned``; ``signed`` (valid, its key not checked against a trusted one);
        ``trusted`` (valid and made by a trusted key); ``failed`` (see ``detail``).
    :param detail: one sentence for people.
    """

    state: str
    detail: str
    key: str | None = None
    signed_at: str | None = None
    expires: str | None = None
    trusted_keys: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the bundle passes the signature rules."""
        return self.state != "failed"

    def to_json(self) -> dict[str, Any]:
        """The ``signature`` field of ``verify --json``."""
        return {"state": self.state, "key": self.key, "signed_at": self.signed_at, "expires": self.expires,
                "trusted_keys": self.trusted_keys, "detail": self.detail}


# ---------------------------------------------------------------------------------------------
# Keys


def _crypto() -> Any:
    """The cryptography modules signing needs, imported on first use (``--help`` stays fast)."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - a declared dependency
        raise UsageError("signing needs the 'cryptography' package; pip install cryptography") from None
    return serialization, ed25519


def _read_key_file(path: str | Path, option: str) -> bytes:
    file = Path(path)
    try:
        with open(open_regular(file), "rb") as handle:
            data = handle.read(MAX_KEY_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"{option} {file} does not exist") from None
    except NotRegularFile:
        raise UsageError(f"{option} {file} is not a regular file (links are refused)") from None
    except OSError as exc:
        raise UsageError(f"{option} {file} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_BYTES:
        raise UsageError(f"{option} {file} is larger than {MAX_KEY_BYTES} bytes; it is not a key file")
    return data


def load_private_key(path: str | Path, option: str = "--key") -> Any:
    """The Ed25519 private key in ``path`` (PKCS#8 PEM or OpenSSH, unencrypted); UsageError
    (one sentence naming ``option`` and the file) when it is not one."""
    data = _read_key_file(path, option)
    serialization, ed25519 = _crypto()
    if b"PUBLIC KEY" in data or data.startswith(b"ssh-"):
        raise UsageError(f"{option} {path} is a public key; signing needs the private key (NAME.key)")
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's "Password was not given but private key is encrypted"
        raise UsageError(f"{option} {path} is encrypted with a passphrase; edgepack reads unencrypted "
                         "keys only (keep it on an encrypted disk or in a secret store instead)") from None
    except Exception:  # ValueError, UnsupportedAlgorithm: not a key cryptography can read
        raise UsageError(f"{option} {path} is not a PEM or OpenSSH private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise UsageError(f"{option} {path} is a {type(key).__name__.lstrip('_')}, not an Ed25519 key")
    return key


#: DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the raw key's 32 bytes follow.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


def _pem_ed25519_raw(data: bytes) -> bytes | None:
    """The raw key of a PEM Ed25519 public key (the form keygen writes), read without
    cryptography's PEM machinery (its import alone costs verify ~30 ms); None for any other
    form, which cryptography then reads."""
    lines = data.strip().splitlines()
    if len(lines) < 3 or lines[0] != b"-----BEGIN PUBLIC KEY-----" or lines[-1] != b"-----END PUBLIC KEY-----":
        return None
    try:
        der = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) == 44 and der.startswith(_ED25519_SPKI_PREFIX):
        return der[len(_ED25519_SPKI_PREFIX):]
    return None


def load_public_key(path: str | Path, option: str = "--key") -> PublicKey:
    """The Ed25519 public key in ``path`` (PEM or an OpenSSH ``ssh-ed25519`` line); UsageError
    (one sentence naming ``option`` and the file) when it is not one."""
    data = _read_key_file(path, option)
    if b"PRIVATE KEY" in data:
        raise UsageError(f"{option} {path} is a private key; pass the public key (NAME.pub) and keep the "
                         "private key on the signing machine")
    raw = _pem_ed25519_raw(data)
    if raw is not None:
        return PublicKey(raw, str(path))
    serialization, ed25519 = _crypto()
    try:
        if data.startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except Exception:  # ValueError, UnsupportedAlgorithm: not a key cryptography can read
        raise UsageError(f"{option} {path} is not a PEM or OpenSSH public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise UsageError(f"{option} {path} is a {type(key).__name__.lstrip('_')}, not an Ed25519 key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(raw, str(path))


def _raw_public(private_key: Any) -> bytes:
    serialization, _ = _crypto()
    return private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _publish_new(data: bytes, final: Path, mode: int) -> None:
    """Write ``data`` to a new file ``final`` atomically, never replacing one that exists:
    a private temporary file in the same directory, fsynced, then linked into place."""
    fd, partial = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial")
    try:
        with open(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(partial, final)  # fails when final exists: never replaces a key
        except FileExistsError:
            raise UsageError(f"{final} already exists; keygen never replaces a key (remove it or choose "
                             "another --out)") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # No hard links on this file system: an exclusive create is the no-replace rename.
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            try:
                out = os.open(final, flags, mode)
            except FileExistsError:
                raise UsageError(f"{final} already exists; keygen never replaces a key") from None
            with open(out, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
    finally:
        try:
            os.unlink(partial)
        except OSError:
            pass


def keygen(out: str | Path) -> KeyFiles:
    """Write a new Ed25519 key pair: ``OUT.key`` (PKCS#8 PEM, unencrypted, mode 0600) and
    ``OUT.pub`` (PEM, mode 0644). Refuses (UsageError) to replace either file."""
    base = Path(out)
    private, public = Path(f"{base}.key"), Path(f"{base}.pub")
    for path in (private, public):
        if os.path.lexists(path):
            raise UsageError(f"{path} already exists; keygen never replaces a key (remove it or choose another --out)")
    if not base.parent.is_dir():
        raise UsageError(f"--out {out}: directory {base.parent} does not exist")
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        _publish_new(private_pem, private, 0o600)
        try:
            _publish_new(public_pem, public, 0o644)
        except BaseException:
            os.unlink(private)  # never leave half a key pair
            raise
    except PermissionError as exc:
        raise UsageError(f"--out {out} is not writable: {exc.strerror or exc}") from None
    return KeyFiles(private, public, fingerprint(_raw_public(key)))


# ---------------------------------------------------------------------------------------------
# Times


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def _iso(moment: _dt.datetime) -> str:
    return moment.astimezone(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _parse_time(text: Any) -> _dt.datetime | None:
    """An ISO 8601 time with a UTC offset, or None when ``text`` is not one."""
    if not isinstance(text, str):
        return None
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def parse_expires(text: str, *, now: _dt.datetime | None = None, option: str = "--expires") -> _dt.datetime:
    """``--expires``: a number of days from now (``90``), a date (``2027-01-31``: the signature
    expires at 00:00 UTC that day) or an ISO 8601 time with a UTC offset; UsageError otherwise,
    or when the moment is not in the future."""
    now = now or _now()
    value = text.strip()
    if value.isdigit():
        moment = now + _dt.timedelta(days=int(value))
    else:
        try:
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                moment = _dt.datetime.combine(_dt.date.fromisoformat(value), _dt.time(), _dt.timezone.utc)
            else:
                moment = _dt.datetime.fromisoformat(value)
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=_dt.timezone.utc)
        except ValueError:
            raise UsageError(f"{option} {text!r} is neither a number of days nor a date such as 2027-01-31") from None
    if moment <= now:
        raise UsageError(f"{option} {text!r} is not in the future ({_iso(moment)})")
    return moment


# ---------------------------------------------------------------------------------------------
# Signing


def _statement(document: dict[str, Any]) -> bytes:
    """The bytes a signature covers: every field of the signature file but ``signature``."""
    return canonical_json({k: v for k, v in document.items() if k != "signature"})


def _manifest_bytes(root: Path) -> bytes:
    """The manifest's bytes, read without following a link; VerificationError when unreadable."""
    from edgepack.bundle.reader import read_manifest_bytes

    data, failure = read_manifest_bytes(root)
    if failure is not None:
        raise VerificationError(f"bundle {root} cannot be signed: {failure.path}: {failure.detail}")
    assert data is not None
    return data


def write_signature(root: str | Path, private_key: Any, *, expires: _dt.datetime | None = None,
                    now: _dt.datetime | None = None) -> dict[str, Any]:
    """Sign ``root``'s manifest as it is and write ``manifest.sig.json`` atomically (a temporary
    file, fsynced, renamed over any previous signature). Refuses (VerificationError) a manifest
    that is not canonical JSON, since the signature covers the canonical bytes; checks nothing
    else: for a
    bundle just written (``pack --sign``) or already verified (:func:`sign`). Returns the
    signature file's content."""
    root = Path(root)
    data = _manifest_bytes(root)
    try:
        manifest = strict_json(data)
    except (ValueError, RecursionError):
        raise VerificationError(f"bundle {root} cannot be signed: {MANIFEST} is not valid JSON") from None
    if canonical_json(manifest) != data:
        raise VerificationError(f"bundle {root} cannot be signed: {MANIFEST} is not in canonical form (sorted keys, "
                                "two-space indent, UTF-8), and a signature covers the canonical manifest bytes")
    now = now or _now()
    raw = _raw_public(private_key)
    document: dict[str, Any] = {
        "format": SIGNATURE_FORMAT,
        "format_version": SIGNATURE_FORMAT_VERSION,
        "algorithm": ALGORITHM,
        "key": fingerprint(raw),
        "public_key": base64.b64encode(raw).decode("ascii"),
        "manifest_sha256": hashlib.sha256(data).hexdigest(),
        "signed_at": _iso(now),
        "expires": _iso(expires) if expires is not None else None,
    }
    document["signature"] = base64.b64encode(private_key.sign(_statement(document))).decode("ascii")
    _replace_file(root / SIGNATURE, canonical_json(document))
    return document


def _replace_file(final: Path, data: bytes) -> None:
    """Write ``final`` atomically: a temporary file fsynced, then renamed over ``final``.

    The temporary file is made beside the bundle directory when that is possible, so an
    interrupted write leaves nothing inside the bundle (where it would be an unlisted file)."""
    places = [final.parent.resolve().parent, final.parent]
    for i, place in enumerate(places):
        try:
            fd, partial = tempfile.mkstemp(dir=place, prefix=f".{final.parent.name}.{final.name}.", suffix=".partial")
        except OSError:
            if i == len(places) - 1:
                raise
            continue
        try:
            with open(fd, "wb") as handle:
                handle.write(data)
                os.fchmod(handle.fileno(), 0o644)  # a release artifact, readable by all
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, final)
        except OSError as exc:
            _unlink(partial)
            if exc.errno == errno.EXDEV and i < len(places) - 1:
                continue  # the bundle is a mount point: write inside it instead
            raise
        except BaseException:
            _unlink(partial)
            raise
        _fsync_dir(final.parent)
        return


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def sign(bundle: str | Path, key: str | Path | Any, *, expires: _dt.datetime | None = None,
         now: _dt.datetime | None = None) -> dict[str, Any]:
    """Sign a bundle (directory or ``.tar.gz`` archive) with a private key (a path or a loaded
    key), after checking its manifest and every file's hash; returns the signature file's
    content.

    A directory gains ``manifest.sig.json`` (written atomically, replacing an earlier
    signature). An archive is extracted into a private directory beside it, checked, signed and
    re-packed, and the new archive replaces the old one in one rename. Raises UsageError for a
    bad key, path or archive kind (exit 2), VerificationError when the bundle fails its
    integrity check (exit 1).
    """
    from edgepack.bundle.archive import create_archive, is_archive, safe_extract
    from edgepack.bundle.reader import read_verified

    private_key = load_private_key(key) if isinstance(key, (str, Path)) else key
    path = Path(bundle)
    if not path.exists():
        raise UsageError(f"bundle {path} does not exist")
    if not is_archive(path):
        if not path.is_dir():
            raise UsageError(f"bundle {path} is neither a bundle directory nor a .tar.gz archive")
        read_verified(path)
        try:
            return write_signature(path, private_key, expires=expires, now=now)
        except PermissionError as exc:
            raise UsageError(f"bundle {path} is not writable: {exc.strerror or exc}") from None
    if not path.name.endswith((".tar.gz", ".tgz")):
        raise UsageError(f"bundle {path} is an uncompressed .tar archive; sign the bundle directory, "
                         "or a .tar.gz archive, instead")
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{path.name}.sign-", dir=path.parent))
    except OSError as exc:
        raise UsageError(f"bundle {path} cannot be re-packed: {path.parent} is not writable "
                         f"({exc.strerror or exc})") from None
    try:
        root = safe_extract(path, work / "x")
        read_verified(root)
        document = write_signature(root, private_key, expires=expires, now=now)
        packed = create_archive(root)
        os.replace(packed, path)  # same directory: the old archive or the new one, never neither
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return document


# ---------------------------------------------------------------------------------------------
# Checking


def load_public_keys(paths: Iterable[str | Path | PublicKey], option: str = "--key") -> list[PublicKey]:
    """Trusted keys from files (or already loaded); UsageError names a bad one."""
    return [p if isinstance(p, PublicKey) else load_public_key(p, option) for p in paths]


def _read_signature(root: Path) -> tuple[bytes | None, str | None]:
    """The signature file's bytes (None when there is none), or why it cannot be used."""
    file = root / SIGNATURE
    try:
        info = os.lstat(file)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror or exc}"
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        return None, "is not a regular file (links are refused)"
    if info.st_size > MAX_SIGNATURE_BYTES:
        return None, f"is {info.st_size} bytes, more than the {MAX_SIGNATURE_BYTES} a signature file may have"
    try:
        with open(open_regular(file), "rb") as handle:
            return handle.read(MAX_SIGNATURE_BYTES + 1), None
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror or exc}"


def _b64(value: Any, size: int) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


def _document_problem(document: Any) -> str | None:
    """Why a parsed signature file is malformed, or None (one sentence naming the key)."""
    if not isinstance(document, dict):
        return "is not a JSON object"
    for key in SIGNATURE_KEYS:
        if key not in document:
            return f"lacks the required key {key!r}"
    unknown = sorted(set(document) - set(SIGNATURE_KEYS))
    if unknown:
        return f"has the unknown key {unknown[0]!r}"
    if document["format"] != SIGNATURE_FORMAT:
        return f"format must be {SIGNATURE_FORMAT!r}"
    version = document["format_version"]
    if not (isinstance(version, str) and version.split(".")[0] == SIGNATURE_FORMAT_VERSION.split(".")[0]):
        return f"format_version {version!r} is not supported; this edgepack reads signature format 1.x"
    if document["algorithm"] != ALGORITHM:
        return f"algorithm {document['algorithm']!r} is not supported; this edgepack checks {ALGORITHM} signatures only"
    if not (isinstance(document["key"], str) and _FINGERPRINT.fullmatch(document["key"])):
        return "key must be a fingerprint of 16 lowercase hexadecimal digits"
    raw = _b64(document["public_key"], 32)
    if raw is None:
        return "public_key must be the base64 of a 32-byte Ed25519 public key"
    if fingerprint(raw) != document["key"]:
        return f"key {document['key']} is not the fingerprint of its public_key ({fingerprint(raw)})"
    if not (isinstance(document["manifest_sha256"], str) and _SHA256.fullmatch(document["manifest_sha256"])):
        return "manifest_sha256 must be 64 lowercase hexadecimal digits"
    if _parse_time(document["signed_at"]) is None:
        return "signed_at must be an ISO 8601 time with a UTC offset"
    if document["expires"] is not None and _parse_time(document["expires"]) is None:
        return "expires must be an ISO 8601 time with a UTC offset, or null"
    if _b64(document["signature"], 64) is None:
        return "signature must be the base64 of a 64-byte Ed25519 signature"
    return None


def check(root: str | Path, keys: Sequence[str | Path | PublicKey] = (), *,
          now: _dt.datetime | None = None, manifest_bytes: bytes | None = None) -> SignatureCheck:
    """Check a bundle directory's signature against its manifest and the trusted ``keys``.

    Never raises for a malformed bundle: a failure is a SignatureCheck whose state is
    ``failed`` and whose detail is one sentence. A key file that cannot be read raises
    UsageError (bad input). ``manifest_bytes`` are the manifest's bytes when the caller has
    read them already (so the signature is checked against what was parsed).
    """
    root = Path(root)
    trusted = load_public_keys(keys)
    names = [k.fingerprint for k in trusted]

    def failed(detail: str, document: dict[str, Any] | None = None) -> SignatureCheck:
        info = document or {}
        return SignatureCheck("failed", detail, key=info.get("key"), signed_at=info.get("signed_at"),
                              expires=info.get("expires"), trusted_keys=names)

    data, problem = _read_signature(root)
    if problem is not None:
        return failed(f"{SIGNATURE} {problem}")
    if data is None:
        if trusted:
            return failed(f"the bundle is unsigned (it has no {SIGNATURE}), but --key asks for a signature "
                          f"by {', '.join(names)}")
        return SignatureCheck("unsigned", "unsigned", trusted_keys=names)
    try:
        document = strict_json(data)
    except StrictJSONError as exc:
        return failed(f"{SIGNATURE} is not valid: {exc}")
    except (ValueError, RecursionError) as exc:
        return failed(f"{SIGNATURE} is not valid JSON: {' '.join(str(exc).split())}")
    problem = _document_problem(document)
    if problem is not None:
        return failed(f"{SIGNATURE} {problem}")
    if manifest_bytes is None:
        manifest_bytes = _manifest_bytes(root)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    if digest != document["manifest_sha256"]:
        return failed(f"{MANIFEST} was changed after it was signed (its sha256 is {digest[:16]}..., the signature "
                      f"covers {document['manifest_sha256'][:16]}...)", document)
    # Only the Ed25519 primitive: cryptography's serialization machinery is not needed here.
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ed25519

    raw = _b64(document["public_key"], 32)
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(_b64(document["signature"], 64),
                                                               _statement(document))
    except (InvalidSignature, ValueError):  # ValueError: 32 bytes that are no Ed25519 point
        return failed(f"the signature in {SIGNATURE} does not verify with key {document['key']}: the signature "
                      "file was altered after signing", document)
    expires = _parse_time(document["expires"])
    now = now or _now()
    if expires is not None and now >= expires:
        return failed(f"the signature by key {document['key']} expired at {document['expires']}", document)
    info = dict(key=document["key"], signed_at=document["signed_at"], expires=document["expires"], trusted_keys=names)
    until = f", expires {document['expires']}" if document["expires"] else ""
    if not trusted:
        return SignatureCheck("signed", f"signed by key {document['key']} at {document['signed_at']}{until}; "
                                        "not checked against a trusted key (pass --key)", **info)
    if not any(k.raw == raw for k in trusted):
        return failed(f"signed by key {document['key']}, which is not a trusted key (--key: {', '.join(names)})",
                      document)
    return SignatureCheck("trusted", f"signed by trusted key {document['key']} at {document['signed_at']}{until}",
                          **info)
