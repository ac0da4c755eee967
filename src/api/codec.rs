//! The protobuf codec of keywarden's services: prost's, with counts bounded
//! before decoding.
//!
//! prost decodes a repeated field or a map by allocating one element per
//! occurrence on the wire, and an empty batch item is 2 bytes on the wire but
//! about 100 in memory: a 16 MiB `EncryptBatch` of empty items decoded into
//! hundreds of megabytes (docs/SECURITY.md 12.2). So before prost sees a
//! message, a scan of its wire form (no allocation, one pass over the bytes
//! tonic has already buffered within the size limit) counts what a decode
//! would allocate per element, and refuses, with INVALID_ARGUMENT and the
//! same message the handler would give, a message with more batch items than
//! [`max_batch_items`] or more context entries than
//! [`super::MAX_CONTEXT_ENTRIES`] in any context map. After decoding, the
//! handlers check the same limits again, exactly as configured.
//!
//! The scan reads the wire format by field number, from the proto:
//! `EncryptBatchRequest.items = 2` of `EncryptItem` (`context = 2`),
//! `DecryptBatchRequest.items = 2` of `DecryptItem` (`context = 1`), the
//! `context` of the single-item requests, and of the stream starts (field
//! 1 of each stream request). A unit test checks these numbers against the
//! compiled descriptors.

use std::{
    marker::PhantomData,
    sync::atomic::{AtomicUsize, Ordering},
};

use bytes::Buf;
use prost::Message;
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder},
};
use tonic_prost::ProstEncoder;

use super::{MAX_CONTEXT_ENTRIES, pb};
use crate::envelope::blind::{MAX_TRANSFORMATIONS, MAX_VALUES};

tokio::task_local! {
    /// The batch item limit of the server decoding this call: set by the
    /// edge around each call it admits ([`with_batch_limit`]).
    static BATCH_LIMIT: usize;
}

/// The largest `limits.max_batch_items` of the servers this process runs
/// (one, in production): the limit of a decode outside any call's scope.
static MAX_BATCH_ITEMS: AtomicUsize = AtomicUsize::new(0);

/// Records that a server of this process allows batches of `items`.
pub fn raise_max_batch_items(items: usize) {
    MAX_BATCH_ITEMS.fetch_max(items, Ordering::Relaxed);
}

/// Runs a call (its decoding included: tonic decodes a unary request, and a
/// stream's first message, inside the call's future) with the batch item
/// limit of the server that admitted it.
pub async fn with_batch_limit<F: std::future::Future>(items: usize, call: F) -> F::Output {
    BATCH_LIMIT.scope(items, call).await
}

/// The most batch items the scan lets through now.
pub fn max_batch_items() -> usize {
    BATCH_LIMIT
        .try_with(|items| *items)
        .unwrap_or_else(|_| MAX_BATCH_ITEMS.load(Ordering::Relaxed))
}

/// Where a message keeps what a decode allocates per element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Nothing that is not bounded by its byte size.
    Plain,
    /// A context map at this field number.
    Context(u32),
    /// Batch items at `items`, each with a context map at `context`.
    Batch { items: u32, context: u32 },
    /// A oneof whose field `start` is a message with a context map at
    /// `context`.
    StreamStart { start: u32, context: u32 },
    /// A blind-index request: a context map at `context`, index values at
    /// `values`, each with its transformations at field 2.
    Index { context: u32, values: u32 },
    /// Batch items at `items`, each of [`Shape::Index`].
    IndexBatch {
        items: u32,
        context: u32,
        values: u32,
    },
}

/// Every message the codec decodes declares its [`Shape`].
pub trait WireShape {
    const SHAPE: Shape;
}

macro_rules! shapes {
    ($($ty:ty => $shape:expr),* $(,)?) => {
        $(impl WireShape for $ty {
            const SHAPE: Shape = $shape;
        })*
    };
}

shapes!(
    pb::EncryptRequest => Shape::Context(3),
    pb::DecryptRequest => Shape::Context(2),
    pb::RewrapRequest => Shape::Context(2),
    pb::EncryptBatchRequest => Shape::Batch { items: 2, context: 2 },
    pb::DecryptBatchRequest => Shape::Batch { items: 2, context: 1 },
    pb::EncryptStreamRequest => Shape::StreamStart { start: 1, context: 3 },
    pb::DecryptStreamRequest => Shape::StreamStart { start: 1, context: 2 },
    // Admin requests hold no repeated field or map; their size limit is
    // small (server.admin_max_request_bytes).
    pb::CreateTenantRequest => Shape::Plain,
    pb::GetTenantRequest => Shape::Plain,
    pb::ListTenantsRequest => Shape::Plain,
    pb::RotateTenantKeyRequest => Shape::Plain,
    pb::ShredTenantRequest => Shape::Plain,
    pb::ShredSubjectRequest => Shape::Plain,
    pb::RotateRootKeyRequest => Shape::Plain,
    pb::UpdateTenantPolicyRequest => Shape::Plain,
    pb::GetAuditHeadRequest => Shape::Plain,
    pb::BlindIndexRequest => Shape::Index { context: 2, values: 3 },
    pb::BlindIndexBatchRequest => Shape::IndexBatch { items: 2, context: 1, values: 2 },
    pb::RotateIndexKeyRequest => Shape::Plain,
    pb::RetireIndexKeyRequest => Shape::Plain,
    pb::GetIndexKeysRequest => Shape::Plain,
    // Responses, which the clients decode: they come from the sidecar.
    pb::EncryptResponse => Shape::Plain,
    pb::DecryptResponse => Shape::Plain,
    pb::RewrapResponse => Shape::Plain,
    pb::EncryptBatchResponse => Shape::Plain,
    pb::DecryptBatchResponse => Shape::Plain,
    pb::EncryptStreamResponse => Shape::Plain,
    pb::DecryptStreamResponse => Shape::Plain,
    pb::Tenant => Shape::Plain,
    pb::ListTenantsResponse => Shape::Plain,
    pb::ShredTenantResponse => Shape::Plain,
    pb::ShredSubjectResponse => Shape::Plain,
    pb::RotateRootKeyProgress => Shape::Plain,
    pb::AuditHead => Shape::Plain,
    // ---- data keys ----
    pb::GenerateDataKeyRequest => Shape::Context(3),
    pb::DecryptDataKeyRequest => Shape::Context(2),
    pb::RewrapDataKeyRequest => Shape::Context(2),
    pb::GenerateDataKeyResponse => Shape::Plain,
    pb::DecryptDataKeyResponse => Shape::Plain,
    pb::RewrapDataKeyResponse => Shape::Plain,
    pb::BlindIndexResponse => Shape::Plain,
    pb::BlindIndexBatchResponse => Shape::Plain,
    pb::IndexKeys => Shape::Plain,
);

/// The wire form is not protobuf, or a count is over its limit.
fn refuse(message: String) -> Status {
    Status::invalid_argument(message)
}

/// A batch with more than `max` items.
pub fn too_many_items(max: usize) -> Status {
    refuse(format!(
        "items: more than {max} items; the limit is {max} per batch"
    ))
}

fn malformed() -> Status {
    Status::internal("failed to decode the request message")
}

/// One field of a message's wire form: its number, and its bytes when it is
/// length-delimited.
struct Fields<'a> {
    bytes: &'a [u8],
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

impl<'a> Iterator for Fields<'a> {
    /// (field number, the bytes of a length-delimited field), or `Err` for
    /// a wire form that does not parse.
    type Item = Result<(u32, Option<&'a [u8]>), ()>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.bytes.is_empty() {
            return None;
        }
        let item = (|| {
            let key = varint(&mut self.bytes).ok_or(())?;
            let field = u32::try_from(key >> 3).map_err(|_| ())?;
            let payload = match key & 7 {
                0 => {
                    varint(&mut self.bytes).ok_or(())?;
                    None
                }
                1 => {
                    self.bytes = self.bytes.get(8..).ok_or(())?;
                    None
                }
                2 => {
                    let len =
                        usize::try_from(varint(&mut self.bytes).ok_or(())?).map_err(|_| ())?;
                    if len > self.bytes.len() {
                        return Err(());
                    }
                    let (payload, rest) = self.bytes.split_at(len);
                    self.bytes = rest;
                    Some(payload)
                }
                5 => {
                    self.bytes = self.bytes.get(4..).ok_or(())?;
                    None
                }
                // Groups (3, 4) are not in proto3; 6 and 7 are not wire types.
                _ => return Err(()),
            };
            Ok((field, payload))
        })();
        if item.is_err() {
            self.bytes = &[];
        }
        Some(item)
    }
}

fn fields(bytes: &[u8]) -> Fields<'_> {
    Fields { bytes }
}

/// Occurrences of `field` in `bytes`, stopping past `limit`.
fn count(bytes: &[u8], field: u32, limit: usize) -> Result<usize, ()> {
    let mut n = 0;
    for f in fields(bytes) {
        if f?.0 == field {
            n += 1;
            if n > limit {
                break;
            }
        }
    }
    Ok(n)
}

fn check_context(bytes: &[u8], field: u32) -> Result<(), Status> {
    if count(bytes, field, MAX_CONTEXT_ENTRIES).map_err(|()| malformed())? > MAX_CONTEXT_ENTRIES {
        return Err(refuse(format!(
            "context: more than {MAX_CONTEXT_ENTRIES} entries; at most {MAX_CONTEXT_ENTRIES} are allowed"
        )));
    }
    Ok(())
}

/// `IndexValue.transformations`.
const TRANSFORMATIONS_FIELD: u32 = 2;

/// What a blind-index request says when it has too many values.
pub fn too_many_index_values() -> Status {
    refuse(format!(
        "values: more than {MAX_VALUES}; a token takes 1 to {MAX_VALUES} values"
    ))
}

/// What a blind-index request says when a value has too many
/// transformations.
pub fn too_many_transformations() -> Status {
    refuse(format!(
        "transformations: more than {MAX_TRANSFORMATIONS} for one value"
    ))
}

fn check_index(bytes: &[u8], context: u32, values: u32) -> Result<(), Status> {
    check_context(bytes, context)?;
    let mut n = 0usize;
    for f in fields(bytes) {
        let (number, payload) = f.map_err(|()| malformed())?;
        if number != values {
            continue;
        }
        n += 1;
        if n > MAX_VALUES {
            return Err(too_many_index_values());
        }
        if let Some(value) = payload
            && count(value, TRANSFORMATIONS_FIELD, MAX_TRANSFORMATIONS).map_err(|()| malformed())?
                > MAX_TRANSFORMATIONS
        {
            return Err(too_many_transformations());
        }
    }
    Ok(())
}

/// Counts a batch's items (field `items`) against the batch limit, and
/// checks each with `check_item`.
fn check_items(
    bytes: &[u8],
    items: u32,
    check_item: impl Fn(&[u8]) -> Result<(), Status>,
) -> Result<(), Status> {
    let max = max_batch_items();
    let mut n = 0usize;
    for f in fields(bytes) {
        let (number, payload) = f.map_err(|()| malformed())?;
        if number != items {
            continue;
        }
        n += 1;
        if n > max {
            return Err(too_many_items(max));
        }
        if let Some(item) = payload {
            check_item(item)?;
        }
    }
    Ok(())
}

/// Checks the counts of a message's wire form against the limits.
pub fn check(shape: Shape, bytes: &[u8]) -> Result<(), Status> {
    match shape {
        Shape::Plain => Ok(()),
        Shape::Context(field) => check_context(bytes, field),
        Shape::Batch { items, context } => {
            check_items(bytes, items, |item| check_context(item, context))
        }
        Shape::Index { context, values } => check_index(bytes, context, values),
        Shape::IndexBatch {
            items,
            context,
            values,
        } => check_items(bytes, items, |item| check_index(item, context, values)),
        Shape::StreamStart { start, context } => {
            for f in fields(bytes) {
                if let (number, Some(payload)) = f.map_err(|()| malformed())?
                    && number == start
                {
                    check_context(payload, context)?;
                }
            }
            Ok(())
        }
    }
}

/// prost's codec, with [`check`] before every decode.
#[derive(Debug, Clone)]
pub struct WireCodec<E, D> {
    _pd: PhantomData<(E, D)>,
}

impl<E, D> Default for WireCodec<E, D> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<E, D> Codec for WireCodec<E, D>
where
    E: Message + Send + 'static,
    D: Message + Default + WireShape + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = ProstEncoder<E>;
    type Decoder = WireDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        WireDecoder { _pd: PhantomData }
    }
}

/// Decodes `D` after checking its wire form.
#[derive(Debug)]
pub struct WireDecoder<D> {
    _pd: PhantomData<D>,
}

impl<D: Message + Default + WireShape> Decoder for WireDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        if D::SHAPE != Shape::Plain {
            // tonic hands over one whole message in one contiguous buffer.
            let bytes = buf.chunk();
            if bytes.len() != buf.remaining() {
                return Err(Status::internal("a message arrived in pieces"));
            }
            check(D::SHAPE, bytes)?;
        }
        D::decode(buf).map(Some).map_err(|_| malformed())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn context(n: usize) -> BTreeMap<String, String> {
        (0..n).map(|i| (format!("k{i}"), String::new())).collect()
    }

    #[test]
    fn counts_are_refused_before_decoding_and_allowed_up_to_the_limit() {
        raise_max_batch_items(10);
        let max = max_batch_items();
        assert!(max >= 10);
        let batch = |items: usize, entries: usize| pb::EncryptBatchRequest {
            tenant_id: "acme".into(),
            items: (0..items)
                .map(|_| pb::EncryptItem {
                    subject_id: String::new(),
                    context: context(entries),
                    plaintext: vec![],
                    deterministic: false,
                    key_version: 0,
                })
                .collect(),
        };
        let shape = <pb::EncryptBatchRequest as WireShape>::SHAPE;
        assert!(check(shape, &batch(max, MAX_CONTEXT_ENTRIES).encode_to_vec()).is_ok());
        let e = check(shape, &batch(max + 1, 0).encode_to_vec()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("items: more than"), "{e:?}");
        let e = check(shape, &batch(1, MAX_CONTEXT_ENTRIES + 1).encode_to_vec()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("context: more than 64"), "{e:?}");

        let decrypt = pb::DecryptBatchRequest {
            tenant_id: "acme".into(),
            items: vec![pb::DecryptItem {
                context: context(MAX_CONTEXT_ENTRIES + 1),
                ciphertext: vec![1],
            }],
        };
        assert!(
            check(
                <pb::DecryptBatchRequest as WireShape>::SHAPE,
                &decrypt.encode_to_vec()
            )
            .is_err()
        );

        for (shape, bytes) in [
            (
                <pb::EncryptRequest as WireShape>::SHAPE,
                pb::EncryptRequest {
                    context: context(65),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                <pb::DecryptRequest as WireShape>::SHAPE,
                pb::DecryptRequest {
                    context: context(65),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                <pb::RewrapRequest as WireShape>::SHAPE,
                pb::RewrapRequest {
                    context: context(65),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            (
                <pb::EncryptStreamRequest as WireShape>::SHAPE,
                pb::EncryptStreamRequest {
                    part: Some(pb::encrypt_stream_request::Part::Start(
                        pb::EncryptStreamStart {
                            context: context(65),
                            ..Default::default()
                        },
                    )),
                }
                .encode_to_vec(),
            ),
            (
                <pb::DecryptStreamRequest as WireShape>::SHAPE,
                pb::DecryptStreamRequest {
                    part: Some(pb::decrypt_stream_request::Part::Start(
                        pb::DecryptStreamStart {
                            context: context(65),
                            ..Default::default()
                        },
                    )),
                }
                .encode_to_vec(),
            ),
        ] {
            assert!(check(shape, &bytes).is_err(), "{shape:?}");
        }
    }

    #[test]
    fn the_field_numbers_are_the_protos() {
        let descriptor =
            <prost_types::FileDescriptorSet as Message>::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
        let number = |message: &str, field: &str| -> u32 {
            descriptor
                .file
                .iter()
                .flat_map(|f| &f.message_type)
                .find(|m| m.name() == message)
                .and_then(|m| m.field.iter().find(|f| f.name() == field))
                .map(|f| u32::try_from(f.number()).unwrap())
                .unwrap_or_else(|| panic!("{message}.{field}"))
        };
        let context = |m: &str| Shape::Context(number(m, "context"));
        assert_eq!(
            <pb::EncryptRequest as WireShape>::SHAPE,
            context("EncryptRequest")
        );
        assert_eq!(
            <pb::DecryptRequest as WireShape>::SHAPE,
            context("DecryptRequest")
        );
        assert_eq!(
            <pb::RewrapRequest as WireShape>::SHAPE,
            context("RewrapRequest")
        );
        assert_eq!(
            <pb::EncryptBatchRequest as WireShape>::SHAPE,
            Shape::Batch {
                items: number("EncryptBatchRequest", "items"),
                context: number("EncryptItem", "context")
            }
        );
        assert_eq!(
            <pb::DecryptBatchRequest as WireShape>::SHAPE,
            Shape::Batch {
                items: number("DecryptBatchRequest", "items"),
                context: number("DecryptItem", "context")
            }
        );
        assert_eq!(
            <pb::BlindIndexRequest as WireShape>::SHAPE,
            Shape::Index {
                context: number("BlindIndexRequest", "context"),
                values: number("BlindIndexRequest", "values")
            }
        );
        assert_eq!(
            <pb::BlindIndexBatchRequest as WireShape>::SHAPE,
            Shape::IndexBatch {
                items: number("BlindIndexBatchRequest", "items"),
                context: number("BlindIndexItem", "context"),
                values: number("BlindIndexItem", "values")
            }
        );
        assert_eq!(
            TRANSFORMATIONS_FIELD,
            number("IndexValue", "transformations")
        );
        assert_eq!(
            <pb::EncryptStreamRequest as WireShape>::SHAPE,
            Shape::StreamStart {
                start: number("EncryptStreamRequest", "start"),
                context: number("EncryptStreamStart", "context")
            }
        );
        assert_eq!(
            <pb::DecryptStreamRequest as WireShape>::SHAPE,
            Shape::StreamStart {
                start: number("DecryptStreamRequest", "start"),
                context: number("DecryptStreamStart", "context")
            }
        );
    }

    #[test]
    fn blind_index_values_and_transformations_are_counted_on_the_wire() {
        let value = |steps: usize| pb::IndexValue {
            value: b"v".to_vec(),
            transformations: vec![pb::IndexTransformation::default(); steps],
        };
        let request = |values: usize, steps: usize| pb::BlindIndexRequest {
            values: vec![value(steps); values],
            ..Default::default()
        };
        let shape = <pb::BlindIndexRequest as WireShape>::SHAPE;
        assert!(
            check(
                shape,
                &request(MAX_VALUES, MAX_TRANSFORMATIONS).encode_to_vec()
            )
            .is_ok()
        );
        let refused = check(shape, &request(MAX_VALUES + 1, 0).encode_to_vec()).unwrap_err();
        assert_eq!(refused.message(), too_many_index_values().message());
        let refused =
            check(shape, &request(1, MAX_TRANSFORMATIONS + 1).encode_to_vec()).unwrap_err();
        assert_eq!(refused.message(), too_many_transformations().message());
        let batch = |steps: usize| pb::BlindIndexBatchRequest {
            tenant_id: "acme".into(),
            items: vec![pb::BlindIndexItem {
                values: vec![value(steps)],
                ..Default::default()
            }],
        };
        raise_max_batch_items(10);
        let shape = <pb::BlindIndexBatchRequest as WireShape>::SHAPE;
        assert!(check(shape, &batch(MAX_TRANSFORMATIONS).encode_to_vec()).is_ok());
        assert!(check(shape, &batch(MAX_TRANSFORMATIONS + 1).encode_to_vec()).is_err());
    }

    #[test]
    fn a_wire_form_that_does_not_parse_is_refused_without_a_panic() {
        let shape = <pb::EncryptBatchRequest as WireShape>::SHAPE;
        for bytes in [
            &[0x12][..],         // field 2, no length
            &[0x12, 0x05, 0x00], // length past the end
            &[0x0b],             // a group
            &[0x0f],             // wire type 7
            &[0xff; 11][..],     // a varint of 11 bytes
        ] {
            assert!(check(shape, bytes).is_err(), "{bytes:?}");
        }
    }
}
