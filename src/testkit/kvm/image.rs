//! The memory image (the snapshot memory file's content) and the host-side models of what the
//! guest computes: the data pattern, the checksum fold, the written words, the random page
//! sequence and the expected checksums.

use std::io::{self, Write};

use super::guest;
use super::{
    CODE_GPA, CODE_LEN, DATA_START, GDT_GPA, MAX_MEM_SIZE, MIN_MEM_SIZE, PAGE_SIZE, PD_GPA,
    PDPT_GPA, PML4_GPA, SYSTEM_AREA_LEN,
};

/// The checksum's start value (the FNV-1a offset basis), set by every read operation.
pub const FOLD_INIT: u64 = 0xcbf2_9ce4_8422_2325;
/// The odd multiplier of [`fold`] and [`write_word`] (2^64 / golden ratio).
pub const FOLD_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

/// Folds one 8-byte word into a checksum: `(acc ^ word) * FOLD_MUL` (wrapping).
///
/// The guest does the same (`xor rax, [rdi]; imul rax, r8`). For a fixed `word` this is a
/// bijection of `acc` (the multiplier is odd), so two word sequences that differ in exactly one
/// word always give different checksums.
pub fn fold(acc: u64, word: u64) -> u64 {
    (acc ^ word).wrapping_mul(FOLD_MUL)
}

/// The image's word at guest physical address `gpa` of the data area: a cheap hash of the
/// address (the splitmix64 finalizer), never zero. `gpa` is the word's own address (8-aligned).
pub fn pattern_word(gpa: u64) -> u64 {
    let mut z = gpa ^ 0x5eed_0f5a_fefa_0017;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// The word that `GuestOp::Write` stores at `gpa` with `seed`: `((gpa ^ seed) * FOLD_MUL) | 1`,
/// never zero.
pub fn write_word(gpa: u64, seed: u64) -> u64 {
    (gpa ^ seed).wrapping_mul(FOLD_MUL) | 1
}

/// What a 4 KiB page holds, in the host's model of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageContent {
    /// The image's data pattern ([`pattern_word`]); only meaningful from [`DATA_START`] on.
    Image,
    /// All zeros (a page discarded by `ReportFree`, or never-written anonymous memory).
    Zero,
    /// Written by `GuestOp::Write` with this seed ([`write_word`]).
    Written(u64),
}

impl PageContent {
    /// The word at `gpa` (8-aligned) of a page with this content.
    pub fn word(self, gpa: u64) -> u64 {
        match self {
            PageContent::Image => pattern_word(gpa),
            PageContent::Zero => 0,
            PageContent::Written(seed) => write_word(gpa, seed),
        }
    }
}

/// Folds one 4 KiB page at `page_gpa` with content `content` into `acc`, like the guest does.
pub fn fold_page(mut acc: u64, page_gpa: u64, content: PageContent) -> u64 {
    for gpa in (page_gpa..page_gpa + PAGE_SIZE).step_by(8) {
        acc = fold(acc, content.word(gpa));
    }
    acc
}

/// The checksum a read operation returns when it visits `pages` (page gpas, in order) and
/// `content(gpa)` tells what each page holds.
pub fn expected_sum(
    pages: impl IntoIterator<Item = u64>,
    content: impl Fn(u64) -> PageContent,
) -> u64 {
    pages
        .into_iter()
        .fold(FOLD_INIT, |acc, gpa| fold_page(acc, gpa, content(gpa)))
}

/// The pages that `ReadSum`/`Write` visit: `pages` pages from `first_gpa`, `stride_pages` apart.
pub fn strided_pages(first_gpa: u64, pages: u64, stride_pages: u64) -> impl Iterator<Item = u64> {
    (0..pages).map(move |i| first_gpa + i * stride_pages * PAGE_SIZE)
}

/// The guest's initial xorshift64 state for `seed` (computed by the host, passed in `r10`).
pub(crate) fn random_state(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// The pages that `ReadRandom { first_gpa, range_pages, count, seed }` visits, in order:
/// xorshift64 (13, 7, 17) steps, page index = state % `range_pages`.
pub fn random_pages(first_gpa: u64, range_pages: u64, count: u64, seed: u64) -> Vec<u64> {
    let mut x = random_state(seed);
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            first_gpa + (x % range_pages.max(1)) * PAGE_SIZE
        })
        .collect()
}

/// Page-table entry bits: present, writable, user.
const PTE_PWU: u64 = 0x7;
/// Accessed and dirty, preset so that the CPU never writes the tables.
const PTE_AD: u64 = 0x60;
/// Page size (a 2 MiB page in a page directory).
const PTE_PS: u64 = 0x80;
const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;

/// The GDT: null, kernel code64 (0x08), kernel data (0x10), user data (0x18), user code64
/// (0x20). Only the segment caches set by `KVM_SET_SREGS` are used; the table is there so that
/// the selectors are genuine.
const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x00cf_f300_0000_ffff,
    0x00af_fb00_0000_ffff,
];

/// Checks that `mem_size` is one that the image and the VM support.
pub(crate) fn check_mem_size(mem_size: u64) -> Result<(), &'static str> {
    if mem_size % TWO_MIB != 0 {
        Err("not a multiple of 2 MiB")
    } else if mem_size < MIN_MEM_SIZE {
        Err("smaller than MIN_MEM_SIZE")
    } else if mem_size > MAX_MEM_SIZE {
        Err("larger than MAX_MEM_SIZE")
    } else {
        Ok(())
    }
}

fn put(buf: &mut [u8], off: u64, v: u64) {
    let off = off as usize;
    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The system area (the first [`SYSTEM_AREA_LEN`] bytes) of a `mem_size` image: GDT, zeroed
/// mailbox, code, and identity-mapping page tables (2 MiB pages, user-accessible) covering
/// exactly `[0, mem_size)`.
fn system_area(mem_size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; SYSTEM_AREA_LEN as usize];
    for (i, d) in GDT.iter().enumerate() {
        put(&mut buf, GDT_GPA + 8 * i as u64, *d);
    }
    let (code, _) = guest::program();
    debug_assert!(code.len() as u64 <= CODE_LEN);
    let at = CODE_GPA as usize;
    buf[at..at + code.len()].copy_from_slice(&code);
    put(&mut buf, PML4_GPA, PDPT_GPA | PTE_PWU | PTE_AD);
    let gibs = mem_size.div_ceil(ONE_GIB);
    for g in 0..gibs {
        let pd = PD_GPA + g * PAGE_SIZE;
        put(&mut buf, PDPT_GPA + 8 * g, pd | PTE_PWU | PTE_AD);
        for e in 0..512 {
            let gpa = g * ONE_GIB + e * TWO_MIB;
            if gpa < mem_size {
                put(&mut buf, pd + 8 * e, gpa | PTE_PWU | PTE_AD | PTE_PS);
            }
        }
    }
    buf
}

/// Writes the `mem_size`-byte memory image to `out`: the system area (GDT, balloon mailbox,
/// guest code, page tables, list scratch area), then the data area from [`DATA_START`] filled
/// with [`pattern_word`]. Writes in 1 MiB chunks; `mem_size` must be a multiple of 2 MiB
/// between [`MIN_MEM_SIZE`] and [`MAX_MEM_SIZE`] (else `InvalidInput`).
pub fn write_image(out: &mut impl Write, mem_size: u64) -> io::Result<()> {
    check_mem_size(mem_size).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    out.write_all(&system_area(mem_size))?;
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut gpa = DATA_START;
    while gpa < mem_size {
        for (i, w) in buf.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&pattern_word(gpa + 8 * i as u64).to_le_bytes());
        }
        out.write_all(&buf)?;
        gpa += CHUNK;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_has_the_right_size_and_pattern() {
        let size = MIN_MEM_SIZE;
        let mut img = Vec::new();
        write_image(&mut img, size).unwrap();
        assert_eq!(img.len() as u64, size);
        for gpa in [DATA_START, DATA_START + 8, size - 8, DATA_START + 12345 * 8] {
            let w = u64::from_le_bytes(img[gpa as usize..gpa as usize + 8].try_into().unwrap());
            assert_eq!(w, pattern_word(gpa));
        }
        let pd0 = u64::from_le_bytes(
            img[PD_GPA as usize..PD_GPA as usize + 8]
                .try_into()
                .unwrap(),
        );
        assert_eq!(pd0, 0xe7);
        assert!(write_image(&mut Vec::new(), size + 4096).is_err());
        assert!(write_image(&mut Vec::new(), 2 << 20).is_err());
    }

    #[test]
    fn models_are_deterministic() {
        assert!((0..100_000u64).all(|i| pattern_word(i * 8) != 0));
        assert_ne!(pattern_word(DATA_START), write_word(DATA_START, 0));
        let a = random_pages(DATA_START, 100, 50, 7);
        assert_eq!(a, random_pages(DATA_START, 100, 50, 7));
        assert_ne!(a, random_pages(DATA_START, 100, 50, 8));
        assert!(
            a.iter()
                .all(|&g| (DATA_START..DATA_START + 100 * PAGE_SIZE).contains(&g))
        );
        let s = expected_sum([DATA_START], |_| PageContent::Zero);
        assert_ne!(s, expected_sum([DATA_START], |_| PageContent::Image));
    }
}
