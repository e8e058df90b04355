//! dfget, the command-line client: what an operator runs on a node to pull
//! through damselfly and see where the bytes came from.

pub mod pull;
pub mod stats;
