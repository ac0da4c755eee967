#!/usr/bin/env python3
"""Independent reference for keywarden's blind-index tokens (docs/FORMAT.md,
"Blind indexes"), written from FORMAT.md alone.

For each vector it applies every value's transformations (NFC, NFKC, full
case folding, trimming of White_Space, last N code points), builds the HMAC
input M (label, key version, bits, tenant, canonical context, values with
their transformations, length-prefixed), computes HMAC-SHA256 under the
index key with the `cryptography` package, truncates to the vector's bits
(zeroing the unused low bits) and prefixes the key version. Each step is
checked against the vector (transformed values, M, token).

Usage: python blind_index_vectors.py tests/data/blind_index_vectors.json
"""

from __future__ import annotations

import sys
import unicodedata

from cryptography.hazmat.primitives import hashes, hmac
from decrypt_vectors import run, u32

LABEL = b"kw1.bix"
MIN_BITS, MAX_BITS = 8, 256

# The Unicode White_Space property (PropList.txt; unchanged since Unicode 6.3).
# Not str.isspace(), which also takes U+001C..U+001F.
WHITE_SPACE = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680]
    + list(range(0x2000, 0x200B))
    + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)

CODES = {"nfc": 0x01, "nfkc": 0x02, "case-fold": 0x03, "trim": 0x04, "last-chars": 0x05}


def apply(text: str, step: dict) -> str:
    kind = step["kind"]
    if kind == "nfc":
        return unicodedata.normalize("NFC", text)
    if kind == "nfkc":
        return unicodedata.normalize("NFKC", text)
    if kind == "case-fold":
        return text.casefold()
    if kind == "trim":
        start, end = 0, len(text)
        while start < end and ord(text[start]) in WHITE_SPACE:
            start += 1
        while end > start and ord(text[end - 1]) in WHITE_SPACE:
            end -= 1
        return text[start:end]
    if kind == "last-chars":
        n = step["count"]
        return text[-n:] if n < len(text) else text
    raise ValueError(f"unknown transformation {kind!r}")


def transform(value: bytes, steps: list[dict]) -> bytes:
    if not steps:
        return value
    text = value.decode("utf-8")  # strict: a value with steps is text
    for step in steps:
        text = apply(text, step)
    return text.encode("utf-8")


def code(step: dict) -> bytes:
    out = bytes([CODES[step["kind"]]])
    if step["kind"] == "last-chars":
        out += u32(step["count"])
    return out


def enc(b: bytes) -> bytes:
    return u32(len(b)) + b


def hmac_input(version: int, bits: int, tenant: str, context: dict, values: list) -> bytes:
    m = LABEL + u32(version) + bits.to_bytes(2, "big") + enc(tenant.encode("utf-8"))
    entries = sorted(
        ((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items()),
        key=lambda kv: kv[0],
    )
    m += u32(len(entries))
    for k, v in entries:
        m += enc(k) + enc(v)
    m += u32(len(values))
    for transformed, steps in values:
        m += bytes([len(steps)]) + b"".join(code(s) for s in steps) + enc(transformed)
    return m


def token(key: bytes, version: int, bits: int, m: bytes) -> bytes:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits {bits}")
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(m)
    digest = h.finalize()
    n = (bits + 7) // 8
    t = bytearray(digest[:n])
    unused = n * 8 - bits
    t[-1] &= (0xFF << unused) & 0xFF
    return u32(version) + bytes(t)


def check_vector(vector: dict) -> list[str]:
    name = vector.get("name", "<unnamed>")
    errors: list[str] = []

    def expect(what: str, got, want) -> None:
        if got != want:
            errors.append(f"{name}: {what}: got {got!r}, expected {want!r}")

    values = []
    for i, v in enumerate(vector["values"]):
        transformed = transform(bytes.fromhex(v["value"]), v["transformations"])
        expect(f"values[{i}].transformed", transformed.hex(), v["transformed"])
        values.append((transformed, v["transformations"]))
    version, bits = vector["key_version"], vector["bits"]
    m = hmac_input(version, bits, vector["tenant"], vector["context"], values)
    expect("hmac_input", m.hex(), vector["hmac_input"])
    t = token(bytes.fromhex(vector["key"]), version, bits, m)
    expect("token", t.hex(), vector["token"])
    expect("token length", len(t), 4 + (bits + 7) // 8)
    return errors


def main(argv: list[str]) -> int:
    return run(argv, check_vector, "blind-index tokens computed")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
