//! Identity: password hashing (Argon2id), signed access tokens (HS256 JWTs with
//! expiry), the caller's [`Principal`], and the failed-login limiter.
//!
//! The rules of who may write what live in the domain modules, which take a
//! `&Principal`; this module only says who the caller is.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use argon2::{
    Argon2,
    password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash},
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Role {
        if s == "admin" {
            Role::Admin
        } else {
            Role::User
        }
    }
}

/// Who is calling: a verified token's subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: i64,
    pub role: Role,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Allows the action when the caller is `owner` or an administrator.
    pub fn ensure_self_or_admin(&self, owner: i64, what: &str) -> Result<()> {
        if self.user_id == owner || self.is_admin() {
            Ok(())
        } else {
            Err(Error::Forbidden(format!("You may only {what}")))
        }
    }

    pub fn ensure_admin(&self) -> Result<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Error::Forbidden("Admin role required".into()))
        }
    }

    /// The identity prism itself uses for seeding demo data.
    pub(crate) fn system() -> Principal {
        Principal {
            user_id: 0,
            role: Role::Admin,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The user id, as a string per RFC 7519.
    sub: String,
    role: Role,
    iat: i64,
    exp: i64,
}

/// Issues and verifies access tokens.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("TokenKeys").field("ttl", &self.ttl).finish()
    }
}

impl TokenKeys {
    /// Keys from a shared HMAC secret of at least 32 bytes.
    pub fn new(secret: &[u8], ttl: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(
            secret.len() >= 32,
            "a token signing secret must be at least 32 bytes"
        );
        Ok(TokenKeys {
            encoding: EncodingKey::from_secret(secret)?,
            decoding: DecodingKey::from_secret(secret)?,
            ttl,
        })
    }

    /// Uses the configured secret, or the one kept in `<data_dir>/jwt-secret`,
    /// generating it on first start so tokens survive restarts.
    pub fn load(configured: Option<&str>, data_dir: &Path, ttl: Duration) -> anyhow::Result<Self> {
        if let Some(secret) = configured {
            anyhow::ensure!(secret.len() >= 32, "jwt_secret must be at least 32 bytes");
            return Self::new(secret.as_bytes(), ttl);
        }
        let path = data_dir.join("jwt-secret");
        if let Ok(secret) = std::fs::read_to_string(&path) {
            let secret = secret.trim();
            anyhow::ensure!(secret.len() >= 32, "{} is too short", path.display());
            return Self::new(secret.as_bytes(), ttl);
        }
        std::fs::create_dir_all(data_dir)?;
        let secret = random_token(32);
        write_private(&path, &secret)
            .with_context(|| format!("cannot write {}", path.display()))?;
        tracing::info!(path = %path.display(), "generated a token signing secret");
        Self::new(secret.as_bytes(), ttl)
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn issue(&self, user_id: i64, role: Role) -> Result<String> {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: user_id.to_string(),
            role,
            iat: now,
            exp: now + self.ttl.as_secs() as i64,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(Error::internal)
    }

    pub fn verify(&self, token: &str) -> Result<Principal> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|_| Error::Unauthenticated("Could not validate credentials".into()))?;
        let user_id = data
            .claims
            .sub
            .parse()
            .map_err(|_| Error::Unauthenticated("Could not validate credentials".into()))?;
        Ok(Principal {
            user_id,
            role: data.claims.role,
        })
    }
}

/// Hashes a password with Argon2id and a random salt (PHC string). CPU-heavy:
/// call it from `spawn_blocking`.
pub fn hash_password(password: &str) -> Result<String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(Error::internal)
}

/// Checks a password against a stored PHC string. CPU-heavy, like hashing.
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash of a random password, checked when the user does not exist, so that
/// a login for an unknown name costs as much as one for a known name.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password(&random_token(16)).unwrap_or_default())
}

/// A random hex string of `bytes` bytes of entropy.
pub fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// Counts failed logins per (client address, username) in a sliding minute.
#[derive(Debug)]
pub struct LoginLimiter {
    max_failures: u32,
    window: Duration,
    failures: Mutex<HashMap<(IpAddr, String), Vec<Instant>>>,
}

impl LoginLimiter {
    pub fn new(max_failures: u32) -> Self {
        LoginLimiter {
            max_failures,
            window: Duration::from_secs(60),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Refuses the attempt when this client has used up its failures for this
    /// username; says how long to wait.
    pub fn check(&self, ip: IpAddr, username: &str) -> Result<()> {
        let now = Instant::now();
        let mut map = self.failures.lock();
        let key = (ip, username.to_lowercase());
        if let Some(times) = map.get_mut(&key) {
            times.retain(|t| now.duration_since(*t) < self.window);
            if times.len() >= self.max_failures as usize {
                let oldest = times[0];
                let wait = self.window.saturating_sub(now.duration_since(oldest));
                return Err(Error::RateLimited {
                    retry_after_secs: wait.as_secs().max(1),
                });
            }
        }
        Ok(())
    }

    pub fn record_failure(&self, ip: IpAddr, username: &str) {
        let now = Instant::now();
        let mut map = self.failures.lock();
        // Bound the memory an attacker can make us hold: forget stale entries
        // whenever the table grows large.
        if map.len() > 100_000 {
            map.retain(|_, times| {
                times
                    .last()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
        }
        map.entry((ip, username.to_lowercase()))
            .or_default()
            .push(now);
    }

    pub fn record_success(&self, ip: IpAddr, username: &str) {
        self.failures.lock().remove(&(ip, username.to_lowercase()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_round_trip() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn tokens_verify_and_reject_tampering() {
        let keys = TokenKeys::new(&[7u8; 32], Duration::from_secs(60)).unwrap();
        let t = keys.issue(42, Role::Admin).unwrap();
        let p = keys.verify(&t).unwrap();
        assert_eq!(p.user_id, 42);
        assert!(p.is_admin());
        let other = TokenKeys::new(&[8u8; 32], Duration::from_secs(60)).unwrap();
        assert!(matches!(other.verify(&t), Err(Error::Unauthenticated(_))));
        assert!(keys.verify("garbage").is_err());
        assert!(TokenKeys::new(&[7u8; 31], Duration::from_secs(60)).is_err());
    }

    #[test]
    fn limiter_blocks_after_max_failures() {
        let l = LoginLimiter::new(3);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..3 {
            l.check(ip, "alice").unwrap();
            l.record_failure(ip, "alice");
        }
        assert!(matches!(
            l.check(ip, "Alice"),
            Err(Error::RateLimited { .. })
        ));
        // Other usernames and other clients are unaffected.
        l.check(ip, "bob").unwrap();
        l.check("10.0.0.1".parse().unwrap(), "alice").unwrap();
    }
}
