#!/usr/bin/env python3
"""Independent reference for keywarden's stored-key wraps (docs/FORMAT.md,
"How subject keys are stored"), written from FORMAT.md alone.

For each vector it parses the 83-byte wrapped key, derives the wrap key with
the SP 800-108r1 KDF under the domain's label (kw1.skw for subject keys,
kw1.ikw for blind-index keys),
builds the associated data (header || enc(tenant) || enc(binding)), unwraps
with AES-256-GCM and checks the key. It also checks that the wrap does not
open with the data plane's label (kw1.dek), nor for another tenant or
binding, nor with any single bit flipped.

Usage: python unwrap_key_vectors.py tests/data/wrap_vectors.json
"""

from __future__ import annotations

import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from decrypt_vectors import LABEL, Undecryptable, derive, run, u32

FORMAT_V1 = 0x01
SUITE_KEY_WRAP = 0x03
DOMAINS = {0x01: ("subject-key", b"kw1.skw"), 0x02: ("blind-index-key", b"kw1.ikw")}
LABELS = {name: label for name, label in DOMAINS.values()}
HEADER_LEN = 3 + 4 + 16 + 12
WRAPPED_LEN = HEADER_LEN + 32 + 16


def enc(b: bytes) -> bytes:
    return u32(len(b)) + b


def unwrap(
    wrapped: bytes, wrapping_key: bytes, tenant: str, binding: bytes, label_override=None
) -> tuple[str, int, bytes]:
    """(domain name, tenant key version, key); Undecryptable on any failure."""
    if len(wrapped) != WRAPPED_LEN or wrapped[0] != FORMAT_V1 or wrapped[1] != SUITE_KEY_WRAP:
        raise Undecryptable
    if wrapped[2] not in DOMAINS:
        raise Undecryptable
    domain, label = DOMAINS[wrapped[2]]
    version = int.from_bytes(wrapped[3:7], "big")
    header = wrapped[:HEADER_LEN]
    salt, nonce = wrapped[7:23], wrapped[23:35]
    aad = header + enc(tenant.encode("utf-8")) + enc(binding)
    key = derive(wrapping_key, label_override or label, salt)
    try:
        return domain, version, AESGCM(key).decrypt(nonce, wrapped[HEADER_LEN:], aad)
    except InvalidTag:
        raise Undecryptable from None


def check_vector(vector: dict) -> list[str]:
    name = vector.get("name", "<unnamed>")
    errors: list[str] = []

    def expect(what: str, got, want) -> None:
        if got != want:
            errors.append(f"{name}: {what}: got {got!r}, expected {want!r}")

    wrapping_key = bytes.fromhex(vector["wrapping_key"])
    wrapped = bytes.fromhex(vector["wrapped"])
    tenant = vector["tenant"]
    binding = bytes.fromhex(vector["binding"])
    salt = wrapped[7:23]
    label = LABELS[vector["domain"]]
    expect("wrap_key", derive(wrapping_key, label, salt).hex(), vector["wrap_key"])
    expect(
        "associated_data",
        (wrapped[:HEADER_LEN] + enc(tenant.encode("utf-8")) + enc(binding)).hex(),
        vector["associated_data"],
    )
    try:
        domain, version, key = unwrap(wrapped, wrapping_key, tenant, binding)
        expect("domain", domain, vector["domain"])
        expect("tenant_version", version, vector["tenant_version"])
        expect("key", key.hex(), vector["key"])
    except Undecryptable:
        return [f"{name}: does not unwrap"]

    def refused(what: str, *args, **kwargs) -> None:
        try:
            unwrap(*args, **kwargs)
            errors.append(f"{name}: unwraps {what}")
        except Undecryptable:
            pass

    refused("with the data plane's label", wrapped, wrapping_key, tenant, binding, LABEL)
    for other in LABELS.values():
        if other != label:
            refused(f"with another domain's label {other!r}", wrapped, wrapping_key, tenant, binding, other)
    refused("for another tenant", wrapped, wrapping_key, tenant + "x", binding)
    refused("for another binding", wrapped, wrapping_key, tenant, bytes([binding[0] ^ 1]) + binding[1:])
    for bit in range(len(wrapped) * 8):
        bad = bytearray(wrapped)
        bad[bit // 8] ^= 1 << (bit % 8)
        refused(f"with bit {bit} flipped", bytes(bad), wrapping_key, tenant, binding)
    return errors


def main(argv: list[str]) -> int:
    return run(argv, check_vector, "wrapped keys unwrapped")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
