#!/usr/bin/env python3
"""Independent reference for keywarden's wrapped data keys, suite 0x05
(docs/FORMAT.md, "Wrapped data keys"), written from FORMAT.md alone and
sharing no code with the other references.

For each vector it parses the wrapped data key (83 bytes under a tenant key,
99 under a subject key), derives the wrap key with the SP 800-108r1 KDF in
counter mode (CMAC-AES-256) under the label kw1.dky, builds the associated
data (header || enc(tenant) || [m]_32 || context entries in byte order of
their keys), opens it with AES-256-GCM and checks the data key. It also
checks that the wrapped key does not open under any other label of the
format (kw1.dek, kw1.stm, kw1.skw), nor for another tenant or context, nor
with any single bit flipped, nor truncated or extended.

Usage: python data_key_vectors.py tests/data/data_key_vectors.json
"""

from __future__ import annotations

import json
import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.kbkdf import CounterLocation, KBKDFCMAC, Mode

FORMAT_V1 = 0x01
SUITE_DATA_KEY = 0x05
LABEL = b"kw1.dky"
OTHER_LABELS = (b"kw1.dek", b"kw1.stm", b"kw1.skw")
SALT_LEN, NONCE_LEN, KEY_LEN, TAG_LEN = 16, 12, 32, 16


class Undecryptable(Exception):
    """Any failure to parse or authenticate: one kind, no detail."""


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def derive(key: bytes, label: bytes, salt: bytes) -> bytes:
    """SP 800-108r1 4.1, counter mode, PRF CMAC-AES-256, r = 32, L = 256,
    fixed input = label || 0x00 || salt || [256]_32, the counter before it."""
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


def enc(b: bytes) -> bytes:
    return u32(len(b)) + b


def associated_data(header: bytes, tenant: str, context: dict[str, str]) -> bytes:
    entries = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items())
    out = header + enc(tenant.encode("utf-8")) + u32(len(entries))
    for k, v in entries:
        out += enc(k) + enc(v)
    return out


def parse(wrapped: bytes) -> tuple[dict, int]:
    """The key reference (as the vectors write it) and the header length."""
    if len(wrapped) < 3 or wrapped[0] != FORMAT_V1 or wrapped[1] != SUITE_DATA_KEY:
        raise Undecryptable
    if wrapped[2] == 0x01:
        header_len = 3 + 4 + SALT_LEN + NONCE_LEN
        key_ref = {"kind": "tenant", "version": int.from_bytes(wrapped[3:7], "big")}
    elif wrapped[2] == 0x02:
        header_len = 3 + 16 + 4 + SALT_LEN + NONCE_LEN
        key_ref = {
            "kind": "subject",
            "subject_key_id": wrapped[3:19].hex(),
            "version": int.from_bytes(wrapped[19:23], "big"),
        }
    else:
        raise Undecryptable
    if len(wrapped) != header_len + KEY_LEN + TAG_LEN:
        raise Undecryptable
    return key_ref, header_len


def unwrap(wrapped: bytes, key: bytes, tenant: str, context: dict[str, str], label=LABEL) -> bytes:
    _, h = parse(wrapped)
    header = wrapped[:h]
    salt = header[h - SALT_LEN - NONCE_LEN : h - NONCE_LEN]
    nonce = header[h - NONCE_LEN :]
    try:
        return AESGCM(derive(key, label, salt)).decrypt(
            nonce, wrapped[h:], associated_data(header, tenant, context)
        )
    except InvalidTag:
        raise Undecryptable from None


def check_vector(vector: dict) -> list[str]:
    name = vector.get("name", "<unnamed>")
    errors: list[str] = []

    def expect(what: str, got, want) -> None:
        if got != want:
            errors.append(f"{name}: {what}: got {got!r}, expected {want!r}")

    key = bytes.fromhex(vector["key"])
    wrapped = bytes.fromhex(vector["wrapped"])
    tenant = vector["tenant"]
    context = vector["context"]
    try:
        key_ref, h = parse(wrapped)
    except Undecryptable:
        return [f"{name}: does not parse"]
    expect("key_ref", key_ref, vector["key_ref"])
    salt = wrapped[h - SALT_LEN - NONCE_LEN : h - NONCE_LEN]
    expect("salt", salt.hex(), vector["salt"])
    expect("nonce", wrapped[h - NONCE_LEN : h].hex(), vector["nonce"])
    expect("wrap_key", derive(key, LABEL, salt).hex(), vector["wrap_key"])
    expect("associated_data", associated_data(wrapped[:h], tenant, context).hex(), vector["associated_data"])
    try:
        expect("data_key", unwrap(wrapped, key, tenant, context).hex(), vector["data_key"])
    except Undecryptable:
        return errors + [f"{name}: does not unwrap"]

    def refused(what: str, *args, **kwargs) -> None:
        try:
            unwrap(*args, **kwargs)
            errors.append(f"{name}: unwraps {what}")
        except Undecryptable:
            pass

    for label in OTHER_LABELS:
        refused(f"with the label {label!r}", wrapped, key, tenant, context, label=label)
    refused("for another tenant", wrapped, key, tenant + "x", context)
    refused("for another context", wrapped, key, tenant, {**context, "extra": ""})
    refused("truncated", wrapped[:-1], key, tenant, context)
    refused("extended", wrapped + b"\x00", key, tenant, context)
    for bit in range(len(wrapped) * 8):
        bad = bytearray(wrapped)
        bad[bit // 8] ^= 1 << (bit % 8)
        refused(f"with bit {bit} flipped", bytes(bad), key, tenant, context)
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
    print(f"python reference: {len(vectors)} wrapped data keys unwrapped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
