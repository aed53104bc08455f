//! Guest memory regions, as Firecracker describes them, and their pages.
//!
//! A region is a range of Firecracker's address space backed by a range of
//! the memory file. The layout checks what the handshake said before any
//! fault is served, and maps a fault address or a REMOVE range to pages.
//!
//! # Design
//!
//! Regions are kept sorted by address for a binary search, since their
//! order in the handshake says nothing about their addresses (Firecracker
//! v1.14 was seen mapping the second region directly below the first).

use crate::pagestate::PageStates;

/// 4 KiB.
pub const PAGE_4K: u64 = 4096;
/// 2 MiB.
pub const PAGE_2M: u64 = 2 << 20;

/// One region as the handshake gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Address of the region's first byte in Firecracker's process.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
    /// Where the region's bytes start in the memory file.
    pub offset: u64,
    /// Page size in bytes: 4 KiB or 2 MiB.
    pub page_size: u64,
}

/// A region being served, with its page states.
#[derive(Debug)]
pub struct Region {
    /// The region's position in the handshake.
    pub index: usize,
    /// What the handshake said.
    pub spec: RegionSpec,
    /// One state per page.
    pub states: PageStates,
}

impl Region {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.spec.base + self.spec.size
    }

    /// The page holding `addr`, which must be inside the region.
    pub fn page_of(&self, addr: u64) -> u64 {
        (addr - self.spec.base) / self.spec.page_size
    }

    /// Address of page `page`.
    pub fn page_addr(&self, page: u64) -> u64 {
        self.spec.base + page * self.spec.page_size
    }

    /// Offset in the memory file of page `page`.
    pub fn file_offset(&self, page: u64) -> u64 {
        self.spec.offset + page * self.spec.page_size
    }
}

/// Why a layout was refused. Each names the region by its position in the
/// handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The handshake listed no region.
    #[error("the handshake lists no memory region")]
    NoRegions,
    /// A page size other than 4 KiB or 2 MiB.
    #[error("region {index}: page size {page_size} is neither 4096 nor 2097152 bytes")]
    PageSize {
        /// Region position.
        index: usize,
        /// The page size given.
        page_size: u64,
    },
    /// A zero-length region.
    #[error("region {index}: size is 0")]
    Empty {
        /// Region position.
        index: usize,
    },
    /// A field not a multiple of the page size.
    #[error("region {index}: {field} {value:#x} is not a multiple of the page size {page_size}")]
    Unaligned {
        /// Region position.
        index: usize,
        /// `base_host_virt_addr`, `size` or `offset`.
        field: &'static str,
        /// The value given.
        value: u64,
        /// The region's page size.
        page_size: u64,
    },
    /// Address or file range overflows 64 bits.
    #[error("region {index}: {field} plus size overflows")]
    Overflow {
        /// Region position.
        index: usize,
        /// `base_host_virt_addr` or `offset`.
        field: &'static str,
    },
    /// Two regions share addresses.
    #[error("regions {first} and {second} overlap at {addr:#x}")]
    Overlap {
        /// One region.
        first: usize,
        /// The other region.
        second: usize,
        /// First shared address.
        addr: u64,
    },
    /// The region reads past the memory file's end.
    #[error(
        "region {index}: file range ends at {end:#x}, past the end of the memory file ({file_len:#x} bytes)"
    )]
    PastEndOfFile {
        /// Region position.
        index: usize,
        /// One past the region's last file byte.
        end: u64,
        /// The memory file's length.
        file_len: u64,
    },
}

/// The regions of one VM, sorted by address.
#[derive(Debug)]
pub struct Layout {
    regions: Vec<Region>,
}

/// Part of a range that falls in one region, as whole pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSpan {
    /// Index into [`Layout::regions`].
    pub region: usize,
    /// First page.
    pub first: u64,
    /// One past the last page.
    pub end: u64,
}

impl Layout {
    /// Checks `specs` against each other and a memory file of `file_len`
    /// bytes.
    pub fn new(specs: &[RegionSpec], file_len: u64) -> Result<Layout, LayoutError> {
        if specs.is_empty() {
            return Err(LayoutError::NoRegions);
        }
        for (index, spec) in specs.iter().enumerate() {
            check_region(index, spec, file_len)?;
        }
        let mut regions: Vec<Region> = specs
            .iter()
            .enumerate()
            .map(|(index, spec)| Region {
                index,
                spec: *spec,
                states: PageStates::new(spec.size / spec.page_size),
            })
            .collect();
        regions.sort_by_key(|r| r.spec.base);
        for pair in regions.windows(2) {
            if pair[1].spec.base < pair[0].end() {
                let (first, second) = (
                    pair[0].index.min(pair[1].index),
                    pair[0].index.max(pair[1].index),
                );
                return Err(LayoutError::Overlap {
                    first,
                    second,
                    addr: pair[1].spec.base,
                });
            }
        }
        Ok(Layout { regions })
    }

    /// The regions, sorted by address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The position in [`Self::regions`] of the region holding `addr`.
    pub fn find(&self, addr: u64) -> Option<usize> {
        let i = self
            .regions
            .partition_point(|r| r.spec.base <= addr)
            .checked_sub(1)?;
        (addr < self.regions[i].end()).then_some(i)
    }

    /// The whole pages that `[start, end)` covers, region by region.
    ///
    /// A range may span several regions (the kernel merges adjacent
    /// mappings) or reach outside all of them. Pages only partly covered are
    /// left out: the kernel zaps whole pages only (it rounds a hugetlb
    /// `MADV_DONTNEED` down to whole huge pages before sending the event).
    pub fn spans(&self, start: u64, end: u64) -> impl Iterator<Item = PageSpan> + '_ {
        let first = self.regions.partition_point(|r| r.end() <= start);
        self.regions[first..]
            .iter()
            .enumerate()
            .take_while(move |(_, r)| r.spec.base < end)
            .filter_map(move |(i, r)| {
                let lo = start.max(r.spec.base) - r.spec.base;
                let hi = end.min(r.end()) - r.spec.base;
                let page = r.spec.page_size;
                let span = PageSpan {
                    region: first + i,
                    first: lo.div_ceil(page),
                    end: hi / page,
                };
                (span.first < span.end).then_some(span)
            })
    }

    /// Total guest memory in bytes.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(|r| r.spec.size).sum()
    }
}

fn check_region(index: usize, spec: &RegionSpec, file_len: u64) -> Result<(), LayoutError> {
    let page_size = spec.page_size;
    if page_size != PAGE_4K && page_size != PAGE_2M {
        return Err(LayoutError::PageSize { index, page_size });
    }
    if spec.size == 0 {
        return Err(LayoutError::Empty { index });
    }
    for (field, value) in [
        ("base_host_virt_addr", spec.base),
        ("size", spec.size),
        ("offset", spec.offset),
    ] {
        if value % page_size != 0 {
            return Err(LayoutError::Unaligned {
                index,
                field,
                value,
                page_size,
            });
        }
    }
    spec.base
        .checked_add(spec.size)
        .ok_or(LayoutError::Overflow {
            index,
            field: "base_host_virt_addr",
        })?;
    let end = spec
        .offset
        .checked_add(spec.size)
        .ok_or(LayoutError::Overflow {
            index,
            field: "offset",
        })?;
    if end > file_len {
        return Err(LayoutError::PastEndOfFile {
            index,
            end,
            file_len,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(base: u64, size: u64, offset: u64) -> RegionSpec {
        RegionSpec {
            base,
            size,
            offset,
            page_size: PAGE_4K,
        }
    }

    #[test]
    fn finds_regions_out_of_handshake_order() {
        let layout = Layout::new(
            &[spec(0x10_0000, 0x4000, 0), spec(0x8_0000, 0x2000, 0x4000)],
            0x6000,
        )
        .unwrap();
        assert_eq!(layout.regions()[0].index, 1);
        assert_eq!(layout.find(0x8_1fff), Some(0));
        assert_eq!(layout.find(0x8_2000), None);
        assert_eq!(layout.find(0x10_0000), Some(1));
        assert_eq!(layout.find(0x7_ffff), None);
        assert_eq!(layout.find(0x10_4000), None);
    }

    #[test]
    fn spans_split_across_adjacent_regions_and_round_inward() {
        let layout = Layout::new(
            &[spec(0x1000, 0x3000, 0), spec(0x4000, 0x3000, 0x3000)],
            0x6000,
        )
        .unwrap();
        let spans: Vec<_> = layout.spans(0x1800, 0x6800).collect();
        assert_eq!(
            spans,
            vec![
                PageSpan {
                    region: 0,
                    first: 1,
                    end: 3
                },
                PageSpan {
                    region: 1,
                    first: 0,
                    end: 2
                }
            ]
        );
        assert_eq!(layout.spans(0x0, 0x1000).count(), 0);
        assert_eq!(layout.spans(0x1800, 0x1fff).count(), 0);
        let all: Vec<_> = layout.spans(0, u64::MAX).collect();
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn refuses_bad_layouts() {
        let e = |specs: &[RegionSpec]| Layout::new(specs, 1 << 30).unwrap_err();
        assert_eq!(e(&[]), LayoutError::NoRegions);
        let odd = RegionSpec {
            page_size: 8192,
            ..spec(0, 0x2000, 0)
        };
        assert!(matches!(
            e(&[odd]),
            LayoutError::PageSize {
                page_size: 8192,
                ..
            }
        ));
        assert!(matches!(
            e(&[spec(0x1001, 0x1000, 0)]),
            LayoutError::Unaligned {
                field: "base_host_virt_addr",
                ..
            }
        ));
        assert!(matches!(
            e(&[spec(0x1000, 0x1800, 0)]),
            LayoutError::Unaligned { field: "size", .. }
        ));
        assert!(matches!(
            e(&[spec(0x1000, 0, 0)]),
            LayoutError::Empty { .. }
        ));
        assert!(matches!(
            e(&[spec(0x1000, 0x2000, 0), spec(0x2000, 0x1000, 0x2000)]),
            LayoutError::Overlap {
                first: 0,
                second: 1,
                addr: 0x2000
            }
        ));
        assert!(matches!(
            e(&[spec(0x1000, 2 << 30, 0)]),
            LayoutError::PastEndOfFile { .. }
        ));
        assert!(matches!(
            e(&[spec(u64::MAX - 0xfff, 0x2000, 0)]),
            LayoutError::Overflow { .. }
        ));
        let huge = RegionSpec {
            page_size: PAGE_2M,
            ..spec(0x1000, PAGE_2M, 0)
        };
        assert!(matches!(e(&[huge]), LayoutError::Unaligned { .. }));
    }
}
