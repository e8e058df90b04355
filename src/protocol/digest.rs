//! Validated content digests: the only way a digest from the wire reaches a path.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// What every digest string starts with.
const PREFIX: &str = "sha256:";
/// Length of a hex-encoded sha256 digest.
const SHA256_HEX_LEN: usize = 64;

/// A `sha256:<64 lowercase hex>` digest. Constructing one validates it, so its
/// hex part is always safe to use as a file name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// The whole `sha256:<hex>` string.
    text: String,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// Finishes a running sha256 into a digest.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self::from_sha256(hasher.finalize().into())
    }

    /// The digest whose raw sha256 is `raw`.
    pub fn from_sha256(raw: [u8; 32]) -> Self {
        Self {
            text: format!("{PREFIX}{}", hex::encode(raw)),
        }
    }

    /// The raw sha256.
    pub fn sha256(&self) -> [u8; 32] {
        let mut raw = [0; 32];
        hex::decode_to_slice(self.hex(), &mut raw).expect("validated hex");
        raw
    }

    /// The 64 hex characters, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.text[PREFIX.len()..]
    }

    /// The whole `sha256:<hex>` string.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// A string that is not a `sha256:<64 lowercase hex>` digest.
#[derive(Debug, thiserror::Error)]
#[error("invalid digest {text:?}: {why}")]
pub struct InvalidDigest {
    text: String,
    why: &'static str,
}

impl FromStr for Digest {
    type Err = InvalidDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why| InvalidDigest {
            text: s.to_owned(),
            why,
        };
        let (algorithm, hex) = s.split_once(':').ok_or_else(|| invalid("no algorithm"))?;
        if algorithm != "sha256" {
            return Err(invalid("unsupported algorithm (only sha256)"));
        }
        let well_formed = hex.len() == SHA256_HEX_LEN
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !well_formed {
            return Err(invalid("expected 64 lowercase hex characters"));
        }
        Ok(Self { text: s.to_owned() })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_sha256() {
        let d = Digest::of(b"hello");
        let parsed: Digest = d.to_string().parse().unwrap();
        assert_eq!(parsed, d);
        assert_eq!(
            d.hex(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }

    #[test]
    fn converts_to_and_from_raw_sha256() {
        let d = Digest::of(b"hello");
        assert_eq!(Digest::from_sha256(d.sha256()), d);
    }

    #[test]
    fn rejects_malformed_digests() {
        let good_hex = Digest::of(b"x").hex().to_owned();
        for bad in [
            String::new(),
            good_hex.clone(),
            format!("sha512:{good_hex}"),
            format!("sha256:{}", &good_hex[1..]),
            format!("sha256:{}", good_hex.to_uppercase()),
            format!("sha256:../{}", &good_hex[3..]),
            format!("sha256:{}\0", &good_hex[1..]),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "accepted {bad:?}");
        }
    }
}
