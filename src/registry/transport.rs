//! How a request that got no (complete) response becomes a
//! [`RegistryError`]: an untrusted certificate, a timeout, a refused
//! connection, or a broken exchange, told apart for the log.

use super::RegistryError;

/// The error of a request to `endpoint` that got no (complete) response.
pub fn transport_error(endpoint: &str, error: reqwest::Error) -> RegistryError {
    let endpoint = endpoint.to_owned();
    if let Some(tls) = rustls_error(&error) {
        RegistryError::Tls {
            endpoint,
            reason: tls.to_string(),
        }
    } else if error.is_timeout() {
        RegistryError::Timeout { endpoint }
    } else if error.is_connect() {
        RegistryError::Connect {
            endpoint,
            reason: chain(&error),
        }
    } else {
        RegistryError::Protocol {
            endpoint,
            reason: chain(&error),
        }
    }
}

/// The rustls error behind `error`, if any. hyper-rustls wraps it in an
/// io::Error inside another io::Error, and an io::Error's `source()` skips
/// the error it wraps, so io::Errors are descended into with `get_ref()`.
fn rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cause = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    None
}

/// An error and its causes, `: `-separated.
pub(super) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[test]
    fn finds_the_rustls_error_inside_nested_io_errors() {
        let untrusted =
            || rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let as_hyper_rustls_does =
            io::Error::other(io::Error::new(io::ErrorKind::InvalidData, untrusted()));
        assert_eq!(rustls_error(&as_hyper_rustls_does), Some(&untrusted()));
        let once = io::Error::new(io::ErrorKind::InvalidData, untrusted());
        assert_eq!(rustls_error(&once), Some(&untrusted()));
        assert_eq!(rustls_error(&io::Error::other("refused")), None);
    }
}
