//! The test kit: processes that play Firecracker's and KVM's parts, and
//! the tools tests drive them with.
//!
//! - [`peer`]: the `fc-peer` process, a stand-in for Firecracker.
//! - [`harness`]: starts a peer and a server session and talks to both.
//! - [`snapshot`]: synthetic memory files with checkable content.
//! - [`gated`]: a page source a test can hold back or make fail.
//! - [`kvm`]: a tiny VMM whose vCPUs touch memory served by snapfault.
//! - [`vmpeer`]: the peer's KVM mode, checking what the vCPUs read.

pub mod gated;
pub mod harness;
pub mod kvm;
pub mod peer;
pub mod snapshot;
pub mod vmpeer;
