//! snapfault: a userfaultfd memory server for Firecracker microVM snapshots.
//!
//! Firecracker restores a snapshot with the `Uffd` memory backend, connects
//! to snapfault's socket and hands over a userfaultfd; snapfault then serves
//! every guest page on first touch from the snapshot's memory file, and
//! zeros for pages the guest's balloon gave back.
//!
//! The modules, from the kernel up: [`sys`] (every `unsafe` call),
//! [`handshake`] (Firecracker's message), [`region`] and [`pagestate`]
//! (what each page is), [`source`] (where bytes come from), [`serve`] (the
//! serve loop), [`server`] (socket to summary, as the command line runs
//! it), and [`testkit`] (processes that play Firecracker and KVM).

pub mod bench;
pub mod demo;
pub mod handshake;
pub mod log;
pub mod metrics;
pub mod pagestate;
pub mod region;
pub mod serve;
pub mod server;
pub mod source;
#[allow(unsafe_code)]
pub mod sys;
pub mod testkit;
