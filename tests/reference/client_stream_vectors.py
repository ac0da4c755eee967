#!/usr/bin/env python3
"""Independent reference for keywarden's client streams, suite 0x06
(docs/FORMAT.md, "Client streams under a data key"), written from FORMAT.md
alone and sharing no code with the other references.

For each vector it rebuilds the plaintext, computes the key commitment from
the data key (HMAC-SHA256 of "kw1.cmt" || 0x00 || salt, with Python's hmac
and hashlib) and derives the stream key (SP 800-108r1 counter-mode KDF with
CMAC-AES-256, label kw1.cst), builds the header and the
associated data, seals the stream again with the vector's salt and nonce
prefix and compares the envelope (whole, or by length and SHA-256) and every
segment's nonce and tag, then opens it as a reader would. It checks that a
reader refuses another data key at the commitment, before any segment; and
that another tenant or context, any flipped header bit, a dropped, swapped
or appended segment, or an envelope cut short, each fail.

Usage: python client_stream_vectors.py tests/data/client_stream_vectors.json
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.kbkdf import CounterLocation, KBKDFCMAC, Mode

SUITE_CLIENT_STREAM = 0x06
SUITE_DATA_KEY = 0x05
WRAPPED_LEN = {0x01: 83, 0x02: 99}  # by the wrapped data key's kind byte
SALT_LEN, PREFIX_LEN, COMMITMENT_LEN, TAG_LEN = 16, 7, 32, 16
SEGMENT_LEN = 65536
SEGMENT_PLAINTEXT_LEN = SEGMENT_LEN - TAG_LEN


class Undecryptable(Exception):
    """Any failure: one kind, no detail."""


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def derive(key: bytes, label: bytes, salt: bytes) -> bytes:
    return KBKDFCMAC(
        algorithm=algorithms.AES,
        mode=Mode.CounterMode,
        length=32,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=salt,
        fixed=None,
    ).derive(key)


def commit(key: bytes, salt: bytes) -> bytes:
    return hmac.new(key, b"kw1.cmt" + b"\x00" + salt, hashlib.sha256).digest()


def enc(b: bytes) -> bytes:
    return u32(len(b)) + b


def associated_data(header: bytes, tenant: str, context: dict[str, str]) -> bytes:
    entries = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    out = header + enc(tenant.encode("utf-8")) + u32(len(entries))
    for k, v in entries:
        out += enc(k) + enc(v)
    return out


def nonce(prefix: bytes, i: int, last: bool) -> bytes:
    return prefix + u32(i) + (b"\x01" if last else b"\x00")


def header_for(data_key: bytes, wrapped: bytes, salt: bytes, prefix: bytes) -> bytes:
    commitment = commit(data_key, salt)
    return bytes([0x01, SUITE_CLIENT_STREAM]) + u32(len(wrapped)) + wrapped + salt + prefix + commitment


def seal(data_key, wrapped, tenant, context, plaintext, salt, prefix) -> tuple[bytes, list]:
    header = header_for(data_key, wrapped, salt, prefix)
    aead = AESGCM(derive(data_key, b"kw1.cst", salt))
    aad = associated_data(header, tenant, context)
    count = max(1, -(-len(plaintext) // SEGMENT_PLAINTEXT_LEN))
    out, segments = bytearray(header), []
    for i in range(count):
        last = i == count - 1
        part = plaintext[i * SEGMENT_PLAINTEXT_LEN : (i + 1) * SEGMENT_PLAINTEXT_LEN]
        n = nonce(prefix, i, last)
        sealed = aead.encrypt(n, part, aad)
        segments.append({"nonce": n.hex(), "plaintext_length": len(part), "tag": sealed[-TAG_LEN:].hex()})
        out += sealed
    return bytes(out), segments


def parse_header(envelope: bytes) -> tuple[bytes, int]:
    """The wrapped data key and the header length."""
    if len(envelope) < 6 or envelope[0] != 0x01 or envelope[1] != SUITE_CLIENT_STREAM:
        raise Undecryptable
    w = int.from_bytes(envelope[2:6], "big")
    if w not in WRAPPED_LEN.values():
        raise Undecryptable
    h = 6 + w + SALT_LEN + PREFIX_LEN + COMMITMENT_LEN
    if len(envelope) < h:
        raise Undecryptable
    wrapped = envelope[6 : 6 + w]
    if wrapped[0] != 0x01 or wrapped[1] != SUITE_DATA_KEY or WRAPPED_LEN.get(wrapped[2]) != w:
        raise Undecryptable
    return wrapped, h


def open_header(envelope: bytes, data_key: bytes) -> tuple[int, bytes, bytes]:
    """Checks the commitment (before any segment): header length, stream
    key, nonce prefix."""
    _, h = parse_header(envelope)
    header = envelope[:h]
    salt = header[h - 55 : h - 39]
    prefix = header[h - 39 : h - 32]
    if not hmac.compare_digest(commit(data_key, salt), header[h - 32 :]):
        raise Undecryptable
    return h, derive(data_key, b"kw1.cst", salt), prefix


def read(envelope: bytes, data_key: bytes, tenant: str, context: dict[str, str]) -> bytes:
    h, stream_key, prefix = open_header(envelope, data_key)
    aead = AESGCM(stream_key)
    aad = associated_data(envelope[:h], tenant, context)
    body = envelope[h:]
    out = bytearray()
    i = 0
    while True:
        segment = body[i * SEGMENT_LEN : (i + 1) * SEGMENT_LEN]
        last = len(body) <= (i + 1) * SEGMENT_LEN
        if len(segment) < TAG_LEN or i >= 2**32:
            raise Undecryptable
        try:
            out += aead.decrypt(nonce(prefix, i, last), segment, aad)
        except InvalidTag:
            raise Undecryptable from None
        if last:
            return bytes(out)
        i += 1


def plaintext_of(vector: dict) -> bytes:
    if "plaintext" in vector:
        return bytes.fromhex(vector["plaintext"])
    p = vector["plaintext_pattern"]
    return bytes((p["multiplier"] * i + p["increment"]) % 256 for i in range(p["length"]))


def check_vector(vector: dict) -> list[str]:
    name = vector.get("name", "<unnamed>")
    errors: list[str] = []

    def expect(what: str, got, want) -> None:
        if got != want:
            errors.append(f"{name}: {what}: got {got!r}, expected {want!r}")

    data_key = bytes.fromhex(vector["data_key"])
    wrapped = bytes.fromhex(vector["wrapped_data_key"])
    tenant, context = vector["tenant"], vector["context"]
    salt, prefix = bytes.fromhex(vector["salt"]), bytes.fromhex(vector["nonce_prefix"])
    plaintext = plaintext_of(vector)

    expect("commitment", commit(data_key, salt).hex(), vector["commitment"])
    expect("stream_key", derive(data_key, b"kw1.cst", salt).hex(), vector["stream_key"])
    header = header_for(data_key, wrapped, salt, prefix)
    expect("header", header.hex(), vector["header"])
    expect("associated_data", associated_data(header, tenant, context).hex(), vector["associated_data"])
    envelope, segments = seal(data_key, wrapped, tenant, context, plaintext, salt, prefix)
    expect("segments", segments, vector["segments"])
    expect("envelope_length", len(envelope), vector["envelope_length"])
    expect("envelope_sha256", hashlib.sha256(envelope).hexdigest(), vector["envelope_sha256"])
    if "envelope" in vector:
        expect("envelope", envelope.hex(), vector["envelope"])
    expect("wrapped data key in the header", parse_header(envelope)[0], wrapped)
    try:
        expect("plaintext", read(envelope, data_key, tenant, context) == plaintext, True)
    except Undecryptable:
        return errors + [f"{name}: does not open"]

    def refused(what: str, fn, *args) -> None:
        try:
            fn(*args)
            errors.append(f"{name}: accepted {what}")
        except Undecryptable:
            pass

    other_key = bytes([data_key[0] ^ 1]) + data_key[1:]
    refused("another data key at the commitment", open_header, envelope, other_key)
    refused("another tenant", read, envelope, data_key, tenant + "x", context)
    refused("another context", read, envelope, data_key, tenant, {**context, "extra": ""})
    h = len(header)
    for bit in range(h * 8):
        bad = bytearray(envelope)
        bad[bit // 8] ^= 1 << (bit % 8)
        refused(f"header bit {bit} flipped", read, bytes(bad), data_key, tenant, context)
    body = envelope[h:]
    cuts = [
        ("cut inside the last segment", envelope[:-1]),
        ("header alone", envelope[:h]),
        ("a byte appended", envelope + b"\x00"),
    ]
    segs = [body[i : i + SEGMENT_LEN] for i in range(0, len(body), SEGMENT_LEN)]
    if len(segs) > 1:
        cuts.append(("last segment dropped", header + b"".join(segs[:-1])))
        cuts.append(("first two swapped", header + segs[1] + segs[0] + b"".join(segs[2:])))
        cuts.append(("first repeated", header + segs[0] + b"".join(segs)))
    for what, changed in cuts:
        refused(what, read, changed, data_key, tenant, context)
    return errors


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} VECTORS.json", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        vectors = json.load(f)
    if not isinstance(vectors, list) or not vectors:
        print(f"{argv[1]}: expected a non-empty JSON array", file=sys.stderr)
        return 1
    errors = [e for vector in vectors for e in check_vector(vector)]
    if errors:
        for e in errors:
            print(e, file=sys.stderr)
        print(f"python reference: {len(errors)} mismatches", file=sys.stderr)
        return 1
    print(f"python reference: {len(vectors)} client streams checked")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
