//! The streaming envelope, for objects too large to hold in memory: a header,
//! then the plaintext sealed in segments, each with its own AES-256-GCM tag,
//! as Tink's streaming AEAD does it. docs/FORMAT.md, "Streaming envelopes", is the
//! specification.
//!
//! ```text
//! header   version 0x01 | suite 0x02 | key reference (as in one-shot envelopes)
//!          | salt (16) | nonce prefix (7)
//! segment  AES-256-GCM(stream key, nonce_i, AD, plaintext_i) = ciphertext_i || tag_i
//! nonce_i  = nonce prefix || [i]_32 || last (0x01 for the last segment, else 0x00)
//! ```
//!
//! The stream key is derived from the tenant or subject key and the salt by
//! the one-shot envelope's KDF with its own label. Every segment holds
//! [`SEGMENT_PLAINTEXT_LEN`] bytes of plaintext but the last, which holds 0 to
//! that many; the associated data is the one-shot envelope's (header, tenant,
//! context). The segment number and the last-segment flag are in each nonce,
//! so a segment dropped, swapped, repeated or appended, or a stream cut short,
//! fails to authenticate.
//!
//! These are sans-I/O state machines: [`StreamSealer`] and [`StreamOpener`]
//! take bytes in any chunking and append their output to a buffer; the gRPC
//! layer moves the bytes. Neither holds more than one segment.

use zeroize::Zeroize;

use super::{
    Context, EnvelopeKey, FORMAT_V1, KeyRef, NONCE_LEN, SALT_LEN, SealError, TAG_LEN,
    Undecryptable, associated_data, kdf::STREAM_LABEL, parse_key_ref, provider, push_key_ref,
};

/// Suite byte of streaming envelopes: AES-256-GCM in segments of 64 KiB, a
/// per-stream key from the SP 800-108 counter-mode KDF with AES-256-CMAC.
pub const SUITE_STREAM_AES256GCM_CMAC_KDF: u8 = 0x02;
/// Bytes of every segment but the last, tag included.
pub const SEGMENT_LEN: usize = 64 * 1024;
/// Plaintext bytes of every segment but the last.
pub const SEGMENT_PLAINTEXT_LEN: usize = SEGMENT_LEN - TAG_LEN;
/// Bytes of the random nonce prefix.
pub const NONCE_PREFIX_LEN: usize = 7;
/// Header bytes of a tenant-key stream.
pub const TENANT_HEADER_LEN: usize = 3 + 4 + SALT_LEN + NONCE_PREFIX_LEN;
/// Header bytes of a subject-key stream.
pub const SUBJECT_HEADER_LEN: usize =
    3 + super::SUBJECT_KEY_ID_LEN + 4 + SALT_LEN + NONCE_PREFIX_LEN;

/// What both directions share: the stream's AES-GCM key, its nonce prefix,
/// its associated data, and the number of the next segment. The client
/// stream of suite 0x06 ([`super::client_stream`]) shares it too: the same
/// segments under a key derived from a data key.
pub(super) struct Segments {
    aead: provider::AeadKey,
    nonce_prefix: [u8; NONCE_PREFIX_LEN],
    aad: Vec<u8>,
    /// Past `u32::MAX` no segment can be numbered.
    next: u64,
}

impl Segments {
    fn new(key: &EnvelopeKey, header: &[u8], tenant: &str, context: &Context) -> Option<Self> {
        let salt_at = header.len() - SALT_LEN - NONCE_PREFIX_LEN;
        let salt: &[u8; SALT_LEN] = header[salt_at..salt_at + SALT_LEN]
            .try_into()
            .expect("the header ends with salt and nonce prefix");
        let nonce_prefix = header[salt_at + SALT_LEN..]
            .try_into()
            .expect("the header ends with the nonce prefix");
        Some(Self {
            aead: key.provider().aead(&key.kdf.derive_for(STREAM_LABEL, salt)),
            nonce_prefix,
            aad: associated_data(header, tenant, context)?,
            next: 0,
        })
    }

    /// Segments under `aead`, with `nonce_prefix` and `aad`, from segment 0.
    pub(super) fn with_key(
        aead: provider::AeadKey,
        nonce_prefix: [u8; NONCE_PREFIX_LEN],
        aad: Vec<u8>,
    ) -> Self {
        Self {
            aead,
            nonce_prefix,
            aad,
            next: 0,
        }
    }

    /// The nonce of the next segment, which then counts as used.
    fn next_nonce(&mut self, last: bool) -> Option<[u8; NONCE_LEN]> {
        let number = u32::try_from(self.next).ok()?;
        self.next += 1;
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..NONCE_PREFIX_LEN].copy_from_slice(&self.nonce_prefix);
        nonce[NONCE_PREFIX_LEN..NONCE_LEN - 1].copy_from_slice(&number.to_be_bytes());
        nonce[NONCE_LEN - 1] = u8::from(last);
        Some(nonce)
    }
}

/// Seals a stream of plaintext into a streaming envelope.
pub struct StreamSealer {
    segments: Segments,
    /// Plaintext of the segment being filled; at most a segment's worth.
    pending: Vec<u8>,
}

impl StreamSealer {
    /// Starts a stream under `key`, which `key_ref` names, for `tenant` and
    /// `context`. Answers the sealer and the header, the first bytes of the
    /// envelope.
    pub fn start(
        key: &EnvelopeKey,
        key_ref: KeyRef,
        tenant: &str,
        context: &Context,
    ) -> Result<(Self, Vec<u8>), SealError> {
        let mut random = [0u8; SALT_LEN + NONCE_PREFIX_LEN];
        provider::fill_random(&mut random)?;
        let sealer = Self::start_with(key, key_ref, tenant, context, &random);
        random.zeroize();
        sealer
    }

    /// [`StreamSealer::start`] with a given salt and nonce prefix: for test
    /// vectors only.
    #[doc(hidden)]
    pub fn start_with(
        key: &EnvelopeKey,
        key_ref: KeyRef,
        tenant: &str,
        context: &Context,
        salt_and_prefix: &[u8; SALT_LEN + NONCE_PREFIX_LEN],
    ) -> Result<(Self, Vec<u8>), SealError> {
        let mut header = Vec::with_capacity(SUBJECT_HEADER_LEN);
        header.extend_from_slice(&[FORMAT_V1, SUITE_STREAM_AES256GCM_CMAC_KDF]);
        push_key_ref(&mut header, key_ref);
        header.extend_from_slice(salt_and_prefix);
        let segments = Segments::new(key, &header, tenant, context).ok_or(SealError::TooLong)?;
        Ok((Self::over(segments), header))
    }

    /// A sealer of `segments`, from the first.
    pub(super) fn over(segments: Segments) -> Self {
        Self {
            segments,
            pending: Vec::with_capacity(SEGMENT_PLAINTEXT_LEN),
        }
    }

    /// Takes the next plaintext bytes, in any amount, and appends to `out`
    /// the segments they complete. A full segment is sealed only once more
    /// plaintext arrives: until then it may be the last.
    pub fn push(&mut self, mut plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        while !plaintext.is_empty() {
            if self.pending.len() == SEGMENT_PLAINTEXT_LEN {
                self.seal_pending(false, out)?;
            }
            if self.pending.is_empty() && plaintext.len() > SEGMENT_PLAINTEXT_LEN {
                // A whole segment with more after it: sealed straight from
                // the input, never copied into `pending`.
                let (segment, rest) = plaintext.split_at(SEGMENT_PLAINTEXT_LEN);
                self.seal(segment, false, out)?;
                plaintext = rest;
                continue;
            }
            let take = plaintext
                .len()
                .min(SEGMENT_PLAINTEXT_LEN - self.pending.len());
            self.pending.extend_from_slice(&plaintext[..take]);
            plaintext = &plaintext[take..];
        }
        Ok(())
    }

    /// Seals what is pending as the last segment and appends it to `out`.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), SealError> {
        self.seal_pending(true, out)
    }

    fn seal_pending(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), SealError> {
        let pending = std::mem::take(&mut self.pending);
        let sealed = self.seal(&pending, last, out);
        self.pending = pending;
        erase(&mut self.pending);
        sealed
    }

    /// Appends `segment` sealed to `out` (encrypted in place there).
    fn seal(&mut self, segment: &[u8], last: bool, out: &mut Vec<u8>) -> Result<(), SealError> {
        let nonce = self.segments.next_nonce(last).ok_or(SealError::TooLong)?;
        let start = out.len();
        out.reserve(segment.len() + TAG_LEN);
        out.extend_from_slice(segment);
        match self
            .segments
            .aead
            .seal_in_place(&nonce, &self.segments.aad, &mut out[start..])
        {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                Ok(())
            }
            Err(e) => {
                erase_from(out, start);
                Err(e)
            }
        }
    }
}

impl Drop for StreamSealer {
    fn drop(&mut self) {
        erase(&mut self.pending);
    }
}

/// Zeroes the bytes in use and empties the vector (its spare capacity never
/// held anything that was not zeroed this way).
fn erase(bytes: &mut Vec<u8>) {
    erase_from(bytes, 0);
}

/// Zeroes and drops `bytes[from..]`.
fn erase_from(bytes: &mut Vec<u8>, from: usize) {
    bytes[from..].zeroize();
    bytes.truncate(from);
}

/// The key reference and length of a streaming envelope's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    pub key_ref: KeyRef,
    pub len: usize,
}

/// The length of a streaming envelope's header, from its first three bytes
/// (version, suite, key reference kind).
pub fn header_len(bytes: &[u8]) -> Result<usize, Undecryptable> {
    let Some(&[version, suite, kind]) = bytes.first_chunk::<3>() else {
        return Err(Undecryptable);
    };
    if version != FORMAT_V1 || suite != SUITE_STREAM_AES256GCM_CMAC_KDF {
        return Err(Undecryptable);
    }
    match kind {
        super::KIND_TENANT => Ok(TENANT_HEADER_LEN),
        super::KIND_SUBJECT => Ok(SUBJECT_HEADER_LEN),
        _ => Err(Undecryptable),
    }
}

/// Reads the header at the start of a streaming envelope: `Ok(None)` while
/// `bytes` is too short to tell. Nothing is authenticated yet.
pub fn parse_header(bytes: &[u8]) -> Result<Option<StreamHeader>, Undecryptable> {
    if bytes.len() < 3 {
        return Ok(None);
    }
    let len = header_len(bytes)?;
    if bytes.len() < len {
        return Ok(None);
    }
    let (key_ref, rest) = parse_key_ref(bytes[2], &bytes[3..len])?;
    debug_assert_eq!(rest.len(), SALT_LEN + NONCE_PREFIX_LEN);
    Ok(Some(StreamHeader { key_ref, len }))
}

/// Opens a streaming envelope, segment by segment.
pub struct StreamOpener {
    segments: Segments,
    /// Ciphertext of the segment being filled; at most a segment.
    pending: Vec<u8>,
    /// A segment failed: the stream is over, and every later call fails.
    failed: bool,
}

impl StreamOpener {
    /// Starts opening the stream whose header is `header` (as
    /// [`parse_header`] delimited it) with the key it names.
    pub fn start(
        key: &EnvelopeKey,
        header: &[u8],
        tenant: &str,
        context: &Context,
    ) -> Result<Self, Undecryptable> {
        // Exactly one whole header, whatever the caller passed.
        match parse_header(header)? {
            Some(parsed) if parsed.len == header.len() => {}
            _ => return Err(Undecryptable),
        }
        Ok(Self::over(
            Segments::new(key, header, tenant, context).ok_or(Undecryptable)?,
        ))
    }

    /// An opener of `segments`, from the first.
    pub(super) fn over(segments: Segments) -> Self {
        Self {
            segments,
            pending: Vec::with_capacity(SEGMENT_LEN),
            failed: false,
        }
    }

    /// Takes the next envelope bytes after the header, in any amount, and
    /// appends to `out` the plaintext of every segment they complete. A full
    /// segment is opened only once more bytes arrive: until then it may be
    /// the last. On an error, `out` holds only the plaintext of segments that
    /// authenticated before it, and the stream is over.
    pub fn push(&mut self, mut ciphertext: &[u8], out: &mut Vec<u8>) -> Result<(), Undecryptable> {
        if self.failed {
            return Err(Undecryptable);
        }
        while !ciphertext.is_empty() {
            if self.pending.len() == SEGMENT_LEN {
                self.open_pending(false, out)?;
            }
            let take = ciphertext.len().min(SEGMENT_LEN - self.pending.len());
            self.pending.extend_from_slice(&ciphertext[..take]);
            ciphertext = &ciphertext[take..];
        }
        Ok(())
    }

    /// The envelope ended: opens what is pending as the last segment.
    pub fn finish(mut self, out: &mut Vec<u8>) -> Result<(), Undecryptable> {
        self.open_pending(true, out)
    }

    /// Opens the pending segment into `out` (decrypted in place there, so
    /// `pending` only ever holds ciphertext).
    fn open_pending(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), Undecryptable> {
        if self.failed {
            return Err(Undecryptable);
        }
        let opened = self.open_segment(last, out);
        self.failed = opened.is_err();
        opened
    }

    fn open_segment(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), Undecryptable> {
        let body_len = self
            .pending
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(Undecryptable)?;
        let nonce = self.segments.next_nonce(last).ok_or(Undecryptable)?;
        let (body, tag) = self.pending.split_at(body_len);
        let tag: &[u8; TAG_LEN] = tag.try_into().expect("split TAG_LEN bytes off");
        let start = out.len();
        out.extend_from_slice(body);
        let opened =
            self.segments
                .aead
                .open_in_place(&nonce, &self.segments.aad, &mut out[start..], tag);
        self.pending.clear();
        if opened.is_err() {
            erase_from(out, start);
        }
        opened
    }
}

impl std::fmt::Debug for StreamSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSealer")
            .field("next_segment", &self.segments.next)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for StreamOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOpener")
            .field("next_segment", &self.segments.next)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{envelope::Provider, secret::Key256};

    const P: usize = SEGMENT_PLAINTEXT_LEN;
    const TENANT: KeyRef = KeyRef::Tenant { version: 3 };

    fn key(provider: Provider) -> EnvelopeKey {
        EnvelopeKey::new(provider, &Key256::from_slice(&[0x42; 32]).unwrap())
    }

    fn context() -> Context {
        Context::from([("object".to_owned(), "backup-7".to_owned())])
    }

    fn plaintext(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    /// Seals `plaintext` fed in chunks of `chunk` bytes; answers the header
    /// and the segments as they were emitted.
    fn seal(key: &EnvelopeKey, plaintext: &[u8], chunk: usize) -> (Vec<u8>, Vec<u8>) {
        let (mut sealer, header) = StreamSealer::start(key, TENANT, "acme", &context()).unwrap();
        let mut body = Vec::new();
        for part in plaintext.chunks(chunk.max(1)) {
            sealer.push(part, &mut body).unwrap();
        }
        sealer.finish(&mut body).unwrap();
        (header, body)
    }

    /// Opens an envelope fed in chunks of `chunk` bytes: the plaintext
    /// released, and whether the stream ended cleanly.
    fn open(
        key: &EnvelopeKey,
        envelope: &[u8],
        chunk: usize,
    ) -> (Vec<u8>, Result<(), Undecryptable>) {
        let mut released = Vec::new();
        let result = (|| {
            let header = parse_header(envelope)?.ok_or(Undecryptable)?;
            let (header, body) = envelope.split_at(header.len);
            let mut opener = StreamOpener::start(key, header, "acme", &context())?;
            for part in body.chunks(chunk.max(1)) {
                opener.push(part, &mut released)?;
            }
            opener.finish(&mut released)
        })();
        (released, result)
    }

    fn segments(body: &[u8]) -> Vec<&[u8]> {
        body.chunks(SEGMENT_LEN).collect()
    }

    #[test]
    fn round_trips_at_segment_boundaries_in_any_chunking() {
        for provider in Provider::ALL {
            let k = key(provider);
            for len in [0, 1, P - 1, P, P + 1, 2 * P, 3 * P + 5] {
                for chunk in [1000, P, P + 1, 4 * P] {
                    let data = plaintext(len);
                    let (header, body) = seal(&k, &data, chunk);
                    assert_eq!(header.len(), TENANT_HEADER_LEN);
                    let segments = len.div_ceil(P).max(1);
                    assert_eq!(body.len(), len + segments * TAG_LEN, "{provider} {len}");
                    let envelope = [header, body].concat();
                    for other in Provider::ALL {
                        let (out, end) = open(&key(other), &envelope, chunk / 3 + 1);
                        assert_eq!(end, Ok(()), "{provider}->{other} {len}/{chunk}");
                        assert!(out == data, "{provider}->{other} {len}/{chunk}");
                    }
                }
            }
        }
    }

    /// Every way of rearranging segments fails, and what was released
    /// before the failure is exactly the authentic prefix.
    #[test]
    fn dropped_swapped_repeated_appended_or_cut_segments_fail() {
        for provider in Provider::ALL {
            let k = key(provider);
            let data = plaintext(3 * P + 100);
            let (header, body) = seal(&k, &data, 1 << 20);
            let s = segments(&body);
            assert_eq!(s.len(), 4);
            let cases: Vec<(&str, Vec<&[u8]>, usize)> = vec![
                // (name, segments, how many segments authenticate first)
                ("second dropped", vec![s[0], s[2], s[3]], 1),
                ("last dropped", vec![s[0], s[1], s[2]], 2),
                ("first two swapped", vec![s[1], s[0], s[2], s[3]], 0),
                ("second repeated", vec![s[0], s[1], s[1], s[2], s[3]], 2),
                ("last repeated", vec![s[0], s[1], s[2], s[3], s[3]], 3),
                (
                    "middle appended again",
                    vec![s[0], s[1], s[2], s[3], s[1]],
                    3,
                ),
                ("only the last", vec![s[3]], 0),
                ("nothing after the header", vec![], 0),
            ];
            for (name, parts, authentic) in cases {
                let envelope = [header.clone(), parts.concat()].concat();
                let (out, end) = open(&k, &envelope, 10_000);
                assert_eq!(end, Err(Undecryptable), "{provider}: {name}");
                assert!(out == data[..authentic * P], "{provider}: {name}: released");
            }
            // Cut inside the last segment, or inside an earlier one.
            for cut in [body.len() - 1, body.len() - 117, SEGMENT_LEN + 10, 5] {
                let envelope = [&header[..], &body[..cut]].concat();
                let (out, end) = open(&k, &envelope, 10_000);
                assert_eq!(end, Err(Undecryptable), "{provider}: cut at {cut}");
                assert!(out.len() <= cut && out == data[..out.len()]);
            }
            // Bytes appended after the last segment.
            let envelope = [&header[..], &body[..], b"x"].concat();
            assert_eq!(open(&k, &envelope, 10_000).1, Err(Undecryptable));
        }
    }

    #[test]
    fn another_tenant_context_key_or_flipped_header_fails() {
        let k = key(Provider::RustCrypto);
        let (header, body) = seal(&k, b"object", 10);
        let envelope = [header.clone(), body.clone()].concat();
        let opened = |key: &EnvelopeKey, tenant: &str, context: &Context, envelope: &[u8]| {
            let h = parse_header(envelope)?.ok_or(Undecryptable)?;
            let mut opener = StreamOpener::start(key, &envelope[..h.len], tenant, context)?;
            let mut out = Vec::new();
            opener.push(&envelope[h.len..], &mut out)?;
            opener.finish(&mut out).map(|()| out)
        };
        assert_eq!(
            opened(&k, "acme", &context(), &envelope).unwrap(),
            b"object"
        );
        assert!(opened(&k, "acme2", &context(), &envelope).is_err());
        assert!(opened(&k, "acme", &Context::new(), &envelope).is_err());
        let other = EnvelopeKey::new(
            Provider::RustCrypto,
            &Key256::from_slice(&[0x43; 32]).unwrap(),
        );
        assert!(opened(&other, "acme", &context(), &envelope).is_err());
        for bit in 0..header.len() * 8 {
            let mut bad = envelope.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(opened(&k, "acme", &context(), &bad).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn headers_parse_only_when_whole_and_refuse_one_shot_envelopes() {
        let k = key(Provider::RustCrypto);
        let subject = KeyRef::Subject {
            id: [7; 16],
            version: 1,
        };
        let (_, header) = StreamSealer::start(&k, subject, "acme", &context()).unwrap();
        assert_eq!(header.len(), SUBJECT_HEADER_LEN);
        for len in 0..header.len() {
            assert_eq!(parse_header(&header[..len]), Ok(None), "{len} bytes");
        }
        assert_eq!(
            parse_header(&header),
            Ok(Some(StreamHeader {
                key_ref: subject,
                len: SUBJECT_HEADER_LEN
            }))
        );
        let one_shot = crate::envelope::seal(&k, TENANT, "acme", &context(), b"x").unwrap();
        assert_eq!(parse_header(&one_shot), Err(Undecryptable));
        assert_eq!(
            crate::envelope::parse(&[header, vec![0; 40]].concat()).unwrap_err(),
            Undecryptable
        );
    }

    #[test]
    fn an_opener_refuses_everything_after_a_failure() {
        let k = key(Provider::RustCrypto);
        let data = plaintext(2 * P);
        let (header, body) = seal(&k, &data, 1 << 20);
        let s = segments(&body);
        let mut opener = StreamOpener::start(&k, &header, "acme", &context()).unwrap();
        let mut out = Vec::new();
        // The second segment given first fails once the next byte arrives...
        opener.push(s[1], &mut out).unwrap();
        assert_eq!(opener.push(s[0], &mut out), Err(Undecryptable));
        // ...and anything after it is refused too.
        assert_eq!(opener.push(s[0], &mut out), Err(Undecryptable));
        assert_eq!(opener.finish(&mut out), Err(Undecryptable));
        assert!(out.is_empty());
    }

    #[test]
    fn an_opener_refuses_a_header_that_is_short_long_or_not_one() {
        let k = key(Provider::RustCrypto);
        let (_, header) = StreamSealer::start(&k, TENANT, "acme", &context()).unwrap();
        for bad in [&[][..], &header[..2], &header[..TENANT_HEADER_LEN - 1]] {
            assert!(StreamOpener::start(&k, bad, "acme", &context()).is_err());
        }
        let long = [&header[..], &[0]].concat();
        assert!(StreamOpener::start(&k, &long, "acme", &context()).is_err());
        let mut one_shot = header.clone();
        one_shot[1] = crate::envelope::SUITE_AES256GCM_CMAC_KDF;
        assert!(StreamOpener::start(&k, &one_shot, "acme", &context()).is_err());
    }

    #[test]
    fn segment_numbers_end_at_u32_max() {
        let k = key(Provider::RustCrypto);
        let (mut sealer, _) = StreamSealer::start(&k, TENANT, "acme", &context()).unwrap();
        sealer.segments.next = u64::from(u32::MAX);
        let mut out = Vec::new();
        sealer.push(&plaintext(P + 1), &mut out).unwrap();
        assert_eq!(out.len(), SEGMENT_LEN);
        assert!(matches!(sealer.finish(&mut out), Err(SealError::TooLong)));
        assert_eq!(out.len(), SEGMENT_LEN);
    }

    #[test]
    fn debug_shows_no_secret() {
        let k = key(Provider::AwsLc);
        let (sealer, _) = StreamSealer::start(&k, TENANT, "acme", &context()).unwrap();
        assert_eq!(
            format!("{sealer:?}"),
            "StreamSealer { next_segment: 0, .. }"
        );
    }
}
