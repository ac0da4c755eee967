#!/usr/bin/env python3
"""Independent reference for keywarden's streaming envelopes (format v1,
suite 0x02).

Written from docs/FORMAT.md, "Streaming envelopes", alone, with the
`cryptography` package. For each vector it rebuilds the plaintext, derives the
stream key (SP 800-108r1 counter-mode KDF with AES-256-CMAC, label kw1.stm),
builds the header and associated data, seals the plaintext again with the
vector's salt and nonce prefix and compares the envelope (whole, or by length
and SHA-256) and every segment's nonce and tag; then decrypts it segment by
segment as a stream reader does, in several chunkings. Finally it checks that
a segment dropped, swapped, repeated, appended or taken from another stream,
an envelope cut before its last segment or inside a segment, a flipped bit in
the header or in a segment, and another tenant or context each make the
stream fail, after releasing exactly the plaintext of the segments before the
first one changed, and never a clean end.

The associated data is the one-shot envelope's, so it comes from
decrypt_vectors.py beside this file.

Usage: python decrypt_stream_vectors.py tests/data/stream_vectors.json

Prints `python reference: N stream vectors checked` and exits 0 when every
vector checks out; otherwise lists the mismatches on stderr and exits 1.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.cmac import CMAC
from decrypt_vectors import Undecryptable, associated_data, derive, run, u32

FORMAT_V1 = 0x01
SUITE_STREAM = 0x02
KIND_TENANT = 0x01
KIND_SUBJECT = 0x02
HEADER_LEN = {KIND_TENANT: 30, KIND_SUBJECT: 46}
SALT_LEN = 16
PREFIX_LEN = 7
TAG_LEN = 16
SEGMENT_LEN = 65536
SEGMENT_PLAINTEXT_LEN = SEGMENT_LEN - TAG_LEN
MAX_SEGMENTS = 2**32
STREAM_LABEL = b"kw1.stm"
# Envelopes up to this size are stored whole in the vectors, and are small
# enough to feed one byte at a time.
BYTEWISE_MAX = 4096


def stream_key(key: bytes, salt: bytes) -> bytes:
    """"Stream key": the one-shot KDF with the label kw1.stm."""
    return derive(key, STREAM_LABEL, salt)


def stream_key_by_cmac(key: bytes, salt: bytes) -> bytes:
    """The same key from the PRF inputs the document writes out."""
    out = b""
    for i in (1, 2):
        prf = CMAC(algorithms.AES(key))
        prf.update(u32(i) + STREAM_LABEL + b"\x00" + salt + u32(256))
        out += prf.finalize()
    return out


def key_ref_bytes(key_ref: dict) -> bytes:
    if key_ref["kind"] == "tenant":
        return bytes([KIND_TENANT]) + u32(key_ref["version"])
    subject_key_id = bytes.fromhex(key_ref["subject_key_id"])
    return bytes([KIND_SUBJECT]) + subject_key_id + u32(key_ref["version"])


def header_for(key_ref: dict, salt: bytes, prefix: bytes) -> bytes:
    return bytes([FORMAT_V1, SUITE_STREAM]) + key_ref_bytes(key_ref) + salt + prefix


def segment_nonce(prefix: bytes, i: int, last: bool) -> bytes:
    """nonce_i = nonce prefix || [i]_32 || last_i."""
    return prefix + u32(i) + (b"\x01" if last else b"\x00")


def segment_count(n: int) -> int:
    """s = max(1, ceil(n / 65520))."""
    return max(1, -(-n // SEGMENT_PLAINTEXT_LEN))


def seal(
    key: bytes,
    key_ref: dict,
    tenant: str,
    context: dict[str, str],
    plaintext: bytes,
    salt: bytes,
    prefix: bytes,
) -> tuple[bytes, list[dict]]:
    """The envelope, and each segment's nonce, plaintext length and tag."""
    header = header_for(key_ref, salt, prefix)
    aead = AESGCM(stream_key(key, salt))
    aad = associated_data(header, tenant, context)
    s = segment_count(len(plaintext))
    envelope = bytearray(header)
    segments = []
    for i in range(s):
        part = plaintext[i * SEGMENT_PLAINTEXT_LEN : (i + 1) * SEGMENT_PLAINTEXT_LEN]
        nonce = segment_nonce(prefix, i, i == s - 1)
        sealed = aead.encrypt(nonce, part, aad)
        envelope += sealed
        segments.append(
            {"nonce": nonce.hex(), "plaintext_length": len(part), "tag": sealed[-TAG_LEN:].hex()}
        )
    return bytes(envelope), segments


class StreamReader:
    """"Decrypting a stream": takes the envelope in chunks of any size and
    appends the plaintext of each segment that authenticates to `out`. After
    a failure (Undecryptable) it is spent: it decrypts nothing more."""

    def __init__(self, lookup: Callable[[bytes], bytes], tenant: str, context: dict[str, str]):
        self.lookup = lookup
        self.tenant = tenant
        self.context = context
        self.header = bytearray()
        self.header_len: int | None = None
        self.aead: AESGCM | None = None
        self.buffer = bytearray()
        self.number = 0
        self.spent = False

    def _fail(self):
        self.spent = True
        self.buffer.clear()
        raise Undecryptable

    def _read_header(self, data: memoryview) -> memoryview:
        """Steps 1 to 3; answers the bytes after the header."""
        while self.aead is None and len(data) > 0:
            need = self.header_len if self.header_len is not None else 3
            take = min(need - len(self.header), len(data))
            self.header += data[:take]
            data = data[take:]
            if len(self.header) < need:
                break
            if self.header_len is None:
                version, suite, kind = self.header[0], self.header[1], self.header[2]
                if version != FORMAT_V1 or suite != SUITE_STREAM or kind not in HEADER_LEN:
                    self._fail()
                self.header_len = HEADER_LEN[kind]
                continue
            h = self.header_len
            salt = bytes(self.header[h - SALT_LEN - PREFIX_LEN : h - PREFIX_LEN])
            self.prefix = bytes(self.header[h - PREFIX_LEN : h])
            # The key reference (bytes 2 .. h-23) is used for the lookup only.
            key = self.lookup(bytes(self.header[2 : h - SALT_LEN - PREFIX_LEN]))
            self.aead = AESGCM(stream_key(key, salt))
            self.aad = associated_data(bytes(self.header), self.tenant, self.context)
        return data

    def _open(self, last: bool, out: bytearray) -> None:
        if len(self.buffer) < TAG_LEN:
            self._fail()
        nonce = segment_nonce(self.prefix, self.number, last)
        try:
            plaintext = self.aead.decrypt(nonce, bytes(self.buffer), self.aad)
        except InvalidTag:
            self._fail()
        out += plaintext  # released only once its tag verified
        self.buffer.clear()
        self.number += 1

    def push(self, data: bytes, out: bytearray) -> None:
        if self.spent:
            raise Undecryptable
        rest = self._read_header(memoryview(data))
        while len(rest) > 0:
            if len(self.buffer) == SEGMENT_LEN:
                # A full segment and at least one more byte: not the last.
                self._open(False, out)
                if self.number == MAX_SEGMENTS:
                    self._fail()  # the next segment could not be numbered
            take = min(SEGMENT_LEN - len(self.buffer), len(rest))
            self.buffer += rest[:take]
            rest = rest[take:]

    def finish(self, out: bytearray) -> None:
        """The envelope ended: what the buffer holds is the last segment."""
        if self.spent or self.aead is None:
            self._fail()
        self._open(True, out)
        self.spent = True


def read_stream(
    envelope: bytes, key: bytes, tenant: str, context: dict[str, str], chunk: int
) -> tuple[bytes, bool]:
    """The plaintext released, and whether the stream ended cleanly. `key`
    stands for whatever key the header names (the lookup always finds it)."""
    reader = StreamReader(lambda _key_ref: key, tenant, context)
    out = bytearray()
    try:
        for at in range(0, len(envelope), chunk):
            reader.push(envelope[at : at + chunk], out)
        reader.finish(out)
        return bytes(out), True
    except Undecryptable:
        return bytes(out), False


def plaintext_of(vector: dict) -> bytes:
    if ("plaintext" in vector) == ("plaintext_pattern" in vector):
        raise ValueError("exactly one of plaintext and plaintext_pattern")
    if "plaintext" in vector:
        return bytes.fromhex(vector["plaintext"])
    p = vector["plaintext_pattern"]
    m, c = p["multiplier"], p["increment"]
    return bytes((m * i + c) % 256 for i in range(p["length"]))


def released_before(original: list[bytes], changed: list[bytes]) -> int:
    """How many segments a reader releases from `changed` before it fails:
    those equal to the original at the same position that are not the
    original's last and are followed by more bytes. (Every earlier one is a
    full segment, so the reader's boundaries agree with `changed`'s.)"""
    count = 0
    for p, segment in enumerate(changed):
        if p >= len(original) - 1 or p >= len(changed) - 1 or segment != original[p]:
            break
        count += 1
    return count


def check_vector(vector: dict) -> list[str]:
    """All mismatches for one vector, as messages; empty when it checks out."""
    name = vector.get("name", "<unnamed>")
    errors: list[str] = []

    def expect(what: str, got, want) -> None:
        if got != want:
            errors.append(f"{name}: {what}: got {got!r}, expected {want!r}")

    key = bytes.fromhex(vector["key"])
    key_ref = vector["key_ref"]
    tenant = vector["tenant"]
    context = vector["context"]
    salt = bytes.fromhex(vector["salt"])
    prefix = bytes.fromhex(vector["nonce_prefix"])
    plaintext = plaintext_of(vector)
    expect("key length", len(key), 32)
    expect("salt length", len(salt), SALT_LEN)
    expect("nonce prefix length", len(prefix), PREFIX_LEN)

    header = header_for(key_ref, salt, prefix)
    expect("header", header.hex(), vector["header"])
    expect("header length", len(header), HEADER_LEN[header[2]])
    k = stream_key(key, salt)
    expect("stream_key", k.hex(), vector["stream_key"])
    expect("stream key from the PRF inputs", stream_key_by_cmac(key, salt).hex(), k.hex())
    aad = associated_data(header, tenant, context)
    expect("associated_data", aad.hex(), vector["associated_data"])

    envelope, segments = seal(key, key_ref, tenant, context, plaintext, salt, prefix)
    s = segment_count(len(plaintext))
    expect("segments", segments, vector["segments"])
    expect("envelope length", len(envelope), len(header) + len(plaintext) + TAG_LEN * s)
    expect("envelope_length", len(envelope), vector["envelope_length"])
    expect("envelope_sha256", hashlib.sha256(envelope).hexdigest(), vector["envelope_sha256"])
    if "envelope" in vector:
        expect("envelope", envelope.hex(), vector["envelope"])
    elif len(envelope) <= BYTEWISE_MAX:
        errors.append(f"{name}: a small envelope is not stored whole")

    chunks = [len(envelope), 4096, SEGMENT_LEN, SEGMENT_LEN + 1, 1000]
    if len(envelope) <= BYTEWISE_MAX:
        chunks.append(1)
    for chunk in chunks:
        released, clean = read_stream(envelope, key, tenant, context, chunk)
        if not clean or released != plaintext:
            errors.append(f"{name}: does not decrypt in chunks of {chunk}")

    def must_fail(what: str, changed: bytes, released_segments: int, t=tenant, c=context) -> None:
        released, clean = read_stream(changed, key, t, c, 10_000)
        if clean:
            errors.append(f"{name}: {what}: ends cleanly")
        want = plaintext[: released_segments * SEGMENT_PLAINTEXT_LEN]
        if released != want:
            errors.append(
                f"{name}: {what}: released {len(released)} bytes, expected the first {len(want)}"
            )

    h = len(header)
    body = envelope[h:]
    original = [body[at : at + SEGMENT_LEN] for at in range(0, len(body), SEGMENT_LEN)]
    expect("segments by 64 KiB", len(original), s)

    def rearranged(what: str, changed: list[bytes]) -> None:
        must_fail(what, header + b"".join(changed), released_before(original, changed))

    for j in range(s):
        rearranged(f"segment {j} dropped", original[:j] + original[j + 1 :])
        rearranged(f"segment {j} repeated", original[: j + 1] + original[j:])
        rearranged(f"segment {j} appended after the last", original + [original[j]])
        rearranged(f"cut before segment {j}", original[:j])
    for j in range(s - 1):
        swapped = original[:j] + [original[j + 1], original[j]] + original[j + 2 :]
        rearranged(f"segments {j} and {j + 1} swapped", swapped)
    rearranged("16 bytes appended after the last", original + [bytes(TAG_LEN)])

    # A segment from another stream: the same plaintext under another salt.
    other_salt = salt[:-1] + bytes([salt[-1] ^ 1])
    other, _ = seal(key, key_ref, tenant, context, plaintext, other_salt, prefix)
    other_body = other[h:]
    other_segments = [other_body[at : at + SEGMENT_LEN] for at in range(0, len(body), SEGMENT_LEN)]
    for j in range(s):
        spliced = original[:j] + [other_segments[j]] + original[j + 1 :]
        rearranged(f"segment {j} from another stream", spliced)

    # Cut inside a segment, or at a boundary: c bytes of body kept.
    cuts = {0, 1, 15, 16, len(body) - 1, len(body) - TAG_LEN}
    cuts |= {at + d for at in range(0, len(body), SEGMENT_LEN) for d in (0, 5, SEGMENT_LEN - 1)}
    for c in sorted(cut for cut in cuts if 0 <= cut < len(body)):
        full_before = min(s - 1, (c - 1) // SEGMENT_LEN) if c > 0 else 0
        must_fail(f"cut {c} bytes into the body", envelope[: h + c], full_before)
    for c in range(h):
        must_fail(f"cut {c} bytes into the header", envelope[:c], 0)

    # Any flipped header bit; a flipped bit in each segment's body and tag.
    for bit in range(h * 8):
        bad = bytearray(envelope)
        bad[bit // 8] ^= 1 << (bit % 8)
        must_fail(f"header bit {bit} flipped", bytes(bad), 0)
    for j, segment in enumerate(original):
        start = h + j * SEGMENT_LEN
        for at in {start, start + len(segment) - TAG_LEN - 1, start + len(segment) - 1}:
            if at < start:
                continue  # an empty last segment has no ciphertext byte
            bad = bytearray(envelope)
            bad[at] ^= 0x80
            must_fail(f"byte {at} (segment {j}) flipped", bytes(bad), j)

    must_fail("another tenant", envelope, 0, t=tenant + "x")
    must_fail("another context", envelope, 0, c={**context, "extra": ""})

    return errors


def main(argv: list[str]) -> int:
    return run(argv, check_vector, "stream vectors checked")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
