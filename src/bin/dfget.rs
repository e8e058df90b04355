//! dfget: fetches a blob through the mesh. Not built yet: the piece mesh is
//! its own issue; until then this only says so.

use clap::Parser;

/// Fetches a blob or URL through the damselfly mesh (not implemented yet).
#[derive(Parser)]
#[command(version)]
struct Args {}

fn main() -> std::process::ExitCode {
    Args::parse();
    eprintln!("dfget: the piece mesh is not implemented yet");
    std::process::ExitCode::FAILURE
}
