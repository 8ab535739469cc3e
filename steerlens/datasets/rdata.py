"""A decoder for the character vectors of an R lazy-load database, without R.

An R data package's ``data/Rdata.rdb`` is a run of blocks, each a 4-byte big-endian length and
then zlib data holding one object in R's XDR serialization (format 2 or 3). This module decodes
the blocks that are character vectors, which is all the local text corpora need
(:mod:`steerlens.datasets.text`).
"""

from __future__ import annotations

import struct
import zlib

from steerlens.errors import InputError

_STRSXP, _CHARSXP, _UTF8_FLAG = 16, 9, 1 << 15


def read_r_character_vectors(rdb: bytes) -> list[list[str]]:
    """The character vectors of an R lazy-load database (``.rdb``), in file order.

    Each block is a 4-byte big-endian length, then zlib data holding one object in R's XDR
    serialization (format 2 or 3); only character vectors are decoded (NA elements become
    ``""``), and any other object raises :class:`InputError`.
    """
    out: list[list[str]] = []
    pos = 0
    while pos < len(rdb):
        inflater = zlib.decompressobj()
        try:
            blob = inflater.decompress(rdb[pos + 4 :])
        except zlib.error as err:
            raise InputError(f"not an R lazy-load database: bad zlib block at byte {pos}") from err
        pos = len(rdb) - len(inflater.unused_data)
        out.append(_unserialize_strings(blob))
    return out


def _unserialize_strings(blob: bytes) -> list[str]:
    def ints(at: int, n: int) -> tuple[int, ...]:
        return struct.unpack_from(f">{n}i", blob, at)

    if blob[:2] != b"X\n":
        raise InputError("only R's XDR serialization is supported")
    (version,) = ints(2, 1)
    at = 14
    if version == 3:
        (n_encoding,) = ints(at, 1)
        at += 4 + n_encoding
    flags, length = ints(at, 2)
    if flags & 0xFF != _STRSXP:
        raise InputError(f"R object of type {flags & 0xFF} is not a character vector")
    at += 8
    strings = []
    for _ in range(length):
        flags, n = ints(at, 2)
        at += 8
        if flags & 0xFF != _CHARSXP:
            raise InputError("malformed R character vector")
        if n < 0:
            strings.append("")
            continue
        encoding = "utf-8" if flags & _UTF8_FLAG else "latin-1"
        strings.append(blob[at : at + n].decode(encoding, errors="replace"))
        at += n
    return strings
