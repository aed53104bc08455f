//! Every `unsafe` block of snapfault's server lives below this module.
//!
//! Each submodule wraps one kernel interface in a safe API: owned file
//! descriptors instead of integers, typed outcomes instead of `-1` and
//! `errno`, and the one place (`cvt`) that turns a C return value into an
//! [`std::io::Error`]. The rest of the crate denies `unsafe_code`.
//!
//! The wrappers are written on `libc` by hand rather than taken from the
//! `userfaultfd` crate: that crate turns a negated errno from `UFFDIO_COPY`
//! into a byte count near 2^64, has no `UFFDIO_COPY_MODE_WP` and no
//! `UFFDIO_POISON`, and needs libclang to build.

pub mod mem;
pub mod poll;
pub mod proc;
pub mod sock;
pub mod uffd;

use std::io;

/// Turns the `-1`-means-error convention of a libc call into a `Result`.
pub(crate) fn cvt<T: IsMinusOne>(ret: T) -> io::Result<T> {
    if ret.is_minus_one() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Integers that libc calls return, where `-1` signals an error.
pub(crate) trait IsMinusOne: Copy {
    fn is_minus_one(self) -> bool;
}

impl IsMinusOne for i32 {
    fn is_minus_one(self) -> bool {
        self == -1
    }
}

impl IsMinusOne for isize {
    fn is_minus_one(self) -> bool {
        self == -1
    }
}

impl IsMinusOne for i64 {
    fn is_minus_one(self) -> bool {
        self == -1
    }
}
