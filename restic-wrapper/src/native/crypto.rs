//! restic's cryptography, read side only: scrypt key derivation for key files, and
//! AES-256-CTR with Poly1305-AES authentication for every other file (restic's design
//! document, "Keys, Encryption and MAC").

use aes::cipher::{BlockEncrypt, KeyInit, KeyIvInit, StreamCipher};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use poly1305::Poly1305;
use serde::Deserialize;

use super::NativeError;

const IV_LEN: usize = 16;
const MAC_LEN: usize = 16;

/// A repository's master key (or a key derived from a password).
#[derive(Clone)]
pub struct MasterKey {
    encrypt: [u8; 32],
    mac_k: [u8; 16],
    mac_r: [u8; 16],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// A key file under `keys/`: scrypt parameters and the master key encrypted with the
/// password-derived key.
#[derive(Debug, Deserialize)]
pub struct KeyFile {
    pub kdf: String,
    #[serde(rename = "N")]
    pub n: u64,
    pub r: u32,
    pub p: u32,
    pub salt: String,
    pub data: String,
}

#[derive(Deserialize)]
struct MasterKeyJson {
    mac: MacJson,
    encrypt: String,
}

#[derive(Deserialize)]
struct MacJson {
    k: String,
    r: String,
}

fn array<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[u8; N], NativeError> {
    bytes.try_into().map_err(|_| NativeError::Format {
        what,
        reason: format!("expected {N} bytes, found {}", bytes.len()),
    })
}

impl KeyFile {
    /// Derives the password key with scrypt and opens the master key. A wrong password shows
    /// up as a MAC mismatch.
    pub fn open(&self, password: &[u8]) -> Result<MasterKey, NativeError> {
        if self.kdf != "scrypt" {
            return Err(NativeError::Format {
                what: "key file",
                reason: format!("unsupported kdf {:?}", self.kdf),
            });
        }
        if !self.n.is_power_of_two() || self.n < 2 {
            return Err(NativeError::Format {
                what: "key file",
                reason: format!("scrypt N={} is not a power of two", self.n),
            });
        }
        let log_n = u8::try_from(self.n.trailing_zeros()).map_err(|_| NativeError::Format {
            what: "key file",
            reason: "scrypt N is too large".into(),
        })?;
        let salt = decode(&self.salt, "key file salt")?;
        let params =
            scrypt::Params::new(log_n, self.r, self.p, 64).map_err(|e| NativeError::Format {
                what: "key file",
                reason: format!("invalid scrypt parameters: {e}"),
            })?;
        let mut derived = [0u8; 64];
        scrypt::scrypt(password, &salt, &params, &mut derived).map_err(|e| {
            NativeError::Format {
                what: "key file",
                reason: format!("scrypt failed: {e}"),
            }
        })?;
        let user_key = MasterKey {
            encrypt: array(&derived[..32], "derived key")?,
            mac_k: array(&derived[32..48], "derived key")?,
            mac_r: array(&derived[48..64], "derived key")?,
        };
        let sealed = decode(&self.data, "key file data")?;
        let plain = user_key.decrypt(&sealed).map_err(|e| match e {
            NativeError::Authentication { .. } => NativeError::WrongPassword,
            other => other,
        })?;
        let json: MasterKeyJson =
            serde_json::from_slice(&plain).map_err(|e| NativeError::Format {
                what: "master key",
                reason: e.to_string(),
            })?;
        Ok(MasterKey {
            encrypt: array(
                &decode(&json.encrypt, "master key")?,
                "master encryption key",
            )?,
            mac_k: array(&decode(&json.mac.k, "master key")?, "master MAC key")?,
            mac_r: array(&decode(&json.mac.r, "master key")?, "master MAC key")?,
        })
    }
}

fn decode(text: &str, what: &'static str) -> Result<Vec<u8>, NativeError> {
    STANDARD.decode(text).map_err(|e| NativeError::Format {
        what,
        reason: e.to_string(),
    })
}

impl MasterKey {
    /// Poly1305-AES: the one-time key is `r || AES-128_k(iv)`.
    fn mac(&self, iv: &[u8; IV_LEN], ciphertext: &[u8]) -> [u8; MAC_LEN] {
        let aes = aes::Aes128::new(&self.mac_k.into());
        let mut s = aes::Block::clone_from_slice(iv);
        aes.encrypt_block(&mut s);
        let mut key = [0u8; 32];
        key[..16].copy_from_slice(&self.mac_r);
        key[16..].copy_from_slice(&s);
        Poly1305::new(&key.into())
            .compute_unpadded(ciphertext)
            .into()
    }

    /// Opens `iv || ciphertext || mac`, checking the MAC before decrypting.
    pub fn decrypt(&self, sealed: &[u8]) -> Result<Vec<u8>, NativeError> {
        if sealed.len() < IV_LEN + MAC_LEN {
            return Err(NativeError::Format {
                what: "encrypted file",
                reason: format!("{} bytes is too short", sealed.len()),
            });
        }
        let (iv, rest) = sealed.split_at(IV_LEN);
        let (ciphertext, mac) = rest.split_at(rest.len() - MAC_LEN);
        let iv: [u8; IV_LEN] = array(iv, "iv")?;
        let want = self.mac(&iv, ciphertext);
        // Constant-time comparison: a timing oracle on the MAC would be a forgery aid.
        let diff = want.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(NativeError::Authentication {
                what: "encrypted file",
            });
        }
        let mut plain = ciphertext.to_vec();
        let mut ctr = ctr::Ctr128BE::<aes::Aes256>::new(&self.encrypt.into(), &iv.into());
        ctr.apply_keystream(&mut plain);
        Ok(plain)
    }

    /// Test helper: seals data the way restic does, with the given IV.
    #[cfg(any(test, feature = "test-support"))]
    pub fn encrypt_with_iv(&self, iv: [u8; IV_LEN], plain: &[u8]) -> Vec<u8> {
        let mut ct = plain.to_vec();
        let mut ctr = ctr::Ctr128BE::<aes::Aes256>::new(&self.encrypt.into(), &iv.into());
        ctr.apply_keystream(&mut ct);
        let mac = self.mac(&iv, &ct);
        [iv.as_slice(), &ct, &mac].concat()
    }

    #[cfg(test)]
    pub fn from_parts(encrypt: [u8; 32], mac_k: [u8; 16], mac_r: [u8; 16]) -> MasterKey {
        MasterKey {
            encrypt,
            mac_k,
            mac_r,
        }
    }
}

/// Unpacks decrypted "unpacked" files (config, snapshot, index): repository format v2
/// prefixes compressed files with the byte 2; plain JSON starts with `{` or `[`. One unpacker
/// is reused for many files, because a zstd decoder allocates its window on every start.
#[derive(Default)]
pub struct Unpacker {
    zstd: Option<ruzstd::decoding::FrameDecoder>,
}

impl std::fmt::Debug for Unpacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unpacker").finish_non_exhaustive()
    }
}

impl Unpacker {
    /// A repository file's plaintext as restic writes it: JSON as it is (format 1), or a
    /// format byte 2 and a zstd frame.
    pub fn unpack(&mut self, plain: Vec<u8>, what: &'static str) -> Result<Vec<u8>, NativeError> {
        match plain.first() {
            Some(b'{') | Some(b'[') => Ok(plain),
            Some(2) => self.zstd_frame(&plain[1..], what),
            other => Err(NativeError::Format {
                what,
                reason: format!("unknown format byte {other:?}"),
            }),
        }
    }

    /// Decompresses a blob stored compressed: a bare zstd frame of `len` plaintext bytes.
    pub fn decompress(
        &mut self,
        data: &[u8],
        len: usize,
        what: &'static str,
    ) -> Result<Vec<u8>, NativeError> {
        let out = self.zstd_frame(data, what)?;
        if out.len() != len {
            return Err(NativeError::Format {
                what,
                reason: format!("zstd: {} bytes where the index has {len}", out.len()),
            });
        }
        Ok(out)
    }

    /// One whole zstd frame, with nothing after it.
    fn zstd_frame(&mut self, data: &[u8], what: &'static str) -> Result<Vec<u8>, NativeError> {
        let zstd_error = |e: &dyn std::fmt::Display| NativeError::Format {
            what,
            reason: format!("zstd: {e}"),
        };
        let decoder = self
            .zstd
            .get_or_insert_with(ruzstd::decoding::FrameDecoder::new);
        let mut input = data;
        decoder.reset(&mut input).map_err(|e| zstd_error(&e))?;
        decoder
            .decode_blocks(&mut input, ruzstd::decoding::BlockDecodingStrategy::All)
            .map_err(|e| zstd_error(&e))?;
        if !decoder.is_finished() || !input.is_empty() {
            return Err(zstd_error(&"truncated or trailing data"));
        }
        decoder.collect().ok_or_else(|| zstd_error(&"no output"))
    }
}

/// Unpacks a single file.
pub fn unpack(plain: Vec<u8>, what: &'static str) -> Result<Vec<u8>, NativeError> {
    Unpacker::default().unpack(plain, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_opens_and_tampering_is_detected() -> Result<(), NativeError> {
        let key = MasterKey::from_parts([7; 32], [3; 16], [9; 16]);
        let sealed = key.encrypt_with_iv([1; 16], b"{\"hello\":1}");
        assert_eq!(key.decrypt(&sealed)?, b"{\"hello\":1}");
        let mut bad = sealed.clone();
        bad[20] ^= 1;
        assert!(matches!(
            key.decrypt(&bad),
            Err(NativeError::Authentication { .. })
        ));
        let other = MasterKey::from_parts([7; 32], [3; 16], [8; 16]);
        assert!(other.decrypt(&sealed).is_err());
        Ok(())
    }

    #[test]
    fn unpack_reads_plain_and_refuses_unknown() {
        assert!(unpack(b"{}".to_vec(), "x").is_ok());
        assert!(unpack(vec![9, 1, 2], "x").is_err());
    }
}
