//! The one rule for tests that need root (containerd, mounts, network
//! namespaces, chown and device nodes): as any other user they are skipped,
//! with a line that says so; where `DAMSELFLY_REQUIRE_ROOT_TESTS=1` (set by
//! `.ci/run`, which runs as root) a skip is a failure instead, so CI cannot
//! pass with root-only tests silently left out. Unit tests use
//! [`crate::require_root!`], the integration tests the same macro through
//! `tests/common`.

use std::io::Write as _;

/// Set to `1` to make a root-only test fail instead of skipping.
pub const REQUIRE_ROOT_TESTS: &str = "DAMSELFLY_REQUIRE_ROOT_TESTS";

/// Whether the test at `place` may run: true as root; otherwise prints
/// `skipped: needs root (...)` and returns false, or panics if
/// [`REQUIRE_ROOT_TESTS`] is `1`.
pub fn root_or_skip(place: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var(REQUIRE_ROOT_TESTS).as_deref() != Ok("1"),
        "{place}: needs root (containerd, mounts, netns, chown) and {REQUIRE_ROOT_TESTS}=1 forbids skipping it"
    );
    // Straight to stderr, past the test harness's capture of `eprintln!`,
    // so the skip shows in the output of a passing run.
    let _ = writeln!(
        std::io::stderr(),
        "skipped: needs root (containerd, mounts, netns, chown): {place}"
    );
    false
}

/// Returns from the calling test unless it runs as root (see
/// [`root_or_skip`]).
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::needs_root::root_or_skip(concat!(file!(), ":", line!())) {
            return;
        }
    };
}
