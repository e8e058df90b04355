//! Registry authentication: credentials from a Docker-style `config.json`,
//! the challenge of a 401's `WWW-Authenticate` (parsed by `http-auth`), and
//! the `Authorization` that answers it: Basic with the credentials, or a
//! bearer token from the challenge's token service (anonymous, with the
//! credentials, or with an identity token as an OAuth2 refresh token).

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::header::{HeaderMap, HeaderValue, InvalidHeaderValue, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};
use serde::Deserialize;

use super::RegistryError;
use super::names::Repository;
use super::transport::transport_error;

/// How long a token service may take to answer.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A token's lifetime when the service does not say (the token spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// Tokens are renewed this long before they expire.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

/// The credentials of a `config.json`, by registry host.
#[derive(Default)]
pub struct Credentials {
    by_host: HashMap<String, Credential>,
}

/// A login for one registry.
#[derive(Clone)]
pub struct Credential {
    username: String,
    password: String,
    /// An OAuth2 refresh token (`identitytoken`), used instead of the password
    /// with token services.
    identity_token: Option<String>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({:?}, <redacted>)", self.username)
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

impl Credentials {
    /// Reads the `config.json` at `path`.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let context = |why: String| RegistryError::Config(format!("{}: {why}", path.display()));
        let text = fs::read_to_string(path).map_err(|e| context(e.to_string()))?;
        Self::parse(&text).map_err(context)
    }

    /// Parses a Docker `config.json`: `auths.<host>` with `auth`
    /// (base64 `user:password`) or `username` and `password`, and optionally
    /// `identitytoken`. Entries without any (kept in a credential helper) are
    /// skipped.
    pub fn parse(json: &str) -> Result<Self, String> {
        let config: DockerConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let mut by_host = HashMap::new();
        for (key, entry) in config.auths {
            let credential = entry
                .credential()
                .map_err(|why| format!("auths.{key:?}: {why}"))?;
            if let Some(credential) = credential {
                by_host.insert(normalize_host(&key), credential);
            }
        }
        Ok(Self { by_host })
    }

    /// The login for `host` (`name[:port]` of an endpoint), if any.
    pub fn for_host(&self, host: &str) -> Option<&Credential> {
        self.by_host.get(&normalize_host(host))
    }
}

impl AuthEntry {
    fn credential(self) -> Result<Option<Credential>, String> {
        let (username, password) = match self.auth.filter(|a| !a.is_empty()) {
            Some(auth) => {
                let decoded = BASE64
                    .decode(auth.trim())
                    .map_err(|e| format!("auth is not base64: {e}"))?;
                let decoded =
                    String::from_utf8(decoded).map_err(|_| "auth is not UTF-8".to_owned())?;
                let (user, password) =
                    decoded.split_once(':').ok_or("auth is not user:password")?;
                (user.to_owned(), password.to_owned())
            }
            None => (
                self.username.unwrap_or_default(),
                self.password.unwrap_or_default(),
            ),
        };
        let identity_token = self.identitytoken.filter(|t| !t.is_empty());
        if username.is_empty() && identity_token.is_none() {
            return Ok(None);
        }
        Ok(Some(Credential {
            username,
            password,
            identity_token,
        }))
    }
}

/// A config.json key as a bare `name[:port]`: keys may be URLs
/// (`https://index.docker.io/v1/`), and Docker Hub goes by several names.
fn normalize_host(key: &str) -> String {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or_default();
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        other => other.to_ascii_lowercase(),
    }
}

/// What a registry asks for in `WWW-Authenticate`.
#[derive(Debug, PartialEq)]
pub enum Challenge {
    Basic,
    Bearer { realm: Url, service: Option<String> },
}

impl Challenge {
    /// The challenge of a 401: Bearer if offered (it works without
    /// credentials), else Basic; None if there is neither.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, String> {
        let mut basic = false;
        for value in headers.get_all(WWW_AUTHENTICATE) {
            let value = value
                .to_str()
                .map_err(|e| format!("WWW-Authenticate: {e}"))?;
            let challenges = http_auth::parse_challenges(value)
                .map_err(|e| format!("WWW-Authenticate {value:?}: {e}"))?;
            for challenge in challenges {
                if challenge.scheme.eq_ignore_ascii_case("bearer") {
                    return bearer(&challenge).map(Some);
                }
                basic |= challenge.scheme.eq_ignore_ascii_case("basic");
            }
        }
        Ok(basic.then_some(Self::Basic))
    }
}

fn bearer(challenge: &http_auth::ChallengeRef<'_>) -> Result<Challenge, String> {
    let param = |name: &str| {
        challenge
            .params
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.to_unescaped())
    };
    let realm = param("realm").ok_or("Bearer challenge without a realm")?;
    let realm = Url::parse(&realm).map_err(|e| format!("Bearer realm {realm:?}: {e}"))?;
    if !matches!(realm.scheme(), "http" | "https") {
        return Err(format!("Bearer realm {realm}: not http(s)"));
    }
    Ok(Challenge::Bearer {
        realm,
        service: param("service"),
    })
}

/// An `Authorization` header value and until when it may be used.
#[derive(Clone)]
pub struct Authorization {
    pub header: HeaderValue,
    expires: Option<Instant>,
}

impl Authorization {
    pub fn is_fresh(&self) -> bool {
        self.expires.is_none_or(|at| Instant::now() < at)
    }

    fn new(value: &str, expires: Option<Instant>) -> Result<Self, InvalidHeaderValue> {
        let mut header = HeaderValue::from_str(value)?;
        header.set_sensitive(true);
        Ok(Self { header, expires })
    }

    fn basic(credential: &Credential) -> Self {
        let pair = format!("{}:{}", credential.username, credential.password);
        Self::new(&format!("Basic {}", BASE64.encode(pair)), None)
            .expect("base64 is a valid header value")
    }
}

/// Answers `challenge` for pulling `repository`; None when it cannot be
/// answered (Basic without credentials).
pub async fn authorize(
    http: &reqwest::Client,
    challenge: &Challenge,
    repository: &Repository,
    credential: Option<&Credential>,
) -> Result<Option<Authorization>, RegistryError> {
    match challenge {
        Challenge::Basic => Ok(credential.map(Authorization::basic)),
        Challenge::Bearer { realm, service } => {
            let scope = format!("repository:{repository}:pull");
            fetch_token(http, realm, service.as_deref(), &scope, credential)
                .await
                .map(Some)
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// Gets a bearer token from the token service at `realm`: with an identity
/// token by the OAuth2 POST, else by GET, with Basic credentials if any.
async fn fetch_token(
    http: &reqwest::Client,
    realm: &Url,
    service: Option<&str>,
    scope: &str,
    credential: Option<&Credential>,
) -> Result<Authorization, RegistryError> {
    let request = match credential {
        Some(Credential {
            identity_token: Some(refresh_token),
            ..
        }) => {
            let mut form = vec![
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
                ("client_id", "damselfly"),
                ("scope", scope),
            ];
            form.extend(service.map(|s| ("service", s)));
            http.post(realm.clone()).form(&form)
        }
        _ => {
            let mut url = realm.clone();
            url.query_pairs_mut().append_pair("scope", scope);
            if let Some(service) = service {
                url.query_pairs_mut().append_pair("service", service);
            }
            let request = http.get(url);
            match credential {
                Some(c) => request.basic_auth(&c.username, Some(&c.password)),
                None => request,
            }
        }
    };
    let endpoint = format!("token service {realm}");
    let invalid = |reason: String| RegistryError::Protocol {
        endpoint: endpoint.clone(),
        reason,
    };
    let response = request
        .timeout(TOKEN_TIMEOUT)
        .send()
        .await
        .map_err(|e| transport_error(&endpoint, e))?;
    let status = response.status();
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        return Err(RegistryError::Unauthorized {
            endpoint,
            status: status.as_u16(),
        });
    }
    if !status.is_success() {
        return Err(RegistryError::Status {
            endpoint,
            status: status.as_u16(),
        });
    }
    let body: TokenResponse = response
        .json()
        .await
        .map_err(|e| invalid(format!("unreadable answer: {e}")))?;
    let token = body
        .token
        .or(body.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| invalid("answer without a token".to_owned()))?;
    let lifetime = body
        .expires_in
        .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs)
        .saturating_sub(EXPIRY_MARGIN);
    Authorization::new(&format!("Bearer {token}"), Some(Instant::now() + lifetime))
        .map_err(|_| invalid("token is not a valid header value".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credential(json: &str, host: &str) -> Option<(String, String, Option<String>)> {
        let credentials = Credentials::parse(json).unwrap();
        credentials.for_host(host).map(|c| {
            (
                c.username.clone(),
                c.password.clone(),
                c.identity_token.clone(),
            )
        })
    }

    #[test]
    fn reads_auth_username_password_and_identity_token() {
        let json = r#"{
            "auths": {
                "127.0.0.1:5000": {"auth": "dXNlcjpwYTpzcw=="},
                "https://index.docker.io/v1/": {"username": "hub", "password": "secret"},
                "Quay.io": {"auth": "", "identitytoken": "refresh"},
                "helper.example": {}
            },
            "credsStore": "desktop"
        }"#;
        let owned = |u: &str, p: &str, t: Option<&str>| {
            Some((u.to_owned(), p.to_owned(), t.map(str::to_owned)))
        };
        assert_eq!(
            credential(json, "127.0.0.1:5000"),
            owned("user", "pa:ss", None)
        );
        assert_eq!(
            credential(json, "registry-1.docker.io"),
            owned("hub", "secret", None)
        );
        assert_eq!(credential(json, "docker.io"), owned("hub", "secret", None));
        assert_eq!(credential(json, "quay.io"), owned("", "", Some("refresh")));
        assert_eq!(credential(json, "helper.example"), None);
        assert_eq!(credential(json, "127.0.0.1:5001"), None);
    }

    #[test]
    fn rejects_malformed_config_json() {
        for (json, expected) in [
            ("not json", "expected"),
            (
                r#"{"auths": {"h": {"auth": "!!!"}}}"#,
                "auths.\"h\": auth is not base64",
            ),
            (
                r#"{"auths": {"h": {"auth": "bm9jb2xvbg=="}}}"#,
                "not user:password",
            ),
            (r#"{"auths": []}"#, "invalid type"),
        ] {
            let error = Credentials::parse(json).err().expect("rejected");
            assert!(
                error.contains(expected),
                "{json}: {error:?} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let credentials =
            Credentials::parse(r#"{"auths": {"h": {"auth": "dTpzZWNyZXQ="}}}"#).unwrap();
        let shown = format!("{:?}", credentials.for_host("h").unwrap());
        assert!(!shown.contains("secret"), "{shown}");
    }

    fn challenge(values: &[&str]) -> Result<Option<Challenge>, String> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(WWW_AUTHENTICATE, HeaderValue::from_str(value).unwrap());
        }
        Challenge::from_headers(&headers)
    }

    #[test]
    fn parses_challenges() {
        assert_eq!(
            challenge(&[
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a:pull""#
            ]),
            Ok(Some(Challenge::Bearer {
                realm: Url::parse("https://auth.example/token").unwrap(),
                service: Some("registry.example".to_owned()),
            }))
        );
        assert_eq!(
            challenge(&[r#"Basic realm="Registry Realm""#]),
            Ok(Some(Challenge::Basic))
        );
        assert!(matches!(
            challenge(&[r#"Basic realm="r""#, r#"Bearer realm="http://t/""#]),
            Ok(Some(Challenge::Bearer { .. }))
        ));
        assert_eq!(challenge(&[]), Ok(None));
        assert_eq!(challenge(&[r#"Digest realm="r""#]), Ok(None));
        for bad in [
            r#"Bearer service="s""#,
            r#"Bearer realm="file:///etc/passwd""#,
            "Basic realm=\"unterminated",
        ] {
            assert!(challenge(&[bad]).is_err(), "accepted {bad:?}");
        }
    }
}
