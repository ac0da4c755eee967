#!/usr/bin/env python3
"""Independent reference decryptor for keywarden ciphertext format v1.

Written from docs/FORMAT.md alone, with the `cryptography` package: it parses
each vector's envelope, derives the message key with the SP 800-108r1
counter-mode KDF (AES-256-CMAC), builds the associated data, decrypts with
AES-256-GCM, and checks the result against the vector. It also checks that
flipping any single bit of an envelope makes it undecryptable.

Usage: python decrypt_vectors.py tests/data/vectors.json

Prints `python reference: N vectors decrypted` and exits 0 when every vector
checks out; otherwise lists the mismatches on stderr and exits 1.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.kbkdf import (
    KBKDFCMAC,
    CounterLocation,
    Mode,
)

FORMAT_V1 = 0x01
SUITE_AES256GCM_CMAC_KDF = 0x01
KIND_TENANT = 0x01
KIND_SUBJECT = 0x02
SALT_LEN = 16
NONCE_LEN = 12
TAG_LEN = 16
SUBJECT_KEY_ID_LEN = 16
LABEL = b"kw1.dek"
TEXT_PREFIX = "kw1:"
OVERHEAD = {KIND_TENANT: 51, KIND_SUBJECT: 67}


class Undecryptable(Exception):
    """Any failure to parse or authenticate. Deliberately carries nothing."""


@dataclass(frozen=True)
class Envelope:
    kind: int
    version: int
    subject_key_id: bytes | None
    header: bytes
    salt: bytes
    nonce: bytes
    body: bytes
    tag: bytes


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def parse(envelope: bytes) -> Envelope:
    """Steps 1 to 4 of "Decrypting"."""
    if len(envelope) < 3 or envelope[0] != FORMAT_V1 or envelope[1] != SUITE_AES256GCM_CMAC_KDF:
        raise Undecryptable
    kind = envelope[2]
    if kind == KIND_TENANT:
        header_len = 3 + 4 + SALT_LEN + NONCE_LEN
        if len(envelope) < header_len + TAG_LEN:
            raise Undecryptable
        subject_key_id = None
        version = int.from_bytes(envelope[3:7], "big")
    elif kind == KIND_SUBJECT:
        header_len = 3 + SUBJECT_KEY_ID_LEN + 4 + SALT_LEN + NONCE_LEN
        if len(envelope) < header_len + TAG_LEN:
            raise Undecryptable
        subject_key_id = envelope[3:19]
        version = int.from_bytes(envelope[19:23], "big")
    else:
        raise Undecryptable
    h = header_len
    return Envelope(
        kind=kind,
        version=version,
        subject_key_id=subject_key_id,
        header=envelope[:h],
        salt=envelope[h - SALT_LEN - NONCE_LEN : h - NONCE_LEN],
        nonce=envelope[h - NONCE_LEN : h],
        body=envelope[h : len(envelope) - TAG_LEN],
        tag=envelope[len(envelope) - TAG_LEN :],
    )


def derive(key: bytes, label: bytes, salt: bytes) -> bytes:
    """SP 800-108r1 section 4.1 counter mode, PRF = CMAC-AES-256, r = 32, L = 256,
    fixed input = Label || 0x00 || salt || [256]_32, counter before it."""
    kdf = KBKDFCMAC(
        algorithm=algorithms.AES,
        mode=Mode.CounterMode,
        length=32,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=salt,
        fixed=None,
    )
    return kdf.derive(key)


def message_key(key: bytes, salt: bytes) -> bytes:
    """The one-shot envelope's message key: label kw1.dek."""
    return derive(key, LABEL, salt)


def enc(s: str) -> bytes:
    b = s.encode("utf-8")
    return u32(len(b)) + b


def associated_data(header: bytes, tenant: str, context: dict[str, str]) -> bytes:
    """header || enc(tenant) || [m]_32 || enc(k1) || enc(v1) || ..., entries in
    ascending order of the UTF-8 bytes of their keys."""
    entries = sorted(
        ((k.encode("utf-8"), v.encode("utf-8")) for k, v in context.items()),
        key=lambda kv: kv[0],
    )
    out = bytearray(header)
    out += enc(tenant)
    out += u32(len(entries))
    for k, v in entries:
        out += u32(len(k)) + k
        out += u32(len(v)) + v
    return bytes(out)


def decrypt(envelope: bytes, key: bytes, tenant: str, context: dict[str, str]) -> bytes:
    """Decrypts with `key` standing for whatever key the header names (the
    caller did the lookup). Every failure raises the same Undecryptable."""
    parsed = parse(envelope)
    aead = AESGCM(message_key(key, parsed.salt))
    aad = associated_data(parsed.header, tenant, context)
    try:
        return aead.decrypt(parsed.nonce, parsed.body + parsed.tag, aad)
    except InvalidTag:
        raise Undecryptable from None


def from_text(text: str) -> bytes:
    """`kw1:` followed by unpadded base64url (RFC 4648 section 5)."""
    if not text.startswith(TEXT_PREFIX):
        raise Undecryptable
    b64 = text[len(TEXT_PREFIX) :]
    if not re.fullmatch(r"[A-Za-z0-9_-]*", b64) or len(b64) % 4 == 1:
        raise Undecryptable
    raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    if to_text(raw) != text:  # non-canonical trailing bits
        raise Undecryptable
    return raw


def to_text(envelope: bytes) -> str:
    return TEXT_PREFIX + base64.urlsafe_b64encode(envelope).decode("ascii").rstrip("=")


def check_vector(vector: dict) -> list[str]:
    """All mismatches for one vector, as messages; empty when it checks out."""
    name = vector.get("name", "<unnamed>")
    errors: list[str] = []

    def expect(what: str, got, want) -> None:
        if got != want:
            errors.append(f"{name}: {what}: got {got!r}, expected {want!r}")

    key = bytes.fromhex(vector["key"])
    tenant = vector["tenant"]
    context = vector["context"]
    plaintext = bytes.fromhex(vector["plaintext"])
    envelope = bytes.fromhex(vector["ciphertext"])
    expect("key length", len(key), 32)

    try:
        parsed = parse(envelope)
    except Undecryptable:
        return [f"{name}: envelope does not parse"]

    # The header, read per the spec, against the vector's description of it.
    key_ref = vector["key_ref"]
    if parsed.kind == KIND_TENANT:
        expect("key_ref", {"kind": "tenant", "version": parsed.version}, key_ref)
    else:
        expect(
            "key_ref",
            {
                "kind": "subject",
                "subject_key_id": parsed.subject_key_id.hex(),
                "version": parsed.version,
            },
            key_ref,
        )
    expect("salt", parsed.salt.hex(), vector["salt"])
    expect("nonce", parsed.nonce.hex(), vector["nonce"])
    expect("overhead", len(envelope) - len(plaintext), OVERHEAD[parsed.kind])

    expect("message_key", message_key(key, parsed.salt).hex(), vector["message_key"])
    if "associated_data" in vector:
        expect(
            "associated_data",
            associated_data(parsed.header, tenant, context).hex(),
            vector["associated_data"],
        )

    try:
        expect("plaintext", decrypt(envelope, key, tenant, context), plaintext)
    except Undecryptable:
        errors.append(f"{name}: does not decrypt")

    if "text" in vector:
        try:
            expect("text form", from_text(vector["text"]), envelope)
        except Undecryptable:
            errors.append(f"{name}: text form does not decode")
        expect("text form of ciphertext", to_text(envelope), vector["text"])

    # Any single flipped bit, in header, body or tag, must be undecryptable.
    for bit in range(len(envelope) * 8):
        bad = bytearray(envelope)
        bad[bit // 8] ^= 1 << (bit % 8)
        try:
            decrypt(bytes(bad), key, tenant, context)
        except Undecryptable:
            continue
        errors.append(f"{name}: decrypts with bit {bit} flipped")

    # So must the same envelope for another tenant or context, or truncated.
    for other_tenant, other_context in [
        (tenant + "x", context),
        (tenant, {**context, "extra": ""}),
    ]:
        try:
            decrypt(envelope, key, other_tenant, other_context)
            errors.append(f"{name}: decrypts for another tenant or context")
        except Undecryptable:
            pass
    for length in (0, 2, len(parsed.header), len(envelope) - 1):
        try:
            decrypt(envelope[:length], key, tenant, context)
            errors.append(f"{name}: decrypts truncated to {length} bytes")
        except Undecryptable:
            pass

    return errors


def run(argv: list[str], check, done: str) -> int:
    """Checks every vector of the JSON file argv[1] with `check` (a vector ->
    a list of errors); prints `python reference: N <done>` or the errors."""
    if len(argv) != 2:
        print(f"usage: {argv[0]} VECTORS.json", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        vectors = json.load(f)
    if not isinstance(vectors, list) or not vectors:
        print(f"{argv[1]}: expected a non-empty JSON array", file=sys.stderr)
        return 1
    errors = [error for vector in vectors for error in check(vector)]
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        print(f"python reference: {len(errors)} mismatches", file=sys.stderr)
        return 1
    print(f"python reference: {len(vectors)} {done}")
    return 0


def main(argv: list[str]) -> int:
    return run(argv, check_vector, "vectors decrypted")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
