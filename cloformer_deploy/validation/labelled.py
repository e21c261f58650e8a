"""A validation set on disk: which images, with which labels, in which shards; listed before any image is decoded.

Labels come from class subfolders (a folder's name is a class of the bundle's labels, or an ImageNet synset id
such as ``n01440764`` for a 1000-class head) or from a ``file,label`` CSV over a flat folder (a label is a class
index, a class name or a synset id), as ImageNet's validation set is distributed. A flat folder without a CSV is
an unlabelled set: drift and agreement only.

A shard is a run of consecutive images of the sorted list; its key hashes what identifies those images (path,
size, modification time, label), so that a shard done once is found again after a restart, and a changed file
makes its shard run again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..images import IMAGE_SUFFIXES
from ..inputs import InputError

SYNSET = re.compile(r"^n\d{8}$")
UNLABELLED = -1


class DataError(InputError):
    """A validation set that cannot be evaluated as given: one line naming the fix."""


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k synset ids in the standard class order (class i is the i-th)."""
    text = resources.files("cloformer_deploy").joinpath("data/imagenet1k_synsets.txt").read_text()
    return text.split()


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


@dataclass(frozen=True)
class Shard:
    """Images ``start`` .. ``start + len(names)`` of the set, read from ``root`` (or from ``blobs``, their bytes,
    where the worker does not see the driver's disk)."""

    index: int
    start: int
    names: tuple[str, ...]
    labels: tuple[int, ...]
    key: str
    root: str | None = None
    blobs: tuple[bytes, ...] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def open(self, i: int):
        """The ``i``-th image as a file object (a missing file raises OSError, as an unreadable one does)."""
        if self.blobs is not None:
            return io.BytesIO(self.blobs[i])
        return open(Path(self.root) / self.names[i], "rb")

    def with_bytes(self) -> Shard:
        """The same shard carrying its images' bytes (a file that cannot be read travels as no bytes: unreadable)."""
        blobs = []
        for name in self.names:
            try:
                blobs.append((Path(self.root) / name).read_bytes())
            except OSError:
                blobs.append(b"")
        return Shard(self.index, self.start, self.names, self.labels, self.key, None, tuple(blobs))


@dataclass
class LabelledSet:
    """The images of a validation set, sorted, with their class indices (-1: unlabelled) and shards."""

    root: Path
    names: list[str]
    labels: list[int]
    how: str  # how the labels were read: "folders", "synsets", "csv" or "none"
    stats: list[tuple[int, int]] = field(default_factory=list)  # (size, mtime_ns) per image

    @property
    def labelled(self) -> bool:
        return self.how != "none"

    def __len__(self) -> int:
        return len(self.names)

    def shards(self, size: int) -> list[Shard]:
        out = []
        for index, start in enumerate(range(0, len(self.names), size)):
            stop = min(start + size, len(self.names))
            h = hashlib.sha256()
            for i in range(start, stop):
                h.update(f"{self.names[i]}\0{self.stats[i][0]}\0{self.stats[i][1]}\0{self.labels[i]}\n".encode())
            out.append(
                Shard(
                    index,
                    start,
                    tuple(self.names[start:stop]),
                    tuple(self.labels[start:stop]),
                    h.hexdigest(),
                    str(self.root),
                )
            )
        return out

    def key(self) -> str:
        """What identifies the whole set (every image's path, size, time and label)."""
        h = hashlib.sha256()
        for name, (size, mtime), label in zip(self.names, self.stats, self.labels):
            h.update(f"{name}\0{size}\0{mtime}\0{label}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {"folder": str(self.root), "images": len(self), "labels_from": self.how, "key": self.key()[:16]}


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_index(text: str, classes: list[str]) -> int | None:
    """A label as a class index: the index itself, a class name (case and ``_`` for spaces aside) or a synset id
    (for a 1000-class head); None when it is none of these."""
    text = text.strip()
    if text.isdigit():
        return int(text) if int(text) < len(classes) else None
    by_name, by_synset = _indices(tuple(classes))
    if _norm(text) in by_name:
        return by_name[_norm(text)]
    return by_synset.get(text) if SYNSET.match(text) else None


@lru_cache(maxsize=4)
def _indices(classes: tuple[str, ...]) -> tuple[dict[str, int], dict[str, int]]:
    """Class index by normalised name, and by synset id (a 1000-class head): built once, not once per CSV row."""
    by_name = {_norm(c): i for i, c in reversed(list(enumerate(classes)))}
    by_synset = {s: i for i, s in enumerate(imagenet_synsets())} if len(classes) == 1000 else {}
    return by_name, by_synset


def _unknown(text: str, classes: list[str]) -> str:
    """Why a label is no class of the model, in words."""
    if text.strip().isdigit():
        return f"class {text.strip()}, but the model has {len(classes)} classes (0..{len(classes) - 1})"
    return f"{text.strip()!r}, which is not one of the bundle's labels (labels.txt)" + (
        " nor an ImageNet synset id" if len(classes) == 1000 else ""
    )


def _from_folders(root: Path, classes: list[str], folders: list[Path]) -> tuple[list[str], list[int], str]:
    names, labels = [], []
    synsets = all(SYNSET.match(f.name) for f in folders) and len(classes) == 1000
    index_of = {s: i for i, s in enumerate(imagenet_synsets())} if synsets else None
    for folder in folders:
        where = f"--data subfolder {folder.name!r}"
        if index_of is not None:
            if folder.name not in index_of:
                raise DataError(f"{where} is not an ImageNet-1k synset id; rename it or pass --labels FILE.csv")
            label = index_of[folder.name]
        else:
            label = _class_index(folder.name, classes)
            if label is None:
                raise DataError(f"{where} names {_unknown(folder.name, classes)}; rename it, or pass --labels FILE.csv")
        for p in _images_under(folder):
            names.append(p.relative_to(root).as_posix())
            labels.append(label)
    return names, labels, "synsets" if synsets else "folders"


def _from_csv(root: Path, csv_path: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"--labels {str(csv_path)!r} cannot be read as text ({e}); pass a CSV of file,label rows"
        ) from None
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
    if rows and len(rows[0]) >= 2 and rows[0][0].strip().lower() in ("file", "filename", "image", "path", "imageid"):
        rows = rows[1:]  # a header
    if not rows:
        raise DataError(f"--labels {str(csv_path)!r} has no rows; give one file,label row per image")
    seen: dict[str, int] = {}
    missing = []
    for n, row in enumerate(rows, 1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"--labels {str(csv_path)!r} row {n} is not file,label; give one file,label row per image")
        name, text = row[0].strip(), row[1].strip()
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataError(
                f"--labels row {n} names {name!r}, not a path inside --data; give paths relative to the --data folder"
            )
        if SYNSET.match(text.split()[0]):  # ImageNet's LOC_val_solution.csv: the synset, then its boxes
            text = text.split()[0]
        label = _class_index(text, classes)
        if label is None:
            raise DataError(
                f"--labels row {n} ({name}) names {_unknown(text, classes)}; fix the label, or export with --labels "
                "naming your classes"
            )
        path = root / name
        if not path.is_file():
            # ImageNet's own lists name images without their extension
            found = [path.with_name(path.name + s) for s in (".JPEG", ".jpeg", ".jpg", ".png")]
            found = [p for p in found if p.is_file()]
            if not found:
                missing.append(name)
                continue
            path = found[0]
        seen[path.relative_to(root).as_posix()] = label
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(
            f"--labels names {missing[0]!r}{more}, not found under --data {str(root)!r}; "
            "fix the file names or pass the folder they are in"
        )
    names = sorted(seen)
    return names, [seen[n] for n in names]


def read_set(folder, classes: list[str], labels_csv=None) -> LabelledSet:
    """The validation set in ``folder``, checked before any image is decoded (DataError, one line, otherwise)."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"--data {str(root)!r} is not a folder; pass a folder of .jpg/.png images")
    if labels_csv is not None:
        names, labels = _from_csv(root, Path(labels_csv), classes)
        how = "csv"
    else:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and _images_under(p))
        top = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if folders and top:
            raise DataError(
                f"--data {str(root)!r} holds images both at its top ({top[0].name}) and in class subfolders; "
                "move them into their class's folder, or pass --labels FILE.csv"
            )
        if folders:
            names, labels, how = _from_folders(root, classes, folders)
        else:
            names = [p.relative_to(root).as_posix() for p in top]
            labels, how = [UNLABELLED] * len(names), "none"
    if not names:
        raise DataError(f"--data {str(root)!r} holds no .jpg/.png images; pass a folder with photographs")
    stats = []
    for name in names:
        st = (root / name).stat()
        stats.append((st.st_size, st.st_mtime_ns))
    return LabelledSet(root, names, labels, how, stats)
