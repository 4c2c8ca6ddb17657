//! Secrets the relay issues or checks: enterprise API keys, carrier tokens, the
//! operator's admin token. Only SHA-256 hashes of keys and tokens are stored;
//! a presented secret is hashed and looked up, so no stored secret is ever
//! compared in variable time. This module never logs a secret.

use sha2::{Digest, Sha256};

/// A fresh API key: 256 random bits, hex, with a recognisable prefix.
pub fn new_api_key() -> Result<String, getrandom::Error> {
    Ok(format!("ck_{}", random_hex(32)?))
}

/// A short random id part (`bytes` random bytes, hex).
pub fn random_hex(bytes: usize) -> Result<String, getrandom::Error> {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer)?;
    Ok(hex::encode(buffer))
}

/// The stored form of a secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A time-ordered unique id (UUIDv7) with a prefix naming what it identifies.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}
