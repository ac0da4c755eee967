//! Counting a batch's items while its message arrives.

/// Counts one top-level field of a protobuf message fed in pieces, and
/// says when it occurs more than `limit` times: a batch's items, counted
/// while the message arrives, so an oversized batch is refused after the
/// bytes of its first `limit + 1` items, not after all of them.
#[derive(Clone, Copy, Debug)]
pub struct FieldCounter {
    field: u32,
    pub(super) limit: usize,
    pub(super) count: usize,
    state: Wire,
}

#[derive(Clone, Copy, Debug)]
enum Wire {
    /// Reading a field's key (a varint).
    Key { value: u64, shift: u32 },
    /// Skipping a varint value.
    Varint,
    /// Reading a length-delimited field's length.
    Len { value: u64, shift: u32 },
    /// Skipping this many bytes of a value.
    Skip(u64),
    /// Not protobuf: counting stops (the decoder will refuse the message).
    Lost,
}

impl FieldCounter {
    pub fn new(field: u32, limit: usize) -> Self {
        Self {
            field,
            limit,
            count: 0,
            state: Wire::Key { value: 0, shift: 0 },
        }
    }

    /// A new message starts.
    pub(super) fn reset(&mut self) {
        *self = Self::new(self.field, self.limit);
    }

    /// Feeds the next bytes of the message; `false` once the field occurred
    /// more than `limit` times.
    pub(super) fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while let Some((&byte, rest)) = bytes.split_first() {
            match &mut self.state {
                Wire::Lost => return true,
                Wire::Skip(n) => {
                    let take = usize::try_from(*n).unwrap_or(usize::MAX).min(bytes.len());
                    *n -= take as u64;
                    if *n == 0 {
                        self.state = Wire::Key { value: 0, shift: 0 };
                    }
                    bytes = &bytes[take..];
                    continue;
                }
                Wire::Varint => {
                    if byte & 0x80 == 0 {
                        self.state = Wire::Key { value: 0, shift: 0 };
                    }
                }
                Wire::Key { value, shift } | Wire::Len { value, shift } => {
                    if *shift > 63 {
                        self.state = Wire::Lost;
                        return true;
                    }
                    *value |= u64::from(byte & 0x7f) << *shift;
                    *shift += 7;
                    if byte & 0x80 == 0 {
                        let value = *value;
                        self.state = match self.state {
                            Wire::Key { .. } => {
                                if value >> 3 == u64::from(self.field) {
                                    self.count += 1;
                                    if self.count > self.limit {
                                        return false;
                                    }
                                }
                                match value & 7 {
                                    0 => Wire::Varint,
                                    1 => Wire::Skip(8),
                                    2 => Wire::Len { value: 0, shift: 0 },
                                    5 => Wire::Skip(4),
                                    _ => Wire::Lost,
                                }
                            }
                            _ if value == 0 => Wire::Key { value: 0, shift: 0 },
                            _ => Wire::Skip(value),
                        };
                    }
                }
            }
            bytes = rest;
        }
        true
    }
}
