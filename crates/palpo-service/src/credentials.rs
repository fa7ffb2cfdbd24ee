//! Secrets: password hashing (argon2), access tokens and ids (random, stored only as hashes).

use std::sync::LazyLock;

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version,
    password_hash::{SaltString, rand_core::OsRng},
};
use base64::Engine;
use palpo_core::{Error, Result};
use rand::{Rng, distributions::Alphanumeric};
use sha2::{Digest, Sha256};

/// argon2id with 7 MiB of memory and 5 passes: one of OWASP's equivalent recommended settings,
/// chosen over the crate's default (19 MiB, 2 passes) because every hash in flight holds its
/// memory. Stored hashes carry their parameters, so hashes made with other settings still verify.
fn hasher() -> Result<Argon2<'static>> {
    let params = Params::new(7 * 1024, 5, 1, None).map_err(Error::internal)?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes and verifications running at once, at most one per core: more would not finish
/// sooner, and each holds the hash's memory (a burst of registrations or logins otherwise
/// multiplies the server's peak memory).
static HASHING: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    tokio::sync::Semaphore::new(cores)
});

/// Hashes a password with argon2id. Runs on the blocking pool: it costs tens of milliseconds.
pub async fn hash_password(password: String) -> Result<String> {
    let _permit = HASHING.acquire().await.map_err(Error::internal)?;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        hasher()?
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(Error::internal)
    })
    .await
    .map_err(Error::internal)?
}

/// Checks a password against a stored argon2 hash. A malformed hash never matches.
pub async fn verify_password(password: String, hash: String) -> Result<bool> {
    let _permit = HASHING.acquire().await.map_err(Error::internal)?;
    tokio::task::spawn_blocking(move || {
        let Ok(parsed) = PasswordHash::new(&hash) else {
            tracing::error!("stored password hash is malformed");
            return false;
        };
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
    .await
    .map_err(Error::internal)
}

/// A new access token: 32 random bytes, url-safe base64, with a recognisable prefix.
pub fn new_access_token() -> String {
    let bytes: [u8; 32] = rand::thread_rng().r#gen();
    format!(
        "palpo_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// What is stored for a token: its SHA-256, hex. Tokens carry 256 bits of entropy, so a fast
/// hash is enough; a slow one would cost every request.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// A random string of `len` ASCII letters and digits.
pub fn random_string(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// A new device id: ten upper-case letters, as Synapse makes them.
pub fn new_device_id() -> String {
    let mut rng = rand::thread_rng();
    (0..10)
        .map(|_| char::from(b'A' + rng.gen_range(0..26)))
        .collect()
}

/// Checks, with a read of its own, that the access token of `check` still belongs to its
/// device: 401 `M_UNKNOWN_TOKEN` if not.
pub(crate) async fn check_token(
    storage: &palpo_storage::Storage,
    check: &palpo_storage::model::TokenCheck,
) -> Result<()> {
    let owner = storage
        .devices
        .find_token(&check.token_hash)
        .await
        .map_err(crate::internal)?;
    match owner {
        Some(o) if o.user_id == check.user_id && o.device_id == check.device_id => Ok(()),
        _ => Err(Error::unknown_token()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_verify_only_against_their_hash() {
        let hash = hash_password("correct horse".into()).await.expect("hash");
        assert!(hash.starts_with("$argon2id$v=19$m=7168,t=5,p=1$"), "{hash}");
        assert!(
            verify_password("correct horse".into(), hash.clone())
                .await
                .expect("verify")
        );
        assert!(!verify_password("wrong".into(), hash).await.expect("verify"));
        assert!(
            !verify_password("x".into(), "not a hash".into())
                .await
                .expect("verify")
        );
    }

    #[tokio::test]
    async fn hashes_made_with_other_parameters_still_verify() {
        // The argon2 crate's defaults (m=19456, t=2), as earlier versions stored them.
        let salt = SaltString::generate(&mut OsRng);
        let old = Argon2::default()
            .hash_password(b"pw", &salt)
            .expect("hash")
            .to_string();
        assert!(old.contains("m=19456,t=2"));
        assert!(
            verify_password("pw".into(), old.clone())
                .await
                .expect("verify")
        );
        assert!(!verify_password("no".into(), old).await.expect("verify"));
    }

    #[test]
    fn tokens_are_unique_and_hashed_to_hex() {
        let a = new_access_token();
        assert_ne!(a, new_access_token());
        let hash = token_hash(&a);
        assert_eq!(hash.len(), 64);
        assert!(!hash.contains(&a));
        assert_eq!(hash, token_hash(&a));
        assert_eq!(new_device_id().len(), 10);
    }
}
