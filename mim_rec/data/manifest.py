"""Artifact manifests: every artifact on disk says what produced it.

A manifest is ``manifest.json`` beside (or inside, for folders) the artifact. Consumers call
:func:`require` to refuse artifacts from another producer -- a table built by an old encoder,
an events file with another id space -- instead of silently mixing them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from mim_rec import __version__
from mim_rec.data.errors import ManifestMismatch

MANIFEST_NAME = "manifest.json"
# The state an artifact built in place part by part keeps beside its parts, so that a rerun
# resumes it (``mim embeddings build``); its manifest is written last, when every part is there.
BUILD_STATE_NAME = ".build.json"
_FULL_HASH_LIMIT = 256 << 20  # files above this are fingerprinted by size + head + tail


def fingerprint_file(path: Union[str, Path]) -> str:
    """A content fingerprint of one file (sha256, 16 hex chars).

    Files up to 256 MiB are hashed whole; larger ones by size, first and last 8 MiB (a
    Parquet footer holds the row-group statistics, so edits almost always show there),
    which keeps fingerprinting a 100 GB release cheap.
    """
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as fh:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(fh.read(8 << 20))
            fh.seek(size - (8 << 20))
            digest.update(fh.read())
    return digest.hexdigest()[:16]


def staging_name(path: Union[str, Path]) -> Path:
    """The hidden name ``path`` is written under before it is renamed into place, unique to
    this process. A writer killed before the rename leaves it behind; no reader takes it, and
    :func:`fingerprint_tree` leaves it out."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


_STAGED = re.compile(r"\..+\.tmp\d+")


def fingerprint_tree(path: Union[str, Path]) -> str:
    """Fingerprint of a file, or of a folder's files (names and contents, sorted). A file a
    killed writer left under its :func:`staging_name` is not content: counting it made a run
    that recorded a table's fingerprint refuse to resume once the leftover was deleted."""
    path = Path(path)
    if path.is_file():
        return fingerprint_file(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*")
                        if p.is_file() and p.name != MANIFEST_NAME and not _STAGED.fullmatch(p.name)):
        digest.update(str(child.relative_to(path)).encode())
        digest.update(fingerprint_file(child).encode())
    return digest.hexdigest()[:16]


def fingerprint_config(config: Any) -> str:
    """Stable fingerprint of a JSON-serialisable config (dataclasses allowed)."""
    blob = json.dumps(_jsonable(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def code_version() -> str:
    """Package version plus the git commit (and ``+dirty``) when run from a checkout."""
    here = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"{__version__}+{sha}{'.dirty' if dirty else ''}" if sha else __version__


@dataclass
class Manifest:
    """What produced an artifact, and what it holds."""

    kind: str                      # "world", "items", "events", "mm_table", "encoders", ...
    stage: str                     # "synth", "import", "pretrain", "csft", "mfm", "ciubm", ...
    config: Dict[str, Any] = field(default_factory=dict)
    inputs: Dict[str, str] = field(default_factory=dict)   # input name -> fingerprint
    row_count: Optional[int] = None
    dim: Optional[int] = None
    dtype: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    code_version: str = field(default_factory=code_version)
    created_at: float = field(default_factory=time.time)

    @property
    def config_fingerprint(self) -> str:
        return fingerprint_config(self.config)

    def to_json(self) -> str:
        return json.dumps(_jsonable(asdict(self)), indent=2, sort_keys=True, default=str)


def manifest_path(artifact: Union[str, Path]) -> Path:
    """``DIR/manifest.json`` for a folder artifact, ``FILE.manifest.json`` for a file."""
    artifact = Path(artifact)
    if artifact.is_dir() or not artifact.suffix:
        return artifact / MANIFEST_NAME
    return artifact.with_name(artifact.name + "." + MANIFEST_NAME)


def write_manifest(artifact: Union[str, Path], manifest: Manifest) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a manifest."""
    path = manifest_path(artifact)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_name(path)
    tmp.write_text(manifest.to_json())
    os.replace(tmp, path)
    return path


def world_age_caveat(world: Union[str, Path]) -> Optional[str]:
    """Why a world's item-age buckets are not item ages (an importer's ``extra.item_age``), or
    None: a synthetic world's items have real creation times, and a world without a readable
    manifest is not second-guessed here."""
    try:
        return read_manifest(world).extra.get("item_age")
    except (ManifestMismatch, OSError, ValueError):
        return None


def carried_age_caveat(source: Union[str, Path]) -> Dict[str, str]:
    """The ``extra`` entry that keeps ``source``'s item-age caveat on a world derived from it
    (a holdout split, a clean copy): empty when it has none."""
    caveat = world_age_caveat(source)
    return {"item_age": caveat} if caveat else {}


def read_manifest(artifact: Union[str, Path]) -> Manifest:
    path = manifest_path(artifact)
    if not Path(artifact).exists():
        raise ManifestMismatch(f"{artifact}: no such file or folder")
    if not path.exists() and (Path(artifact) / BUILD_STATE_NAME).is_file():
        raise ManifestMismatch(f"{artifact}: its build has not finished (no manifest yet, only the build's "
                               f"{BUILD_STATE_NAME}); rerun the build with the same settings to finish it")
    if not path.exists():
        raise ManifestMismatch(f"{artifact}: no manifest at {path}; was it produced by mim_rec?"
                               f"{_artifacts_inside(Path(artifact))}")
    try:
        data = json.loads(path.read_text())
        return Manifest(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ManifestMismatch(f"{path}: unreadable manifest ({exc})") from exc


def _artifacts_inside(folder: Path) -> str:
    """A hint naming the artifacts directly inside ``folder``: a run folder given where its
    artifact is meant (``encoders=RUN/pretrain`` for ``RUN/pretrain/encoders``) is the usual
    mistake, and the folder to give instead is then one of these."""
    inside = sorted(p for p in folder.glob(f"*/{MANIFEST_NAME}")) if folder.is_dir() else []
    kinds = []
    for path in inside:
        try:
            kinds.append(f"{path.parent} (kind {json.loads(path.read_text())['kind']!r})")
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return f" It holds the artifact(s) {', '.join(kinds)}: give the one meant." if kinds else ""


def require(artifact: Union[str, Path], **expected: Any) -> Manifest:
    """Read an artifact's manifest and refuse it unless every ``expected`` field matches.

    Keys are Manifest attributes (``kind="mm_table"``, ``dim=128``) or ``extra.<key>`` /
    ``inputs.<name>`` written as ``extra__key`` / ``inputs__name``.
    """
    manifest = read_manifest(artifact)
    for key, want in expected.items():
        section, _, sub = key.partition("__")
        have = getattr(manifest, section) if not sub else getattr(manifest, section).get(sub)
        if have != want:
            raise ManifestMismatch(
                f"{artifact}: manifest says {key.replace('__', '.')}={have!r}, expected {want!r} "
                f"(produced by stage '{manifest.stage}', code {manifest.code_version})")
    return manifest


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return _jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
