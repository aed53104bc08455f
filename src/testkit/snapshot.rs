//! Synthetic snapshot memory files and the byte patterns that fill them.
//!
//! Every 8-byte word of a snapshot file is a hash of its offset with the
//! low bit set, so no word of a snapshot page is zero: a page that reads as
//! zeros was served zeros, and a page from the wrong offset is caught.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// The word at `offset` (a multiple of 8) of a snapshot made with `seed`.
pub fn snapshot_word(seed: u64, offset: u64) -> u64 {
    mix(seed ^ offset.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// The word at `offset` of a page written by the test kit with `seed`.
pub fn written_word(seed: u64, offset: u64) -> u64 {
    mix(seed.wrapping_add(0x5851_f42d_4c95_7f2d) ^ offset) | 2
}

/// splitmix64's finalizer: a cheap, well-spread hash.
pub fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fills `out` with the snapshot bytes starting at file offset `offset`.
pub fn fill_snapshot(seed: u64, offset: u64, out: &mut [u8]) {
    fill(out, offset, |o| snapshot_word(seed, o));
}

/// Fills `out` with the written-page bytes starting at `offset`.
pub fn fill_written(seed: u64, offset: u64, out: &mut [u8]) {
    fill(out, offset, |o| written_word(seed, o));
}

fn fill(out: &mut [u8], offset: u64, word: impl Fn(u64) -> u64) {
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let w = word(offset + i as u64 * 8).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
}

/// Writes a snapshot memory file of `len` bytes at `path`. Ranges in
/// `holes` (offset, length) are left as holes that read as zeros, as the
/// unplugged parts of a hotplug region are.
pub fn write_memfile(
    path: &Path,
    len: u64,
    seed: u64,
    holes: &[(u64, u64)],
) -> std::io::Result<()> {
    let file = File::create(path)?;
    file.set_len(len)?;
    let mut out = BufWriter::with_capacity(1 << 20, &file);
    let mut chunk = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(chunk.len() as u64) as usize;
        let in_hole = holes.iter().any(|&(h, l)| offset >= h && offset < h + l);
        if in_hole {
            out.flush()?;
            std::io::Seek::seek(&mut out, std::io::SeekFrom::Start(offset + n as u64))?;
        } else {
            fill_snapshot(seed, offset, &mut chunk[..n]);
            out.write_all(&chunk[..n])?;
        }
        offset += n as u64;
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_words_are_never_zero_and_differ_from_written() {
        for o in (0..1 << 16).step_by(8) {
            assert_ne!(snapshot_word(7, o), 0);
            assert_ne!(snapshot_word(7, o), written_word(7, o));
        }
    }
}
