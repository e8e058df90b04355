//! The status-code contract between the supernode and its callers: each
//! meaning a failed call can have, and the gRPC code that carries it. Both
//! sides go through [`Refusal`], so a new error cannot silently come to
//! mean something else (say, "register again") on the other end.

use tonic::{Code, Status};

/// What a failed supernode call tells the caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request is malformed or contradicts the task: do not retry it.
    Invalid,
    /// The supernode does not know the caller (it restarted, or the host
    /// expired): register again, then retry once.
    RegisterAgain,
    /// The supernode has no task for the blob: the next supernode never had
    /// it either, so give up on the mesh for this blob.
    TaskLost,
    /// The supernode could not be reached or did not answer in time: mark it
    /// down and try the next one.
    Unreachable,
    /// Any other failure: try the next supernode.
    Failed,
}

impl Refusal {
    /// Every meaning, for tests that check the contract both ways.
    pub const ALL: [Refusal; 5] = [
        Refusal::Invalid,
        Refusal::RegisterAgain,
        Refusal::TaskLost,
        Refusal::Unreachable,
        Refusal::Failed,
    ];

    /// The gRPC code the supernode answers with.
    pub fn code(self) -> Code {
        match self {
            Refusal::Invalid => Code::InvalidArgument,
            Refusal::RegisterAgain => Code::FailedPrecondition,
            Refusal::TaskLost => Code::NotFound,
            Refusal::Unreachable => Code::Unavailable,
            Refusal::Failed => Code::Internal,
        }
    }

    /// The status the supernode answers with.
    pub fn status(self, message: impl Into<String>) -> Status {
        Status::new(self.code(), message)
    }

    /// What a status the caller received means. Transport failures
    /// (deadline, cancellation) count as unreachable.
    pub fn of(status: &Status) -> Refusal {
        match status.code() {
            Code::InvalidArgument => Refusal::Invalid,
            Code::FailedPrecondition => Refusal::RegisterAgain,
            Code::NotFound => Refusal::TaskLost,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Refusal::Unreachable,
            _ => Refusal::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_meaning_survives_the_round_trip() {
        for refusal in Refusal::ALL {
            assert_eq!(Refusal::of(&refusal.status("x")), refusal, "{refusal:?}");
        }
    }

    #[test]
    fn codes_are_distinct() {
        let mut codes: Vec<i32> = Refusal::ALL.iter().map(|r| r.code() as i32).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), Refusal::ALL.len());
    }

    #[test]
    fn transport_failures_mean_unreachable() {
        for code in [Code::DeadlineExceeded, Code::Cancelled] {
            assert_eq!(Refusal::of(&Status::new(code, "")), Refusal::Unreachable);
        }
        assert_eq!(Refusal::of(&Status::unknown("")), Refusal::Failed);
    }
}
