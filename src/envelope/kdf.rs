//! The per-message key: SP 800-108r1 KDF in counter mode with AES-256-CMAC as
//! the PRF (NIST SP 800-108r1 section 4.1; SP 800-38B for CMAC).
//!
//! ```text
//! K_i = CMAC(K, [i]_32 || Label || 0x00 || salt || [256]_32)   for i = 1, 2
//! message key = K_1 || K_2
//! ```
//!
//! The deterministic envelope's AES-256-SIV key is the same KDF with
//! `L = 512` and four outputs, `K_1 || .. || K_4` ([`derive_512`], label
//! `kw1.siv`, 16 zero bytes in place of the salt).
//!
//! With the 7-byte label each PRF input is exactly 32 bytes, two whole AES
//! blocks `B1_i || B2`, so by SP 800-38B's definition
//! `CMAC(K, B1_i || B2) = AES_K(AES_K(B1_i) xor B2 xor K1)`, where the subkey
//! `K1 = dbl(AES_K(0^128))` is fixed per key. That is what [`derive`] computes:
//! the two outputs' first blocks in one pipelined AES call, then their second
//! blocks in another. Writing CMAC out for this one input shape (instead of
//! running the `cmac` crate, which re-derives the subkey and copies its
//! state on every call) cut a derivation to the cost of an AES-256 key
//! schedule and four blocks (BENCHMARKS.md, "The envelope, in-process"); a
//! unit test checks it against the `cmac` crate, and tests/vectors.rs
//! against the Python reference.
//!
//! What is kept per key is the raw key and K1 (48 bytes), not the expanded
//! AES key schedule: with RustCrypto's run-time CPU detection that schedule
//! is many times larger, and the key cache holds up to 100,000 of these
//! (BENCHMARKS.md, "The envelope, in-process", has the measured trade:
//! memory against time per seal).
//!
//! [`derive`]: MessageKeyDeriver::derive
//! [`derive_512`]: MessageKeyDeriver::derive_512

use aes::{
    Aes256Enc,
    cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray},
};
use zeroize::{Zeroize, Zeroizing};

use crate::secret::Key256;

/// The KDF's label for one-shot envelopes' message keys: names the purpose
/// and the format version.
pub const LABEL: &[u8; 7] = b"kw1.dek";
/// The KDF's label for streaming envelopes' stream keys.
pub const STREAM_LABEL: &[u8; 7] = b"kw1.stm";
/// The KDF's label for the AES-256-SIV key of deterministic envelopes.
pub const SIV_LABEL: &[u8; 7] = b"kw1.siv";

/// Derives per-message keys from one tenant or subject key.
pub struct MessageKeyDeriver {
    key: Zeroizing<[u8; 32]>,
    /// CMAC's first subkey for `key`.
    k1: Zeroizing<[u8; 16]>,
}

impl MessageKeyDeriver {
    /// Prepares derivation from `key` (computes the CMAC subkey).
    pub fn new(key: &Key256) -> Self {
        let cipher = Aes256Enc::new(GenericArray::from_slice(key.expose()));
        let mut l = GenericArray::default();
        cipher.encrypt_block(&mut l);
        let k1 = Zeroizing::new(dbl(l.into()));
        l.as_mut_slice().zeroize();
        Self {
            key: Zeroizing::new(*key.expose()),
            k1,
        }
    }

    /// The 256-bit message key for `salt`.
    pub fn derive(&self, salt: &[u8; super::SALT_LEN]) -> Zeroizing<[u8; 32]> {
        self.derive_for(LABEL, salt)
    }

    /// The 256-bit key for `label` (the purpose) and `salt`.
    pub fn derive_for(&self, label: &[u8; 7], salt: &[u8; super::SALT_LEN]) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        self.derive_into(label, salt, &mut *out);
        out
    }

    /// The 512-bit key for `label` and `context`: the same KDF with `L = 512`
    /// and four PRF outputs, for AES-256-SIV's double-length key
    /// ([`super::deterministic`]).
    pub fn derive_512(
        &self,
        label: &[u8; 7],
        context: &[u8; super::SALT_LEN],
    ) -> Zeroizing<[u8; 64]> {
        let mut out = Zeroizing::new([0u8; 64]);
        self.derive_into(label, context, &mut *out);
        out
    }

    /// Fills `out` (2 or 4 AES blocks: `L` = 256 or 512 bits) with
    /// `K(1) || K(2) || ...` for `label` and `context`.
    fn derive_into(&self, label: &[u8; 7], context: &[u8; super::SALT_LEN], out: &mut [u8]) {
        const MAX_BLOCKS: usize = 4;
        let n = out.len() / 16;
        assert!(
            out.len().is_multiple_of(16) && (1..=MAX_BLOCKS).contains(&n),
            "the KDF derives whole blocks"
        );
        let l = u32::try_from(out.len() * 8).expect("at most 512 bits");
        let cipher = Aes256Enc::new(GenericArray::from_slice(&*self.key));
        // B1_i = [i]_32 || Label || 0x00 || context[..4];
        // B2 = context[4..] || [L]_32.
        let mut blocks = [GenericArray::default(); MAX_BLOCKS];
        let blocks = &mut blocks[..n];
        for (i, block) in (1u32..).zip(blocks.iter_mut()) {
            block[..4].copy_from_slice(&i.to_be_bytes());
            block[4..11].copy_from_slice(label);
            block[11] = 0x00;
            block[12..].copy_from_slice(&context[..4]);
        }
        cipher.encrypt_blocks(blocks);
        for block in blocks.iter_mut() {
            for (j, byte) in block.iter_mut().enumerate() {
                let b2 = if j < 12 {
                    context[4 + j]
                } else {
                    l.to_be_bytes()[j - 12]
                };
                *byte ^= b2 ^ self.k1[j];
            }
        }
        cipher.encrypt_blocks(blocks);
        for (chunk, block) in out.chunks_exact_mut(16).zip(blocks.iter_mut()) {
            chunk.copy_from_slice(block);
            block.as_mut_slice().zeroize();
        }
    }
}

/// Doubling in GF(2^128) as SP 800-38B defines it for subkeys: shift left
/// one bit, and xor 0x87 into the last byte when the bit shifted out was set.
fn dbl(block: [u8; 16]) -> [u8; 16] {
    let v = u128::from_be_bytes(block);
    ((v << 1) ^ ((v >> 127) * 0x87)).to_be_bytes()
}

impl std::fmt::Debug for MessageKeyDeriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKeyDeriver([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use aes::Aes256;
    use cmac::{Cmac, Mac};

    use super::*;

    /// The KDF as SP 800-108r1 writes it, on the `cmac` crate.
    fn by_the_book<const N: usize>(key: &[u8; 32], label: &[u8; 7], salt: &[u8; 16]) -> [u8; N] {
        let mut out = [0u8; N];
        let l = u32::try_from(N * 8).unwrap();
        for (i, block) in (1u32..).zip(out.chunks_exact_mut(16)) {
            let mut prf = <Cmac<Aes256> as Mac>::new_from_slice(key).unwrap();
            prf.update(&i.to_be_bytes());
            prf.update(label);
            prf.update(&[0x00]);
            prf.update(salt);
            prf.update(&l.to_be_bytes());
            block.copy_from_slice(&prf.finalize().into_bytes());
        }
        out
    }

    #[test]
    fn matches_cmac_as_specified() {
        for seed in 0u8..64 {
            let key: [u8; 32] = std::array::from_fn(|i| seed.wrapping_mul(31) ^ (i as u8 * 7));
            let salt: [u8; 16] = std::array::from_fn(|i| seed.wrapping_add(i as u8 * 13));
            let deriver = MessageKeyDeriver::new(&Key256::from_slice(&key).unwrap());
            assert_eq!(
                *deriver.derive(&salt),
                by_the_book::<32>(&key, LABEL, &salt),
                "seed {seed}"
            );
            assert_eq!(
                *deriver.derive_512(SIV_LABEL, &salt),
                by_the_book::<64>(&key, SIV_LABEL, &salt),
                "seed {seed}, L = 512"
            );
        }
    }

    #[test]
    fn dbl_follows_sp_800_38b() {
        // SP 800-38B, example D.3 (AES-256): L and K1.
        let l = hex::decode("e568f68194cf76d6174d4cc04310a854").unwrap();
        let k1 = hex::decode("cad1ed03299eedac2e9a99808621502f").unwrap();
        assert_eq!(dbl(l.try_into().unwrap()).to_vec(), k1);
    }
}
