//! The guest program: x86-64 machine code, hand-encoded by a tiny emitter.
//!
//! The emitter knows only the few plain instructions the guest needs (64-bit `mov`, `add`,
//! `xor`, `imul`, shifts, `div`, `out`, `pause`, `jcc`, ...), each method encoding exactly one
//! instruction form, with the assembly it produces in its doc. Memory operands are always
//! `[base + disp8]` (ModRM mod=01), which never needs a SIB byte as long as the base is neither
//! `rsp` nor `r12`; jumps are always rel32, so no range checks are needed.
//!
//! The program has one entry point per [`super::GuestOp`]; the host sets RIP to the entry and
//! passes the parameters in registers (see [`Entries`] and `Vm::run`). Every entry ends with
//! `out DONE_PORT, al` and the result in `rax`.

use super::image::{FOLD_INIT, FOLD_MUL};
use super::{BALLOON_PORT, DONE_PORT, PAGE_SIZE, RING_SLOTS};

/// A general-purpose register, numbered as in the ModRM/REX encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum R {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
}

impl R {
    fn low(self) -> u8 {
        self as u8 & 7
    }
    fn high(self) -> u8 {
        (self as u8 >> 3) & 1
    }
}

/// Condition codes for `jcc` (the low nibble of `0F 8x`).
#[derive(Clone, Copy, Debug)]
#[repr(u8)]
pub(crate) enum Cond {
    /// `jb` (unsigned <).
    B = 0x2,
    /// `jae` (unsigned >=).
    Ae = 0x3,
    /// `jz`.
    Z = 0x4,
    /// `jnz`.
    Nz = 0x5,
}

/// A jump target inside an [`Asm`] buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Label(usize);

/// A minimal x86-64 emitter with labels and rel32 fix-ups.
#[derive(Default)]
pub(crate) struct Asm {
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    /// The current offset.
    pub(crate) fn pos(&self) -> usize {
        self.code.len()
    }
    /// A new, not yet placed label.
    pub(crate) fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }
    /// Places `l` at the current offset.
    pub(crate) fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.pos());
    }
    /// A new label placed at the current offset.
    pub(crate) fn here(&mut self) -> Label {
        let l = self.label();
        self.bind(l);
        l
    }
    fn bytes(&mut self, b: &[u8]) {
        self.code.extend_from_slice(b);
    }
    /// REX.W with R (ModRM.reg extension) and B (ModRM.rm extension).
    fn rex_w(reg: u8, rm: u8) -> u8 {
        0x48 | (reg << 2) | rm
    }
    fn modrm_rr(reg: u8, rm: u8) -> u8 {
        0xc0 | (reg << 3) | rm
    }
    /// `OP r/m64, r64` with a register destination (`mov`/`add`/`xor`/... `dst, src`).
    fn op_rr(&mut self, op: u8, dst: R, src: R) {
        let m = Self::modrm_rr(src.low(), dst.low());
        self.bytes(&[Self::rex_w(src.high(), dst.high()), op, m]);
    }
    /// `OP r64, [base + disp8]` or `OP [base + disp8], r64` (the direction is in `op`).
    fn op_mem(&mut self, op: u8, reg: R, base: R, disp: i8) {
        assert!(base.low() != 4, "rsp/r12 as base needs a SIB byte");
        let m = 0x40 | (reg.low() << 3) | base.low();
        self.bytes(&[Self::rex_w(reg.high(), base.high()), op, m, disp as u8]);
    }
    /// `GROUP r64, imm8` (`83 /ext ib`, or `C1 /ext ib` for shifts).
    fn op_ri8(&mut self, op: u8, ext: u8, dst: R, imm: u8) {
        let m = Self::modrm_rr(ext, dst.low());
        self.bytes(&[Self::rex_w(0, dst.high()), op, m, imm]);
    }
    /// `mov dst, imm64` (`REX.W B8+r io`).
    pub(crate) fn mov_imm64(&mut self, dst: R, imm: u64) {
        self.bytes(&[Self::rex_w(0, dst.high()), 0xb8 + dst.low()]);
        self.bytes(&imm.to_le_bytes());
    }
    /// `mov dst, src`.
    pub(crate) fn mov(&mut self, dst: R, src: R) {
        self.op_rr(0x89, dst, src);
    }
    /// `add dst, src`.
    pub(crate) fn add(&mut self, dst: R, src: R) {
        self.op_rr(0x01, dst, src);
    }
    /// `xor dst, src`.
    pub(crate) fn xor(&mut self, dst: R, src: R) {
        self.op_rr(0x31, dst, src);
    }
    /// `test a, b`.
    pub(crate) fn test(&mut self, a: R, b: R) {
        self.op_rr(0x85, a, b);
    }
    /// `imul dst, src` (`REX.W 0F AF /r`).
    pub(crate) fn imul(&mut self, dst: R, src: R) {
        let m = Self::modrm_rr(dst.low(), src.low());
        self.bytes(&[Self::rex_w(dst.high(), src.high()), 0x0f, 0xaf, m]);
    }
    /// `div src` (unsigned `rdx:rax / src`, quotient in `rax`, remainder in `rdx`).
    pub(crate) fn div(&mut self, src: R) {
        let m = Self::modrm_rr(6, src.low());
        self.bytes(&[Self::rex_w(0, src.high()), 0xf7, m]);
    }
    /// `dec dst`.
    pub(crate) fn dec(&mut self, dst: R) {
        let m = Self::modrm_rr(1, dst.low());
        self.bytes(&[Self::rex_w(0, dst.high()), 0xff, m]);
    }
    /// `add dst, imm8` (sign-extended).
    pub(crate) fn add_imm8(&mut self, dst: R, imm: i8) {
        self.op_ri8(0x83, 0, dst, imm as u8);
    }
    /// `or dst, imm8` (sign-extended).
    pub(crate) fn or_imm8(&mut self, dst: R, imm: i8) {
        self.op_ri8(0x83, 1, dst, imm as u8);
    }
    /// `and dst, imm8` (sign-extended).
    pub(crate) fn and_imm8(&mut self, dst: R, imm: i8) {
        self.op_ri8(0x83, 4, dst, imm as u8);
    }
    /// `cmp dst, imm8` (sign-extended).
    pub(crate) fn cmp_imm8(&mut self, dst: R, imm: i8) {
        self.op_ri8(0x83, 7, dst, imm as u8);
    }
    /// `shl dst, imm8`.
    pub(crate) fn shl(&mut self, dst: R, imm: u8) {
        self.op_ri8(0xc1, 4, dst, imm);
    }
    /// `shr dst, imm8`.
    pub(crate) fn shr(&mut self, dst: R, imm: u8) {
        self.op_ri8(0xc1, 5, dst, imm);
    }
    /// `mov dst, [base + disp]`.
    pub(crate) fn load(&mut self, dst: R, base: R, disp: i8) {
        self.op_mem(0x8b, dst, base, disp);
    }
    /// `mov [base + disp], src`.
    pub(crate) fn store(&mut self, base: R, disp: i8, src: R) {
        self.op_mem(0x89, src, base, disp);
    }
    /// `xor dst, [base + disp]`.
    pub(crate) fn xor_load(&mut self, dst: R, base: R, disp: i8) {
        self.op_mem(0x33, dst, base, disp);
    }
    /// `sub dst, [base + disp]`.
    pub(crate) fn sub_load(&mut self, dst: R, base: R, disp: i8) {
        self.op_mem(0x2b, dst, base, disp);
    }
    /// `cmp [base + disp], src`.
    pub(crate) fn cmp_mem(&mut self, base: R, disp: i8, src: R) {
        self.op_mem(0x39, src, base, disp);
    }
    /// `out port, al` (`E6 ib`).
    pub(crate) fn out_al(&mut self, port: u8) {
        self.bytes(&[0xe6, port]);
    }
    /// `pause` (`F3 90`).
    pub(crate) fn pause(&mut self) {
        self.bytes(&[0xf3, 0x90]);
    }
    /// `hlt`.
    pub(crate) fn hlt(&mut self) {
        self.bytes(&[0xf4]);
    }
    /// `jcc label` (`0F 8x rel32`).
    pub(crate) fn jcc(&mut self, c: Cond, l: Label) {
        self.bytes(&[0x0f, 0x80 | c as u8, 0, 0, 0, 0]);
        self.fixups.push((self.pos() - 4, l));
    }
    /// `jmp label` (`E9 rel32`).
    pub(crate) fn jmp(&mut self, l: Label) {
        self.bytes(&[0xe9, 0, 0, 0, 0]);
        self.fixups.push((self.pos() - 4, l));
    }
    /// Resolves the jumps and returns the code.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        for &(at, l) in &self.fixups {
            let target = self.labels[l.0].expect("jump to an unbound label");
            let rel = target as i64 - (at as i64 + 4);
            let rel = i32::try_from(rel).expect("jump out of rel32 range");
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        self.code
    }
}

/// Offsets (from the start of the code) of the entry points.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Entries {
    /// `ReadSum`: rsi = first gpa, r13 = pages, rbx = stride in bytes.
    pub read_sum: u64,
    /// `ReadRandom`: rsi = first gpa, r9 = range pages (> 0), r13 = count, r10 = xorshift state.
    pub read_random: u64,
    /// `ReadList`: rsi = list gpa, r13 = count.
    pub read_list: u64,
    /// `Write`: rsi = first gpa, r13 = pages, rbx = stride in bytes, r9 = seed.
    pub write: u64,
    /// `ReportFree`: rdi = this vCPU's ring, rsi = gpa, rdx = len, rcx = wait (0 or 1).
    pub report_free: u64,
}

/// Words per 4 KiB page.
const WORDS: i64 = (PAGE_SIZE / 8) as i64;

/// Folds the page at `rdi` into `rax` (`r8` = [`FOLD_MUL`]); clobbers `rcx`, `rdi`.
fn sum_page(a: &mut Asm) {
    a.mov_imm64(R::Rcx, WORDS as u64); //       mov rcx, 512
    let word = a.here(); //                  word:
    a.xor_load(R::Rax, R::Rdi, 0); //           xor rax, [rdi]
    a.imul(R::Rax, R::R8); //                   imul rax, r8
    a.add_imm8(R::Rdi, 8); //                   add rdi, 8
    a.dec(R::Rcx); //                           dec rcx
    a.jcc(Cond::Nz, word); //                   jnz word
}

/// `rax = FOLD_INIT; r8 = FOLD_MUL; if r13 == 0 goto done`.
fn read_prologue(a: &mut Asm, done: Label) {
    a.mov_imm64(R::Rax, FOLD_INIT); //          mov rax, FOLD_INIT
    a.mov_imm64(R::R8, FOLD_MUL); //            mov r8, FOLD_MUL
    a.test(R::R13, R::R13); //                  test r13, r13
    a.jcc(Cond::Z, done); //                    jz done
}

/// Builds the guest program and its entry table.
pub(crate) fn program() -> (Vec<u8>, Entries) {
    let mut a = Asm::default();
    let mut e = Entries::default();
    let done = a.label();

    // done: out DONE_PORT, al; hlt
    a.bind(done);
    a.out_al(DONE_PORT);
    a.hlt();

    // ReadSum.
    e.read_sum = a.pos() as u64;
    read_prologue(&mut a, done);
    let page = a.here(); //                  page:
    a.mov(R::Rdi, R::Rsi); //                   mov rdi, rsi
    sum_page(&mut a);
    a.add(R::Rsi, R::Rbx); //                   add rsi, rbx
    a.dec(R::R13); //                           dec r13
    a.jcc(Cond::Nz, page); //                   jnz page
    a.jmp(done);

    // ReadRandom: xorshift64 in r10, page index = r10 % r9.
    e.read_random = a.pos() as u64;
    read_prologue(&mut a, done);
    let page = a.here(); //                  page:
    for (left, n) in [(true, 13), (false, 7), (true, 17)] {
        a.mov(R::R11, R::R10); //               mov r11, r10
        if left {
            a.shl(R::R11, n); //                shl r11, n
        } else {
            a.shr(R::R11, n); //                shr r11, n
        }
        a.xor(R::R10, R::R11); //               xor r10, r11
    }
    a.mov(R::R12, R::Rax); //                   mov r12, rax
    a.mov(R::Rax, R::R10); //                   mov rax, r10
    a.xor(R::Rdx, R::Rdx); //                   xor rdx, rdx
    a.div(R::R9); //                            div r9
    a.mov(R::Rax, R::R12); //                   mov rax, r12
    a.mov(R::Rdi, R::Rdx); //                   mov rdi, rdx
    a.shl(R::Rdi, 12); //                       shl rdi, 12
    a.add(R::Rdi, R::Rsi); //                   add rdi, rsi
    sum_page(&mut a);
    a.dec(R::R13); //                           dec r13
    a.jcc(Cond::Nz, page); //                   jnz page
    a.jmp(done);

    // ReadList.
    e.read_list = a.pos() as u64;
    read_prologue(&mut a, done);
    let page = a.here(); //                  page:
    a.load(R::Rdi, R::Rsi, 0); //               mov rdi, [rsi]
    a.add_imm8(R::Rsi, 8); //                   add rsi, 8
    sum_page(&mut a);
    a.dec(R::R13); //                           dec r13
    a.jcc(Cond::Nz, page); //                   jnz page
    a.jmp(done);

    // Write: word = ((gpa ^ seed) * FOLD_MUL) | 1; returns the page count.
    e.write = a.pos() as u64;
    let wdone = a.label();
    a.mov_imm64(R::R8, FOLD_MUL); //            mov r8, FOLD_MUL
    a.mov(R::R14, R::R13); //                   mov r14, r13
    a.test(R::R13, R::R13); //                  test r13, r13
    a.jcc(Cond::Z, wdone); //                   jz wdone
    let page = a.here(); //                  page:
    a.mov(R::Rdi, R::Rsi); //                   mov rdi, rsi
    a.mov_imm64(R::Rcx, WORDS as u64); //       mov rcx, 512
    let word = a.here(); //                  word:
    a.mov(R::Rax, R::Rdi); //                   mov rax, rdi
    a.xor(R::Rax, R::R9); //                    xor rax, r9
    a.imul(R::Rax, R::R8); //                   imul rax, r8
    a.or_imm8(R::Rax, 1); //                    or rax, 1
    a.store(R::Rdi, 0, R::Rax); //              mov [rdi], rax
    a.add_imm8(R::Rdi, 8); //                   add rdi, 8
    a.dec(R::Rcx); //                           dec rcx
    a.jcc(Cond::Nz, word); //                   jnz word
    a.add(R::Rsi, R::Rbx); //                   add rsi, rbx
    a.dec(R::R13); //                           dec r13
    a.jcc(Cond::Nz, page); //                   jnz page
    a.bind(wdone); //                        wdone:
    a.mov(R::Rax, R::R14); //                   mov rax, r14
    a.jmp(done);

    // ReportFree: ring = [posted, done, (gpa, len) x RING_SLOTS]; returns the new `posted`.
    e.report_free = a.pos() as u64;
    a.load(R::R8, R::Rdi, 0); //                mov r8, [rdi]        ; posted
    let full = a.here(); //                  full:
    a.mov(R::R9, R::R8); //                     mov r9, r8
    a.sub_load(R::R9, R::Rdi, 8); //            sub r9, [rdi+8]      ; in flight
    a.cmp_imm8(R::R9, RING_SLOTS as i8); //     cmp r9, RING_SLOTS
    let space = a.label();
    a.jcc(Cond::B, space); //                   jb space
    a.pause(); //                               pause
    a.jmp(full); //                             jmp full
    a.bind(space); //                        space:
    a.mov(R::R9, R::R8); //                     mov r9, r8
    a.and_imm8(R::R9, RING_SLOTS as i8 - 1); // and r9, RING_SLOTS-1
    a.shl(R::R9, 4); //                         shl r9, 4
    a.add(R::R9, R::Rdi); //                    add r9, rdi
    a.store(R::R9, 16, R::Rsi); //              mov [r9+16], rsi
    a.store(R::R9, 24, R::Rdx); //              mov [r9+24], rdx
    a.add_imm8(R::R8, 1); //                    add r8, 1
    a.store(R::Rdi, 0, R::R8); //               mov [rdi], r8        ; publish
    a.out_al(BALLOON_PORT); //                  out BALLOON_PORT, al ; ioeventfd kick
    a.mov(R::Rax, R::R8); //                    mov rax, r8
    a.test(R::Rcx, R::Rcx); //                  test rcx, rcx
    a.jcc(Cond::Z, done); //                    jz done
    let wait = a.here(); //                  wait:
    a.cmp_mem(R::Rdi, 8, R::R8); //      cmp [rdi+8], r8
    a.jcc(Cond::Ae, done); //                   jae done
    a.pause(); //                               pause
    a.jmp(wait); //                             jmp wait

    (a.finish(), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: impl FnOnce(&mut Asm)) -> Vec<u8> {
        let mut a = Asm::default();
        f(&mut a);
        a.finish()
    }

    #[test]
    fn encodings_match_reference_bytes() {
        assert_eq!(enc(|a| a.xor(R::Rax, R::Rax)), [0x48, 0x31, 0xc0]);
        assert_eq!(enc(|a| a.mov(R::Rdi, R::Rsi)), [0x48, 0x89, 0xf7]);
        assert_eq!(enc(|a| a.mov(R::R11, R::R10)), [0x4d, 0x89, 0xd3]);
        assert_eq!(enc(|a| a.imul(R::Rax, R::R8)), [0x49, 0x0f, 0xaf, 0xc0]);
        assert_eq!(enc(|a| a.add_imm8(R::Rdi, 8)), [0x48, 0x83, 0xc7, 0x08]);
        assert_eq!(enc(|a| a.dec(R::R13)), [0x49, 0xff, 0xcd]);
        assert_eq!(enc(|a| a.div(R::R9)), [0x49, 0xf7, 0xf1]);
        assert_eq!(enc(|a| a.shl(R::R11, 13)), [0x49, 0xc1, 0xe3, 0x0d]);
        assert_eq!(
            enc(|a| a.xor_load(R::Rax, R::Rdi, 0)),
            [0x48, 0x33, 0x47, 0x00]
        );
        assert_eq!(
            enc(|a| a.store(R::R9, 16, R::Rsi)),
            [0x49, 0x89, 0x71, 0x10]
        );
        assert_eq!(
            enc(|a| a.cmp_mem(R::Rdi, 8, R::R8)),
            [0x4c, 0x39, 0x47, 0x08]
        );
        assert_eq!(enc(|a| a.mov_imm64(R::R8, 1))[..2], [0x49, 0xb8]);
        let back = enc(|a| {
            let l = a.here();
            a.jcc(Cond::Nz, l);
        });
        assert_eq!(back, [0x0f, 0x85, 0xfa, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn program_fits_code_area() {
        let (code, e) = program();
        assert!(code.len() as u64 <= super::super::CODE_LEN);
        assert!(e.report_free > e.write && e.write > e.read_list);
    }
}
