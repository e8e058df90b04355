#!/usr/bin/env python3
"""Generate damselfly's OCI test images, byte-for-byte reproducibly.

    generate.py --set small --out DIR

writes one OCI image layout per image of the set (DIR/<name>-<tag>/ with
oci-layout, index.json and blobs/sha256/...) and DIR/catalog.json, which lists
for each image its ref and every blob (digest, size, kind) that a client
pulling it fetches. The same set always gives the same bytes: tar headers,
gzip headers and zstd flags are fixed, and file contents come from SHAKE-256
seeded by the layer and file names. Needs Python 3.11 (stdlib only) and, for
zstd layers, the `zstd` command. See README.md.
"""

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tarfile
from array import array
from dataclasses import dataclass
from functools import cache
from itertools import accumulate

MiB = 1 << 20
CHUNK = MiB
BLOCK = 512
MTIME = 1700000000
CREATED = "2023-11-14T22:13:20Z"
ZSTD_CMD = ["zstd", "-3", "--single-thread", "--quiet", "--stdout"]
GZIP_LEVEL = 6

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class File:
    """A regular file in a layer; text is compressible, otherwise random."""

    path: str
    size: int
    text: bool = False


@dataclass(frozen=True)
class Entry:
    """Any tar entry with explicit metadata (the `tricky` set): kind is one of
    file, dir, symlink, hardlink, char, block, fifo; a file's body is `size`
    bytes of text seeded like a File's; `link` is the symlink or hardlink
    target; xattrs become PAX `SCHILY.xattr.*` records."""

    path: str
    kind: str = "file"
    mode: int | None = None  # default: 0755 for dirs, 0777 for symlinks, else 0644
    uid: int = 0
    gid: int = 0
    mtime: int | float = MTIME
    size: int = 0
    link: str = ""
    dev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Layer:
    """A layer; its name seeds the contents, so equal layers give equal blobs.
    Its tar holds the parent dirs of `files`, the files, then `entries` as
    given, with headers in `tar_format` (ustar, pax or gnu)."""

    name: str
    compression: str
    files: tuple[File, ...] = ()
    entries: tuple[Entry, ...] = ()
    tar_format: str = "ustar"


@dataclass(frozen=True)
class Platform:
    """One image manifest: the layers of one linux architecture."""

    architecture: str
    layers: tuple[Layer, ...]
    variant: str | None = None

    def label(self) -> str:
        return "/".join(filter(None, ["linux", self.architecture, self.variant]))


@dataclass(frozen=True)
class Image:
    """A tagged image: one manifest, or an image index over several."""

    name: str
    tag: str
    platforms: tuple[Platform, ...]
    multiarch: bool = False

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.tag}"

    @property
    def layout(self) -> str:
        """Directory of its OCI layout, which is also its ref name there."""
        return f"{self.name.rsplit('/', 1)[-1]}-{self.tag}"


def small_set() -> list[Image]:
    """A few MiB: every layer kind, a layer shared by two images, an index."""
    shared = Layer("multi-gzip", "gzip", (
        File("damselfly/multi/gzip/random.bin", MiB + 12345),
        File("damselfly/multi/gzip/notes.txt", 65536 + 7, text=True),
    ))
    multi = Image("damselfly/multi", "v1", (Platform("amd64", (
        Layer("multi-empty", "gzip"),
        Layer("multi-tiny", "gzip", (File("damselfly/multi/tiny.txt", 7, text=True),)),
        shared,
        Layer("multi-zstd", "zstd", (
            File("damselfly/multi/zstd/random.bin", 2 * MiB + 777),
            File("damselfly/multi/zstd/notes.txt", 300000 + 3, text=True),
        )),
        Layer("multi-tar", "none", (
            File("damselfly/multi/tar/random.bin", MiB + 12345),
            File("damselfly/multi/tar/notes.txt", 500, text=True),
        )),
    )),))
    own = Layer("shared-own", "gzip", (File("damselfly/shared/random.bin", 200000 + 1),))
    shared_image = Image("damselfly/shared", "v1", (Platform("amd64", (shared, own)),))
    multiarch = Image("damselfly/multiarch", "v1", tuple(
        Platform(arch, (Layer(f"multiarch-{arch}", "gzip", (
            File(f"damselfly/multiarch/{arch}.bin", size),
            File("damselfly/multiarch/arch.txt", 100, text=True),
        )),), variant)
        for arch, variant, size in [("amd64", None, 300000 + 11), ("arm64", "v8", 400000 + 13)]
    ), multiarch=True)
    return [multi, shared_image, multiarch]


def large_set() -> list[Image]:
    """One 512 MiB + 4093 bytes file in an uncompressed layer, plus a small one."""
    return [Image("damselfly/large", "v1", (Platform("amd64", (
        Layer("large-data", "none", (File("damselfly/large/data.bin", 512 * MiB + 4093),)),
        Layer("large-meta", "gzip", (File("damselfly/large/notes.txt", 100000 + 1, text=True),)),
    )),))]


def bench_image(name: str, mib_sizes: list[int]) -> Image:
    """Uncompressed layers of the given sizes in MiB, each plus odd bytes."""
    layers = tuple(
        Layer(f"{name}-{i}", "none", (
            File(f"damselfly/{name}/layer{i}.bin", mib * MiB + 4093 * i),
            File(f"damselfly/{name}/layer{i}.txt", 100 * i + 1, text=True),
        ))
        for i, mib in enumerate(mib_sizes, start=1)
    )
    return Image(f"damselfly/{name}", "v1", (Platform("amd64", layers),))


# security.capability, VFS_CAP_REVISION_2 with the effective bit: cap_net_bind_service
# (bit 10) permitted and effective, nothing inheritable.
CAP_NET_BIND_SERVICE = bytes([1, 0, 0, 2, 0, 4, 0, 0] + [0] * 12)
LONG_DIR = "damselfly/tricky/" + "long-directory-name-" * 4
LONG_TARGET = "/".join(["a-long-symlink-target-component"] * 5)


def tricky_set() -> list[Image]:
    """One image whose four layers hold every kind of entry and attribute
    containerd's applier handles (see README.md); the layers are written
    with explicit headers, so they need no File contents."""
    d, f, s, h = "dir", "file", "symlink", "hardlink"
    base = Layer("tricky-base", "gzip", tar_format="pax", entries=(
        Entry(".wh.ghost"),  # a whiteout in the bottom layer: nothing to hide
        Entry("etc/", d),
        Entry("etc/.wh..wh..opq"),  # an opaque dir in the bottom layer
        Entry("etc/old.conf", size=30),
        Entry("etc/hosts", size=40),
        Entry("var/", d),
        Entry("var/cache/", d, mode=0o700),
        Entry("var/cache/a", size=10),
        Entry("var/cache/sub/", d),
        Entry("var/cache/sub/b", size=11),
        Entry("var/log/", d),
        Entry("var/log/keep", size=12),
        Entry("opt/", d),
        Entry("opt/app/", d),
        Entry("opt/app/old", size=13),
        Entry("srv/", d, mode=0o750, uid=1000, gid=1001, mtime=1400000000,
              xattrs=(("user.tag", b"srv-lower"),)),
        Entry("keep-old/", d, mode=0o750, mtime=1450000000),
        Entry("keep-old/f", size=4),
        Entry("r/", d),
        Entry("r/f2d", size=5),
        Entry("r/d2f/", d),
        Entry("r/d2f/child", size=6),
        Entry("r/f2s", size=7),
        Entry("bin/", d),
        Entry("bin/su", mode=0o4755, size=20),
        Entry("bin/sg", mode=0o2755, gid=42, size=21),
        Entry("bin/ping", mode=0o755, size=22, xattrs=(("security.capability", CAP_NET_BIND_SERVICE),)),
        Entry("tmp/", d, mode=0o1777),
        Entry("usr/", d),
        Entry("usr/lib/", d, mode=0o700, uid=7, gid=8),
        Entry("lib", s, link="usr/lib"),
    ))
    links = Layer("tricky-links", "zstd", tar_format="pax", entries=(
        Entry("etc/.wh.old.conf"),
        Entry("var/.wh.cache"),
        Entry("data/", d, mode=0o2775, uid=1000, gid=1000),
        Entry("data/orig", mode=0o640, uid=1000, gid=1000, size=50, mtime=1600000000.5,
              xattrs=(("user.note", b"orig"),)),
        Entry("data/hard", h, mode=0o640, uid=1000, gid=1000, link="data/orig", mtime=1600000000.5),
        Entry(f"{LONG_DIR}/{'long-file-name-' * 8}", size=60, mtime=1600000001.25),
        Entry(f"{LONG_DIR}/hard-to-long", h, link=f"{LONG_DIR}/{'long-file-name-' * 8}", mtime=1600000001.25),
        Entry("data/rel", s, link="orig", xattrs=(("user.on-symlink", b"ignored"),)),
        Entry("data/abs", s, link="/etc/hosts"),
        Entry("data/dangling", s, link="nowhere/at/all"),
        Entry("data/long-target", s, link=LONG_TARGET),
        Entry("data/hard-to-symlink", h, mode=0o777, link="data/dangling"),
        Entry("data/bigid", uid=3000000, gid=3000001, size=8),
        Entry("dev/", d),
        Entry("dev/null", "char", mode=0o666, dev=(1, 3)),
        Entry("dev/loop0", "block", mode=0o660, gid=6, dev=(7, 0)),
        Entry("dev/fifo", "fifo", mode=0o620, uid=5),
        Entry("srv/data/x", size=9),  # srv/ comes from the layer below
        Entry("srv/", d, mode=0o705, mtime=1450000001),  # then described: user.tag stays
        Entry("data/implicit/f", size=9),  # an implicit dir in a setgid one: 0755
        Entry("new/deep/file", size=9),  # no new/ anywhere
        Entry("lib/implicit.so", size=9),  # lib is a symlink below
        Entry("mt/", d, mtime=1300000000),
        Entry("mt/a", size=3),
        Entry("mt/sub/", d, mtime=1300000001),
        Entry("mt/sub/b", size=3),
        Entry("times/before-1970", size=3, mtime=-100),  # containerd: the epoch
        Entry("times/after-2262", size=3, mtime=32503680000),  # year 3000: the epoch
        Entry("late/f", size=3),
        Entry("late/", d, mode=0o711, mtime=1300000002),  # after its child
    ))
    replace = Layer("tricky-replace", "none", tar_format="gnu", entries=(
        Entry("opt/app/", d, mode=0o755),
        Entry("opt/app/.wh..wh..opq"),
        Entry("opt/app/new", size=14),
        Entry("r/f2d/", d),
        Entry("r/f2d/inside", size=15),
        Entry("r/d2f", size=16),
        Entry("r/f2s", s, link="f2d"),
        Entry(f"{LONG_DIR}/gnu-{'x' * 120}", size=17),
        Entry("data/gnu-long-target", s, link=f"../{LONG_DIR}/gnu-{'x' * 120}"),
    ))
    top = Layer("tricky-top", "gzip", tar_format="pax", entries=(
        Entry("opt/app/extra", size=18),  # opt/app is opaque below
        Entry("keep-old/.wh..wh..opq"),  # implicit, childless: keeps its lower mtime
        Entry("var/", d, mtime=1200000000, xattrs=(("trusted.overlay.opaque", b"y"),)),
        Entry("lnkabs", s, link="/srv"),
        Entry("lnkabs/via-absolute", size=19),
        Entry("lnkrel", s, link="mt/sub"),
        Entry("lnkrel/via-relative", size=19),
        Entry("esc", s, link="../../../.."),
        Entry("esc/escaped", size=19),
    ))
    return [Image("damselfly/tricky", "v1", (Platform("amd64", (base, links, replace, top)),))]
# ------------------------------------------------------------ compressible ---
# Realistic, gzip-compressible file contents for the `compressible` set:
# source-like text, JSON records and ELF-like symbol tables (about 3.9:1,
# 3.5:1 and 2.9:1 with gzip -6), all from SHAKE-256.


@dataclass(frozen=True)
class StyledFile(File):
    """A regular file whose contents follow `style`, a key of STYLES."""

    style: str = "source"


def weighted_table(weighted: list[tuple[bytes, int]]) -> tuple[bytes, ...]:
    """256 entries, each token repeated by its weight: a random byte picks one."""
    table = tuple(token for token, weight in weighted for _ in range(weight))
    assert len(table) == 256, f"weights add up to {len(table)}, not 256"
    return table


SOURCE_TOKENS = weighted_table([
    (b"; ", 12), (b" {", 6), (b"}", 6), (b", ", 12), (b"(", 9), (b")", 9), (b"let ", 6), (b"let mut ", 4),
    (b" = ", 12), (b"fn ", 3), (b"if ", 4), (b" else ", 2), (b"return ", 3), (b"match ", 2), (b"for ", 2),
    (b" in ", 2), (b"self.", 8), (b"Some(", 3), (b"None", 2), (b"Ok(", 3), (b"Err(", 2), (b".unwrap()", 2),
    (b"?", 4), (b".len()", 2), (b"::new(", 3), (b"&mut ", 2), (b"// ", 3), (b"layer", 5), (b"digest", 5),
    (b"offset", 5), (b"size", 5), (b"buffer", 4), (b"reader", 4), (b"entry", 5), (b"path", 5),
    (b"snapshot", 4), (b"parent", 4), (b"index", 4), (b"count", 4), (b"context", 3), (b"error", 4),
    (b"result", 3), (b"state", 3), (b"chunk", 3), (b"bytes", 3), (b"header", 3), (b"target", 3),
    (b"source", 3), (b"length", 3), (b"name", 3), (b"mode", 2), (b"0", 3), (b"1", 3), (b"4096", 2),
    (b"512", 2), (b" as u64", 2), (b": usize", 2), (b": &str", 2), (b"String", 2), (b"Vec<u8>", 2),
    (b"Result<", 2), (b">", 2), (b" + ", 3), (b" - ", 2), (b" == ", 2), (b"_", 5), (b'"', 2),
])


@cache
def source_lines() -> tuple[bytes, ...]:
    """65536 source-like lines, indented 0-3 levels, 8 tokens each."""
    r = hashlib.shake_256(b"damselfly/source-lines").digest(65536 * 9)
    return tuple(
        b"    " * (r[i] & 3) + b"".join(map(SOURCE_TOKENS.__getitem__, r[i + 1:i + 9])).strip() + b"\n"
        for i in range(0, len(r), 9)
    )


def source_text(key: str, length: int) -> bytes:
    """Lines of source_lines() picked at random."""
    lines, out, part = source_lines(), b"", 0
    while len(out) < length:
        picks = array("H", hashlib.shake_256(f"{key}/{part}".encode()).digest(2 * (length // 32 + 32)))
        if sys.byteorder != "little":
            picks.byteswap()
        out += b"".join(map(lines.__getitem__, picks))
        part += 1
    return out[:length]


JSON_NAMES = tuple(b"%s-%s" % (a, b)
                   for a in b"alpha bravo coral delta ember fjord grove harbor iris juniper kestrel lumen maple nimbus opal pine".split()
                   for b in b"api db cache worker proxy batch edge auth queue store index feed mail search log sync".split())
JSON_KINDS = b"layer config manifest index blob snapshot lease ingest".split()
JSON_STATES = b"ready pending failed unpacked".split()
JSON_RECORD = (b'{"id":%d,"name":"%s","kind":"%s","state":"%s","size":%d,"digest":"sha256:%s",'
               b'"labels":{"zone":"z%d","tier":%d}}\n')


def json_records(key: str, length: int) -> bytes:
    """One JSON record a line, each with a random digest, name, size and labels."""
    records, have, n, part = [], 0, 0, 0
    while have < length:
        r = hashlib.shake_256(f"{key}/{part}".encode()).digest(36 * 1024)
        for i in range(0, len(r), 36):
            record = JSON_RECORD % (
                n, JSON_NAMES[r[i + 32]], JSON_KINDS[r[i + 33] & 7], JSON_STATES[r[i + 33] >> 6],
                int.from_bytes(r[i + 28:i + 32], "little") >> (r[i + 34] & 31), r[i:i + 32].hex().encode(),
                r[i + 35] & 7, r[i + 35] >> 6)
            records.append(record)
            have += len(record)
            n += 1
            if have >= length:
                break
        part += 1
    return b"".join(records)[:length]


SYMBOL = 24  # bytes of an Elf64_Sym


def symbol_table(key: str, length: int) -> bytes:
    """Elf64_Sym-like entries: rising name offsets and addresses, small sizes."""
    n = length // SYMBOL + 1
    r = hashlib.shake_256(key.encode()).digest(4 * n)
    name = array("I", accumulate((b & 31) + 8 for b in r[:n]))
    value = array("Q", accumulate(((b & 0x3F) + 1) * 16 for b in r[n:2 * n]))
    value = array("Q", (0x401000 + v for v in value))
    size = array("Q", (b * 8 for b in r[2 * n:3 * n]))
    if sys.byteorder != "little":
        for column in (name, value, size):
            column.byteswap()
    table = bytearray(SYMBOL * n)
    memoryview(table).cast("I")[0::6] = name
    table[4::SYMBOL] = r[3 * n:].translate(bytes((0x12, 0x11, 0x22, 0x02) * 64))
    table[6::SYMBOL] = r[3 * n:].translate(bytes(b & 15 for b in range(256)))
    memoryview(table).cast("Q")[1::3] = value
    memoryview(table).cast("Q")[2::3] = size
    return bytes(table[:length])


STYLES = {"source": source_text, "json": json_records, "symbols": symbol_table}


def styled_files(layer: str, style: str, count: int, smallest: int, doublings: int, ext: str) -> tuple[File, ...]:
    """`count` files of `style` under damselfly/compressible/<layer>/, 64 a
    directory, sized between `smallest` and `smallest << doublings` bytes
    (each doubling about as likely)."""
    r = hashlib.shake_256(f"{layer}/sizes".encode()).digest(5 * count)
    files = []
    for i in range(count):
        base = smallest << (r[5 * i] % doublings)
        size = base + int.from_bytes(r[5 * i + 1:5 * i + 5], "little") % base
        files.append(StyledFile(f"damselfly/compressible/{layer}/d{i // 64:02}/f{i:04}.{ext}", size, style=style))
    return tuple(files)


def compressible_set() -> list[Image]:
    """~350 MiB in ~3,900 files of text, JSON and binary tables: gzip -6 ~3:1."""
    layers = (
        Layer("compressible-etc", "gzip", styled_files("etc", "json", 600, 256, 6, "json")),
        Layer("compressible-src", "gzip", styled_files("src", "source", 2600, 512, 9, "rs")),
        Layer("compressible-data", "gzip", styled_files("data", "json", 550, 4096, 8, "json")),
        Layer("compressible-bin", "gzip", styled_files("bin", "symbols", 180, 16384, 8, "so")),
    )
    return [Image("damselfly/compressible", "v1", (Platform("amd64", layers),))]


SETS = {
    "small": small_set,
    "large": large_set,
    "bench": lambda: [bench_image("bench", [400, 300, 200, 124])],
    "bench256": lambda: [bench_image("bench256", [128, 96, 32])],
    "tricky": tricky_set,
    "compressible": compressible_set,
}


def file_chunks(seed: str, file: File):
    """Yield the file's deterministic contents, CHUNK bytes at a time."""
    for index, offset in enumerate(range(0, file.size, CHUNK)):
        key = f"{seed}/{file.path}/{index}"
        length = min(CHUNK, file.size - offset)
        if isinstance(file, StyledFile):
            yield STYLES[file.style](key, length)
            continue
        yield text_block(key, length) if file.text else hashlib.shake_256(key.encode()).digest(length)


def text_block(key: str, length: int) -> bytes:
    """Compressible text: numbered lines, cut to `length` bytes."""
    line = f"{key} damselfly test line ".encode()
    lines = (line + b"%09d\n" % n for n in range(length // (len(line) + 10) + 1))
    return b"".join(lines)[:length]


def tar_header(path: str, size: int = 0, directory: bool = False) -> bytes:
    info = tarfile.TarInfo(path)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = size
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


DEFAULT_MODE = {"dir": 0o755, "symlink": 0o777}
TAR_FORMAT = {"ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}
TAR_TYPE = {
    "file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def entry_header(entry: Entry, tar_format: int) -> bytes:
    """The entry's header block(s); PAX or GNU records come first where the
    format needs them (long names and targets, big ids, fractional mtimes,
    xattrs)."""
    info = tarfile.TarInfo(entry.path)
    info.type = TAR_TYPE[entry.kind]
    info.mode = entry.mode if entry.mode is not None else DEFAULT_MODE.get(entry.kind, 0o644)
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    info.mtime = entry.mtime
    info.size = entry.size
    info.linkname = entry.link
    info.devmajor, info.devminor = entry.dev
    if entry.xattrs:
        if tar_format != tarfile.PAX_FORMAT:
            raise ValueError(f"{entry.path}: xattrs need a pax layer")
        # Values are bytes; surrogateescape gives tarfile back those exact bytes.
        info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in entry.xattrs}
    return info.tobuf(tar_format, "utf-8", "surrogateescape")


def parent_dirs(layer: Layer) -> list[str]:
    dirs = set()
    for file in layer.files:
        parts = file.path.split("/")[:-1]
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(dirs)


def write_tar(out, layer: Layer) -> None:
    """Write the layer as a tar: no record padding, just the two end blocks."""
    for directory in parent_dirs(layer):
        out.write(tar_header(directory, directory=True))
    for file in layer.files:
        out.write(tar_header(file.path, file.size))
        for chunk in file_chunks(layer.name, file):
            out.write(chunk)
        out.write(bytes(-file.size % BLOCK))
    for entry in layer.entries:
        out.write(entry_header(entry, TAR_FORMAT[layer.tar_format]))
        if entry.kind == "file":
            out.write(text_block(f"{layer.name}/{entry.path}", entry.size))
            out.write(bytes(-entry.size % BLOCK))
    out.write(bytes(2 * BLOCK))


class HashingWriter:
    """Passes writes on to `target` and keeps their sha256."""

    def __init__(self, target):
        self.target = target
        self.hash = hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()

    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def tar_plain(out, layer: Layer) -> str:
    tar = HashingWriter(out)
    write_tar(tar, layer)
    return tar.digest()


def tar_gzip(out, layer: Layer) -> str:
    with gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=out, mtime=0) as gz:
        tar = HashingWriter(gz)
        write_tar(tar, layer)
    return tar.digest()


def tar_zstd(out, layer: Layer) -> str:
    out.flush()
    with subprocess.Popen(ZSTD_CMD, stdin=subprocess.PIPE, stdout=out) as zstd:
        tar = HashingWriter(zstd.stdin)
        write_tar(tar, layer)
        zstd.stdin.close()
    if zstd.returncode:
        raise RuntimeError(f"zstd exited with {zstd.returncode}")
    return tar.digest()


WRITE_TAR = {"none": tar_plain, "gzip": tar_gzip, "zstd": tar_zstd}


def descriptor(media_type: str, digest: str, size: int) -> dict:
    return {"mediaType": media_type, "digest": digest, "size": size}


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, root: str):
        self.root = root
        self.blobs = os.path.join(root, "blobs", "sha256")
        self.partial = os.path.join(self.blobs, ".partial")
        os.makedirs(self.blobs)
        self.write_json("oci-layout", {"imageLayoutVersion": "1.0.0"})

    def write_json(self, name: str, obj: dict) -> None:
        with open(os.path.join(self.root, name), "wb") as f:
            f.write(canonical_json(obj))

    def commit(self, digest: str) -> None:
        os.replace(self.partial, os.path.join(self.blobs, digest.removeprefix("sha256:")))

    def add_layer(self, layer: Layer) -> tuple[dict, str]:
        """Write the layer's blob; return its descriptor and diff_id."""
        with open(self.partial, "wb") as out:
            diff_id = WRITE_TAR[layer.compression](out, layer)
        if layer.compression == "none":
            digest = diff_id
        else:
            with open(self.partial, "rb") as blob:
                digest = "sha256:" + hashlib.file_digest(blob, "sha256").hexdigest()
        size = os.path.getsize(self.partial)
        self.commit(digest)
        return descriptor(MT_LAYER[layer.compression], digest, size), diff_id

    def add_json(self, media_type: str, obj: dict) -> dict:
        data = canonical_json(obj)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(self.partial, "wb") as out:
            out.write(data)
        self.commit(digest)
        return descriptor(media_type, digest, len(data))


def canonical_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def platform_json(platform: Platform) -> dict:
    variant = {"variant": platform.variant} if platform.variant else {}
    return {"architecture": platform.architecture, "os": "linux"} | variant


def image_config(image: Image, platform: Platform, diff_ids: list[str]) -> dict:
    return {"created": CREATED} | platform_json(platform) | {
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Labels": {"org.opencontainers.image.title": image.ref},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }


def catalog_blob(desc: dict, kind: str, platform: Platform | None, **extra) -> dict:
    entry = {"digest": desc["digest"], "size": desc["size"], "kind": kind, "mediaType": desc["mediaType"]}
    if platform:
        entry["platform"] = platform.label()
    return entry | extra


def write_manifest(layout: Layout, image: Image, platform: Platform) -> tuple[dict, list[dict]]:
    """Write one platform's layers, config and manifest; return the manifest's
    descriptor and its catalog blobs (manifest, config, layers)."""
    layers = [layout.add_layer(layer) for layer in platform.layers]
    config = layout.add_json(MT_CONFIG, image_config(image, platform, [diff_id for _, diff_id in layers]))
    manifest = layout.add_json(MT_MANIFEST, {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": config,
        "layers": [desc for desc, _ in layers],
    })
    blobs = [catalog_blob(manifest, "manifest", platform), catalog_blob(config, "config", platform)]
    blobs += [catalog_blob(desc, "layer", platform, diff_id=diff_id) for desc, diff_id in layers]
    return manifest, blobs


def write_index(layout: Layout, manifests: list[tuple[dict, Platform]]) -> dict:
    return layout.add_json(MT_INDEX, {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [desc | {"platform": platform_json(platform)} for desc, platform in manifests],
    })


def unique_by_digest(blobs: list[dict]) -> list[dict]:
    first = {}
    for blob in blobs:
        first.setdefault(blob["digest"], blob)
    return list(first.values())


def write_image(out_dir: str, image: Image) -> dict:
    """Write the image's OCI layout; return its catalog entry."""
    layout = Layout(os.path.join(out_dir, image.layout))
    written = [write_manifest(layout, image, platform) for platform in image.platforms]
    blobs = [blob for _, manifest_blobs in written for blob in manifest_blobs]
    if image.multiarch:
        top = write_index(layout, [(desc, p) for (desc, _), p in zip(written, image.platforms)])
        blobs.insert(0, catalog_blob(top, "index", None))
    else:
        top = written[0][0]
    layout.write_json("index.json", {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [top | {"annotations": {REF_NAME: image.layout}}],
    })
    return {"ref": image.ref, "layout": image.layout, "oci_ref": image.layout, **top,
            "blobs": unique_by_digest(blobs)}


def write_catalog(out_dir: str, catalog: list[dict]) -> str:
    """Write catalog.json last and atomically: its presence means complete."""
    path = os.path.join(out_dir, "catalog.json")
    with open(path + ".partial", "w") as f:
        json.dump(catalog, f, indent=2)
        f.write("\n")
    os.replace(path + ".partial", path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="small", choices=SETS, help="image set (default: small)")
    parser.add_argument("--out", required=True, help="output directory; must not exist or be empty")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if os.listdir(args.out):
        parser.error(f"{args.out} is not empty")
    catalog = [write_image(args.out, image) for image in SETS[args.set]()]
    for entry in catalog:
        total = sum(blob["size"] for blob in entry["blobs"])
        print(f"{entry['ref']} {entry['digest']} {len(entry['blobs'])} blobs {total} bytes")
    print(write_catalog(args.out, catalog))
    return 0


if __name__ == "__main__":
    sys.exit(main())
