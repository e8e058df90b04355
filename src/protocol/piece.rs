//! Pieces: the fixed-size ranges a blob is cut into for the mesh.

/// Default piece size. 1 MiB rather than 4: a piece is forwarded only once
/// it is whole and verified, so each hop of the rollout trails the one before
/// by about a piece's transfer time on a shared uplink; with 4 MiB the
/// slowest of 8 nodes took 1.45-1.53x the one-copy time, with 1 MiB
/// 1.25-1.28x (bench/RESULTS.md).
pub const DEFAULT_PIECE_SIZE: u64 = 1 << 20;
/// Most pieces a blob is cut into; larger blobs get larger pieces.
pub const MAX_PIECES: u64 = 1024;

/// The piece size for a blob of `size` bytes: 1 MiB, doubled until the blob
/// has at most [`MAX_PIECES`] pieces. Every node computes the same value.
pub fn piece_size(size: u64) -> u64 {
    let mut piece = DEFAULT_PIECE_SIZE;
    while size.div_ceil(piece) > MAX_PIECES {
        piece *= 2;
    }
    piece
}

/// How many pieces a blob of `size` bytes has with pieces of `piece_size`.
pub fn piece_count(size: u64, piece_size: u64) -> u32 {
    size.div_ceil(piece_size) as u32
}

/// Byte range `[start, end)` of piece `number`.
pub fn piece_range(number: u32, size: u64, piece_size: u64) -> (u64, u64) {
    let start = u64::from(number) * piece_size;
    (start.min(size), (start + piece_size).min(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_blobs_use_the_default_and_large_ones_cap_the_count() {
        assert_eq!(piece_size(1), DEFAULT_PIECE_SIZE);
        let largest_at_default = MAX_PIECES * DEFAULT_PIECE_SIZE;
        assert_eq!(piece_size(largest_at_default), DEFAULT_PIECE_SIZE);
        assert_eq!(piece_size(largest_at_default + 1), 2 * DEFAULT_PIECE_SIZE);
        assert!(piece_count(100 << 30, piece_size(100 << 30)) as u64 <= MAX_PIECES);
    }

    #[test]
    fn ranges_cover_the_blob_exactly() {
        let size = 10 * DEFAULT_PIECE_SIZE + 12345;
        let piece = piece_size(size);
        let count = piece_count(size, piece);
        assert_eq!(count, 11);
        assert_eq!(piece_range(0, size, piece), (0, piece));
        assert_eq!(piece_range(count - 1, size, piece), (10 * piece, size));
        assert_eq!(piece_count(0, piece), 0);
    }
}
