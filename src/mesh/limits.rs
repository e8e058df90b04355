//! The process's file-descriptor budget: raises the soft `RLIMIT_NOFILE` to
//! the hard one, and says how many piece-server connections fit in it while
//! leaving a reserve for the content store, the snapshotter and the mesh's
//! own outgoing connections.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors kept for everything but the piece server's connections.
pub const FD_RESERVE: u64 = 256;
/// Most piece-server connections, however many descriptors there are.
pub const MAX_CONNECTIONS: usize = 4096;
/// Fewest piece-server connections, even with a tiny limit.
const MIN_CONNECTIONS: usize = 8;

/// Raises the soft limit on open files to the hard limit; returns the soft
/// limit now in force.
pub fn raise_nofile() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => return hard,
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit"),
        }
    }
    soft
}

/// The soft limit on open files now in force.
pub fn nofile() -> u64 {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// Piece-server connections that fit in `nofile` descriptors: each may hold
/// a socket and an open blob, after [`FD_RESERVE`].
pub fn connection_budget(nofile: u64) -> usize {
    let budget = nofile.saturating_sub(FD_RESERVE) / 2;
    (budget as usize).clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_leaves_the_reserve_and_is_capped() {
        assert_eq!(connection_budget(512), 128);
        assert_eq!(connection_budget(100), MIN_CONNECTIONS);
        assert_eq!(connection_budget(1 << 20), MAX_CONNECTIONS);
    }
}
