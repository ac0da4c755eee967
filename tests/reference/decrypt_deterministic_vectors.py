#!/usr/bin/env python3
"""Independent reference for keywarden's deterministic envelopes, suite 0x04
(docs/FORMAT.md, "Deterministic envelopes"), written from FORMAT.md alone.

For each vector it parses the envelope, derives the 64-byte AES-SIV key with
the SP 800-108r1 KDF (label kw1.siv, 16 zero bytes of context, L = 512),
builds the associated data exactly as the one-shot envelope's, decrypts
with AES-SIV (RFC 5297) taking the associated data as the one header
component, and checks the plaintext; seals it again and checks that the
same envelope comes out (the suite is deterministic); and checks that no
single flipped bit, truncation, other tenant or other context decrypts.

AES-SIV is computed twice: with the `cryptography` package's AESSIV, and
with S2V and AES-CTR written out here from RFC 5297 section 2 (on its CMAC
and AES-ECB), checked against RFC 5297 appendix A.1 first. The two must
agree on every vector.

Usage: python decrypt_deterministic_vectors.py tests/data/deterministic_vectors.json
"""

from __future__ import annotations

import sys

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFCMAC, CounterLocation, Mode
from decrypt_vectors import Undecryptable, associated_data, from_text, run, to_text

FORMAT_V1 = 0x01
SUITE_DETERMINISTIC = 0x04
KIND_TENANT = 0x01
KIND_SUBJECT = 0x02
SIV_LEN = 16
SIV_LABEL = b"kw1.siv"
SIV_KEY_CONTEXT = bytes(16)
HEADER_LEN = {KIND_TENANT: 3 + 4, KIND_SUBJECT: 3 + 16 + 4}


def siv_key(key: bytes) -> bytes:
    """SP 800-108r1 counter mode, PRF = CMAC-AES-256, r = 32, L = 512: four
    PRF outputs, fixed input Label || 0x00 || 16 zero bytes || [512]_32."""
    return KBKDFCMAC(
        algorithm=algorithms.AES,
        mode=Mode.CounterMode,
        length=64,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=SIV_LABEL,
        context=SIV_KEY_CONTEXT,
        fixed=None,
    ).derive(key)


def parse(envelope: bytes) -> tuple[int, bytes, bytes, bytes]:
    """(kind, header, SIV, ciphertext), per "Decrypting a deterministic envelope"."""
    if len(envelope) < 3 or envelope[0] != FORMAT_V1 or envelope[1] != SUITE_DETERMINISTIC:
        raise Undecryptable
    kind = envelope[2]
    if kind not in HEADER_LEN:
        raise Undecryptable
    h = HEADER_LEN[kind]
    if len(envelope) < h + SIV_LEN:
        raise Undecryptable
    return kind, envelope[:h], envelope[h : h + SIV_LEN], envelope[h + SIV_LEN :]


# ---- AES-SIV written out from RFC 5297 ----


def _cmac(key: bytes, data: bytes) -> bytes:
    c = cmac.CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


def _dbl(block: bytes) -> bytes:
    v = int.from_bytes(block, "big")
    v = ((v << 1) ^ (0x87 if v >> 127 else 0)) & ((1 << 128) - 1)
    return v.to_bytes(16, "big")


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def s2v(k1: bytes, headers: list[bytes], message: bytes) -> bytes:
    """RFC 5297 section 2.4."""
    d = _cmac(k1, bytes(16))
    for header in headers:
        d = _xor(_dbl(d), _cmac(k1, header))
    if len(message) >= 16:
        t = message[:-16] + _xor(message[-16:], d)
    else:
        padded = message + b"\x80" + bytes(15 - len(message))
        t = _xor(_dbl(d), padded)
    return _cmac(k1, t)


def _ctr(k2: bytes, v: bytes, data: bytes) -> bytes:
    """RFC 5297 section 2.5/2.6: Q = V with bits 31 and 63 (from the right)
    cleared, then AES-CTR with a 128-bit big-endian counter."""
    q = bytearray(v)
    q[8] &= 0x7F
    q[12] &= 0x7F
    encryptor = Cipher(algorithms.AES(k2), modes.CTR(bytes(q))).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def siv_encrypt(key: bytes, headers: list[bytes], plaintext: bytes) -> bytes:
    """V || C with K1 = the first half of the key (S2V), K2 the second (CTR)."""
    k1, k2 = key[: len(key) // 2], key[len(key) // 2 :]
    v = s2v(k1, headers, plaintext)
    return v + _ctr(k2, v, plaintext)


def siv_decrypt(key: bytes, headers: list[bytes], sealed: bytes) -> bytes:
    k1, k2 = key[: len(key) // 2], key[len(key) // 2 :]
    v, c = sealed[:16], sealed[16:]
    p = _ctr(k2, v, c)
    if not _constant_time_equal(s2v(k1, headers, p), v):
        raise Undecryptable
    return p


def _constant_time_equal(a: bytes, b: bytes) -> bool:
    diff = len(a) ^ len(b)
    for x, y in zip(a, b):
        diff |= x ^ y
    return diff == 0


def check_rfc_5297() -> None:
    """Appendix A.1, "Deterministic Authenticated Encryption Example"."""
    key = bytes.fromhex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    ad = bytes.fromhex("101112131415161718191a1b1c1d1e1f2021222324252627")
    p = bytes.fromhex("112233445566778899aabbccddee")
    want = "85632d07c6e8f37f950acd320a2ecc9340c02b9690c4dc04daef7f6afe5c"
    assert siv_encrypt(key, [ad], p).hex() == want, "S2V/CTR do not match RFC 5297 A.1"
    assert AESSIV(key).encrypt(p, [ad]).hex() == want, "AESSIV does not match RFC 5297 A.1"


# ---- the envelope ----


def decrypt(envelope: bytes, key: bytes, tenant: str, context: dict[str, str]) -> bytes:
    """Decrypts with `key` standing for whatever key the header names. Every
    failure raises the same Undecryptable."""
    _, header, siv, body = parse(envelope)
    a = associated_data(header, tenant, context)
    k = siv_key(key)
    try:
        by_library = AESSIV(k).decrypt(siv + body, [a])
    except InvalidTag:
        by_library = None
    try:
        by_hand = siv_decrypt(k, [a], siv + body)
    except Undecryptable:
        by_hand = None
    if by_library != by_hand:
        raise AssertionError("AESSIV and the RFC 5297 implementation disagree")
    if by_library is None:
        raise Undecryptable
    return by_library


def seal(key: bytes, header: bytes, tenant: str, context: dict[str, str], plaintext: bytes) -> bytes:
    a = associated_data(header, tenant, context)
    k = siv_key(key)
    by_library = AESSIV(k).encrypt(plaintext, [a])
    if siv_encrypt(k, [a], plaintext) != by_library:
        raise AssertionError("AESSIV and the RFC 5297 implementation disagree")
    return header + by_library


def check_vector(vector: dict) -> list[str]:
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
    try:
        kind, header, siv, _ = parse(envelope)
    except Undecryptable:
        return [f"{name}: envelope does not parse"]

    key_ref = vector["key_ref"]
    if kind == KIND_TENANT:
        expect("key_ref", {"kind": "tenant", "version": int.from_bytes(header[3:7], "big")}, key_ref)
    else:
        expect(
            "key_ref",
            {
                "kind": "subject",
                "subject_key_id": header[3:19].hex(),
                "version": int.from_bytes(header[19:23], "big"),
            },
            key_ref,
        )
    expect("header", header.hex(), vector["header"])
    expect("siv", siv.hex(), vector["siv"])
    expect("overhead", len(envelope) - len(plaintext), len(header) + SIV_LEN)
    expect("siv_key", siv_key(key).hex(), vector["siv_key"])
    expect("associated_data", associated_data(header, tenant, context).hex(), vector["associated_data"])

    try:
        expect("plaintext", decrypt(envelope, key, tenant, context), plaintext)
    except Undecryptable:
        errors.append(f"{name}: does not decrypt")
    # Deterministic: sealing again gives the same envelope.
    expect("resealed", seal(key, header, tenant, context, plaintext).hex(), envelope.hex())

    try:
        expect("text form", from_text(vector["text"]), envelope)
    except Undecryptable:
        errors.append(f"{name}: text form does not decode")
    expect("text form of ciphertext", to_text(envelope), vector["text"])

    for bit in range(len(envelope) * 8):
        bad = bytearray(envelope)
        bad[bit // 8] ^= 1 << (bit % 8)
        try:
            decrypt(bytes(bad), key, tenant, context)
        except Undecryptable:
            continue
        errors.append(f"{name}: decrypts with bit {bit} flipped")
    for other_tenant, other_context in [
        (tenant + "x", context),
        (tenant, {**context, "extra": ""}),
    ]:
        try:
            decrypt(envelope, key, other_tenant, other_context)
            errors.append(f"{name}: decrypts for another tenant or context")
        except Undecryptable:
            pass
    for length in range(len(envelope)):
        try:
            decrypt(envelope[:length], key, tenant, context)
            errors.append(f"{name}: decrypts truncated to {length} bytes")
        except Undecryptable:
            pass
    return errors


def main(argv: list[str]) -> int:
    check_rfc_5297()
    return run(argv, check_vector, "deterministic vectors decrypted")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
