//! The per-message key: SP 800-108r1 KDF in counter mode with AES-256-CMAC as
//! the PRF (NIST SP 800-108r1 section 4.1; SP 800-38B for CMAC).
//!
//! ```text
//! K_i = CMAC(K, [i]_32 || Label || 0x00 || salt || [256]_32)   for i = 1, 2
//! message key = K_1 || K_2
//! ```
//!
//! With the 7-byte label each PRF input is exactly 32 bytes, two AES blocks,
//! so a derivation costs four AES-256 block operations; the CMAC key schedule
//! and subkeys are computed once per tenant or subject key and kept in the
//! cached [`MessageKeyDeriver`].

use aes::Aes256;
use cmac::{Cmac, Mac};
use zeroize::Zeroizing;

use crate::secret::Key256;

/// The KDF's label: names the purpose and the format version.
pub const LABEL: &[u8; 7] = b"kw1.dek";

/// Derives per-message keys from one tenant or subject key.
#[derive(Clone)]
pub struct MessageKeyDeriver {
    prf: Cmac<Aes256>,
}

impl MessageKeyDeriver {
    /// Prepares derivation from `key` (runs the AES key schedule once).
    pub fn new(key: &Key256) -> Self {
        let prf = <Cmac<Aes256> as Mac>::new_from_slice(key.expose())
            .expect("CMAC accepts a 32-byte AES-256 key");
        Self { prf }
    }

    /// The 256-bit message key for `salt`.
    pub fn derive(&self, salt: &[u8; super::SALT_LEN]) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        for (i, half) in out.chunks_exact_mut(16).enumerate() {
            let mut prf = self.prf.clone();
            prf.update(&(i as u32 + 1).to_be_bytes());
            prf.update(LABEL);
            prf.update(&[0x00]);
            prf.update(salt);
            prf.update(&256u32.to_be_bytes());
            half.copy_from_slice(&prf.finalize().into_bytes());
        }
        out
    }
}

impl std::fmt::Debug for MessageKeyDeriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKeyDeriver([REDACTED])")
    }
}
