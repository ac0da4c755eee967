//! The per-message key: SP 800-108r1 KDF in counter mode with AES-256-CMAC as
//! the PRF (NIST SP 800-108r1 section 4.1; SP 800-38B for CMAC).
//!
//! ```text
//! K_i = CMAC(K, [i]_32 || Label || 0x00 || salt || [256]_32)   for i = 1, 2
//! message key = K_1 || K_2
//! ```
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
        let cipher = Aes256Enc::new(GenericArray::from_slice(&*self.key));
        // B1_i = [i]_32 || Label || 0x00 || salt[..4]; B2 = salt[4..] || [256]_32.
        let mut blocks = [GenericArray::default(), GenericArray::default()];
        for (i, block) in (1u32..).zip(blocks.iter_mut()) {
            block[..4].copy_from_slice(&i.to_be_bytes());
            block[4..11].copy_from_slice(label);
            block[11] = 0x00;
            block[12..].copy_from_slice(&salt[..4]);
        }
        cipher.encrypt_blocks(&mut blocks);
        for block in &mut blocks {
            for (j, byte) in block.iter_mut().enumerate() {
                let b2 = if j < 12 {
                    salt[4 + j]
                } else {
                    256u32.to_be_bytes()[j - 12]
                };
                *byte ^= b2 ^ self.k1[j];
            }
        }
        cipher.encrypt_blocks(&mut blocks);
        let mut out = Zeroizing::new([0u8; 32]);
        out[..16].copy_from_slice(&blocks[0]);
        out[16..].copy_from_slice(&blocks[1]);
        blocks.iter_mut().for_each(|b| b.as_mut_slice().zeroize());
        out
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
    fn by_the_book(key: &[u8; 32], salt: &[u8; 16]) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, half) in (1u32..).zip(out.chunks_exact_mut(16)) {
            let mut prf = <Cmac<Aes256> as Mac>::new_from_slice(key).unwrap();
            prf.update(&i.to_be_bytes());
            prf.update(LABEL);
            prf.update(&[0x00]);
            prf.update(salt);
            prf.update(&256u32.to_be_bytes());
            half.copy_from_slice(&prf.finalize().into_bytes());
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
                by_the_book(&key, &salt),
                "seed {seed}"
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
