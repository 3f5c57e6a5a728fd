"""Character vectors from an R package's lazy-load database (data/Rdata.rdx + Rdata.rdb).

Just enough of R's format to read janeaustenr without R: the .rdx index is a gzipped,
XDR-serialized list of (offset, length) records into the .rdb; each record is a 4-byte
big-endian length and a zlib stream holding one XDR-serialized object. Only character
vectors (STRSXP of CHARSXP) and the index's own integer/logical vectors, lists and
symbols are read.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

_NILVALUE, _REFSXP, _SYMSXP, _CHARSXP, _LGLSXP, _INTSXP, _STRSXP, _VECSXP, _LISTSXP = 254, 255, 1, 9, 10, 13, 16, 19, 2
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10


class RDataError(ValueError):
    """The file is not the kind of R data this reader handles."""


class _Reader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise RDataError("not an XDR (binary, big-endian) R serialization")
        self.data, self.pos = data, 2
        self.symbols: list[str] = []  # symbols seen so far, which later uses refer to by number
        version = self.int()
        self.pos += 8  # writer and minimal reader versions
        if version == 3:
            name_length = self.int()  # then the native encoding's name
            self.pos += name_length
        elif version != 2:
            raise RDataError(f"R serialization version {version} is not supported")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        if kind == _NILVALUE:
            return None
        if kind == _CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            text = self.data[self.pos : self.pos + n].decode("utf-8")
            self.pos += n
            return text
        if kind == _STRSXP:
            value = [self.item() for _ in range(self.int())]
        elif kind in (_INTSXP, _LGLSXP):
            n = self.int()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == _VECSXP:
            value = [self.item() for _ in range(self.int())]
        elif kind == _LISTSXP:  # a pairlist: attributes
            pairs = {}
            while kind == _LISTSXP:
                if flags & _HAS_ATTR:
                    self.item()
                tag = self.symbol() if flags & _HAS_TAG else None
                pairs[tag] = self.item()
                flags = self.int()
                kind = flags & 0xFF
            return pairs
        else:
            raise RDataError(f"R object type {kind} is not supported")
        if flags & _HAS_ATTR:
            attributes = self.item()
            if kind == _VECSXP and "names" in attributes:
                return dict(zip(attributes["names"], value, strict=True))
        return value

    def symbol(self) -> str:
        flags = self.int()
        if flags & 0xFF == _REFSXP:
            return self.symbols[(flags >> 8) - 1]
        if flags & 0xFF != _SYMSXP:
            raise RDataError(f"expected a symbol, found R object type {flags & 0xFF}")
        self.symbols.append(self.item())
        return self.symbols[-1]


def read_lazyload_db(rdx: Path) -> dict[str, list[str]]:
    """Every object named in `rdx` (…/Rdata.rdx, beside its .rdb), by name."""
    index = _Reader(gzip.decompress(rdx.read_bytes())).item()
    blob = rdx.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[offset : offset + length]
        (size,) = struct.unpack(">I", record[:4])
        payload = zlib.decompress(record[4:])
        if len(payload) != size:
            raise RDataError(f"{name}: record holds {len(payload)} bytes, its header says {size}")
        objects[name] = _Reader(payload).item()
    return objects
