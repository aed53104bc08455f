//! Tests with a real KVM vCPU over anonymous memory (no userfaultfd).

use std::time::Instant;

use super::*;

/// Anonymous private memory, unmapped on drop.
struct Mem {
    ptr: *mut u8,
    len: usize,
}

impl Mem {
    /// Maps `len` bytes (`MAP_HUGETLB` 2 MiB pages if `huge`) and fills them with the image.
    fn with_image(len: u64, huge: bool) -> Option<Mem> {
        let flags =
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if huge { libc::MAP_HUGETLB } else { 0 };
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: an anonymous mapping at an address of the kernel's choice; no pointer is
        // passed in, and the result is checked below.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len as usize, prot, flags, -1, 0) };
        if ptr == libc::MAP_FAILED {
            eprintln!(
                "mmap of {len} bytes (huge: {huge}) failed: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        let mem = Mem {
            ptr: ptr.cast(),
            len: len as usize,
        };
        // SAFETY: the mapping is `len` bytes, readable and writable, and no VM exists yet, so
        // this is the only access; the slice is dropped before any `Vm` is created.
        let mut dst = unsafe { std::slice::from_raw_parts_mut(mem.ptr, mem.len) };
        write_image(&mut dst, len).unwrap();
        Some(mem)
    }

    /// A VM over this memory.
    fn vm(&self, vcpus: u32) -> Vm {
        // SAFETY: the mapping is `len` bytes, read/write, and every test drops the `Vm` before
        // the `Mem` (declared after it); tests hold no references into the memory.
        unsafe { Vm::new(self.ptr, self.len as u64, vcpus) }.unwrap()
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `with_image`; no VM uses it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn have_kvm() -> bool {
    let ok = std::path::Path::new("/dev/kvm").exists();
    if !ok {
        eprintln!("/dev/kvm is missing: skipping the KVM test");
    }
    ok
}

fn image(_: u64) -> PageContent {
    PageContent::Image
}

fn data_pages(mem: u64) -> u64 {
    (mem - DATA_START) / PAGE_SIZE
}

fn check_sum(vm: &Vm, vcpu: u32, op: GuestOp, content: impl Fn(u64) -> PageContent) {
    let out = vm.run(vcpu, op).unwrap();
    let expected = expected_sum(op.visited_pages().unwrap(), content);
    assert_eq!(out.value, expected, "{op:?}");
}

#[test]
fn vm_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Vm>();
}

#[test]
fn read_sum_matches_image() {
    if !have_kvm() {
        return;
    }
    let size = 18 << 20;
    let mem = Mem::with_image(size, false).unwrap();
    let vm = mem.vm(1);
    let op = GuestOp::ReadSum {
        first_gpa: DATA_START,
        pages: data_pages(size),
        stride_pages: 1,
    };
    let t = Instant::now();
    let first = vm.run(0, op).unwrap();
    let cold = t.elapsed();
    let t = Instant::now();
    let second = vm.run(0, op).unwrap();
    let warm = t.elapsed();
    eprintln!(
        "ReadSum of 16 MiB: first {cold:?} ({} exits), again {warm:?}",
        first.exits
    );
    assert_eq!(
        first.value,
        expected_sum(op.visited_pages().unwrap(), image)
    );
    assert_eq!(second, first);
    check_sum(
        &vm,
        0,
        GuestOp::ReadSum {
            first_gpa: DATA_START,
            pages: 30,
            stride_pages: 7,
        },
        image,
    );
    check_sum(
        &vm,
        0,
        GuestOp::ReadSum {
            first_gpa: size - PAGE_SIZE,
            pages: 1,
            stride_pages: 0,
        },
        image,
    );
    let empty = vm.run(
        0,
        GuestOp::ReadSum {
            first_gpa: DATA_START,
            pages: 0,
            stride_pages: 1,
        },
    );
    assert_eq!(empty.unwrap().value, FOLD_INIT);
}

#[test]
fn write_then_read_sees_seed() {
    if !have_kvm() {
        return;
    }
    let size = MIN_MEM_SIZE;
    let mem = Mem::with_image(size, false).unwrap();
    let vm = mem.vm(1);
    let base = DATA_START + 16 * PAGE_SIZE;
    let w = GuestOp::Write {
        first_gpa: base,
        pages: 10,
        stride_pages: 3,
        seed: 42,
    };
    assert_eq!(vm.run(0, w).unwrap().value, 10);
    let written = w.visited_pages().unwrap();
    let content = |gpa| {
        if written.contains(&gpa) {
            PageContent::Written(42)
        } else {
            PageContent::Image
        }
    };
    let all = GuestOp::ReadSum {
        first_gpa: DATA_START,
        pages: data_pages(size),
        stride_pages: 1,
    };
    check_sum(&vm, 0, all, content);
    check_sum(
        &vm,
        0,
        GuestOp::ReadSum {
            first_gpa: base,
            pages: 10,
            stride_pages: 3,
        },
        |_| PageContent::Written(42),
    );
}

#[test]
fn read_list_visits_listed_pages() {
    if !have_kvm() {
        return;
    }
    let size = MIN_MEM_SIZE;
    let mem = Mem::with_image(size, false).unwrap();
    let vm = mem.vm(1);
    let list: Vec<u64> = [5u64, 0, 511, 5, 100]
        .iter()
        .map(|p| DATA_START + p * PAGE_SIZE)
        .collect();
    vm.write_words(LIST_GPA, &list).unwrap();
    let out = vm
        .run(
            0,
            GuestOp::ReadList {
                list_gpa: LIST_GPA,
                count: list.len() as u64,
            },
        )
        .unwrap();
    assert_eq!(out.value, expected_sum(list.iter().copied(), image));
    assert!(vm.write_words(size - 8, &[1, 2]).is_err());
}

#[test]
fn report_free_wait_then_reads_see_zeros() {
    if !have_kvm() {
        return;
    }
    let size = 12 << 20;
    let mem = Mem::with_image(size, false).unwrap();
    let vm = mem.vm(1);
    let freed = DATA_START + 64 * PAGE_SIZE..DATA_START + 80 * PAGE_SIZE;
    let report = GuestOp::ReportFree {
        gpa: freed.start,
        len: 16 * PAGE_SIZE,
        wait: true,
    };
    let out = vm.run(0, report).unwrap();
    assert_eq!(out.value, 1);
    assert_eq!(
        out.exits, 1,
        "the ioeventfd kick must not exit to userspace"
    );
    assert_eq!(vm.reports_done(), 1);
    let all = GuestOp::ReadSum {
        first_gpa: DATA_START,
        pages: data_pages(size),
        stride_pages: 1,
    };
    let zero_in = |ranges: Vec<std::ops::Range<u64>>| {
        move |gpa| {
            if ranges.iter().any(|r| r.contains(&gpa)) {
                PageContent::Zero
            } else {
                PageContent::Image
            }
        }
    };
    check_sum(&vm, 0, all, zero_in(vec![freed.clone()]));

    // More reports than ring slots without waiting, then one that waits for all of them.
    let mut ranges = vec![freed];
    for i in 0..2 * RING_SLOTS {
        let gpa = DATA_START + (200 + 3 * i) * PAGE_SIZE;
        ranges.push(gpa..gpa + PAGE_SIZE);
        let op = GuestOp::ReportFree {
            gpa,
            len: PAGE_SIZE,
            wait: false,
        };
        assert_eq!(vm.run(0, op).unwrap().value, 2 + i);
    }
    let gpa = size - 2 * PAGE_SIZE;
    ranges.push(gpa..size);
    let op = GuestOp::ReportFree {
        gpa,
        len: 2 * PAGE_SIZE,
        wait: true,
    };
    assert_eq!(vm.run(0, op).unwrap().value, 2 + 2 * RING_SLOTS);
    assert_eq!(vm.reports_done(), 2 + 2 * RING_SLOTS);
    check_sum(&vm, 0, all, zero_in(ranges));
}

#[test]
fn two_vcpus_read_random_concurrently() {
    if !have_kvm() {
        return;
    }
    let size = 40 << 20;
    let mem = Mem::with_image(size, false).unwrap();
    let vm = mem.vm(2);
    std::thread::scope(|s| {
        for v in 0..2u32 {
            let vm = &vm;
            s.spawn(move || {
                for round in 0..4u64 {
                    let seed = u64::from(v) * 1000 + round;
                    let range_pages = data_pages(size);
                    let op = GuestOp::ReadRandom {
                        first_gpa: DATA_START,
                        range_pages,
                        count: 2000,
                        seed,
                    };
                    check_sum(vm, v, op, image);
                }
            });
        }
    });
}

#[test]
fn hugetlb_memory_works() {
    if !have_kvm() {
        return;
    }
    let size: u64 = 16 << 20;
    if !reserve_huge_pages(size / (2 << 20)) {
        eprintln!("cannot reserve huge pages: skipping the MAP_HUGETLB test");
        return;
    }
    let Some(mem) = Mem::with_image(size, true) else {
        eprintln!("MAP_HUGETLB failed: skipping the MAP_HUGETLB test");
        return;
    };
    let vm = mem.vm(2);
    let all = GuestOp::ReadSum {
        first_gpa: DATA_START,
        pages: data_pages(size),
        stride_pages: 1,
    };
    check_sum(&vm, 0, all, image);
    let hp = 2 << 20;
    let report = GuestOp::ReportFree {
        gpa: DATA_START + hp,
        len: hp,
        wait: true,
    };
    vm.run(1, report).unwrap();
    let freed = DATA_START + hp..DATA_START + 2 * hp;
    let zero = |gpa| {
        if freed.contains(&gpa) {
            PageContent::Zero
        } else {
            PageContent::Image
        }
    };
    check_sum(&vm, 1, all, zero);
    let w = GuestOp::Write {
        first_gpa: DATA_START + hp,
        pages: 3,
        stride_pages: 100,
        seed: 9,
    };
    vm.run(0, w).unwrap();
    let written = w.visited_pages().unwrap();
    let content = |gpa| {
        if written.contains(&gpa) {
            PageContent::Written(9)
        } else {
            zero(gpa)
        }
    };
    check_sum(&vm, 0, all, content);
}

/// Makes sure `pages` huge pages are free, raising `vm.nr_hugepages` if needed. It never lowers
/// it (other tests of the crate may be using or about to map huge pages at the same time).
fn reserve_huge_pages(pages: u64) -> bool {
    const NR: &str = "/proc/sys/vm/nr_hugepages";
    let free = || -> Option<u64> {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("HugePages_Free:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let Some(have) = free() else { return false };
    if have >= pages {
        return true;
    }
    let total: Option<u64> = std::fs::read_to_string(NR)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let Some(total) = total else { return false };
    std::fs::write(NR, (total + pages - have).to_string()).is_ok()
        && free().is_some_and(|f| f >= pages)
}

#[test]
fn bad_operations_are_errors_not_hangs() {
    if !have_kvm() {
        return;
    }
    let size = MIN_MEM_SIZE;
    let mem = Mem::with_image(size, false).unwrap();
    let vm = mem.vm(1);
    let bad = [
        GuestOp::ReadSum {
            first_gpa: DATA_START + 1,
            pages: 1,
            stride_pages: 1,
        },
        GuestOp::ReadSum {
            first_gpa: size - PAGE_SIZE,
            pages: 2,
            stride_pages: 1,
        },
        GuestOp::ReadRandom {
            first_gpa: DATA_START,
            range_pages: 0,
            count: 1,
            seed: 0,
        },
        GuestOp::Write {
            first_gpa: 0,
            pages: 1,
            stride_pages: 1,
            seed: 0,
        },
        GuestOp::ReportFree {
            gpa: MAILBOX_GPA,
            len: PAGE_SIZE,
            wait: true,
        },
        GuestOp::ReportFree {
            gpa: DATA_START,
            len: 0,
            wait: true,
        },
    ];
    for op in bad {
        assert!(
            matches!(vm.run(0, op), Err(KvmError::BadOp { .. })),
            "{op:?}"
        );
    }
    assert!(matches!(
        vm.run(1, bad[0]),
        Err(KvmError::NoSuchVcpu { .. })
    ));
    // A listed page outside guest memory: the guest faults, and the run ends with an error.
    vm.write_words(LIST_GPA, &[size + (2 << 20)]).unwrap();
    let err = vm
        .run(
            0,
            GuestOp::ReadList {
                list_gpa: LIST_GPA,
                count: 1,
            },
        )
        .unwrap_err();
    eprintln!("guest fault: {err}");
    assert!(matches!(err, KvmError::UnexpectedExit { .. }), "{err}");
    // The vCPU still works afterwards.
    let op = GuestOp::ReadSum {
        first_gpa: DATA_START,
        pages: 4,
        stride_pages: 1,
    };
    check_sum(&vm, 0, op, image);
}
