//! supernode: the mesh coordinator. Not built yet: the piece mesh is its own
//! issue; until then this only says so.

use clap::Parser;

/// Coordinates the damselfly mesh (not implemented yet).
#[derive(Parser)]
#[command(version)]
struct Args {}

fn main() -> std::process::ExitCode {
    Args::parse();
    eprintln!(
        "supernode: the piece mesh is not implemented yet; dfdaemon works as a plain local content store"
    );
    std::process::ExitCode::FAILURE
}
