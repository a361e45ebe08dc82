//! Where to probe a Go function, found by decoding its x86-64 machine code.
//!
//! A uretprobe replaces the return address on the stack with the kernel's trampoline. Go's
//! runtime reads the return addresses of goroutine stacks — to grow and copy a stack, for the
//! garbage collector, for tracebacks — and dies on one it does not know ("unexpected return
//! pc"). So the return of a Go function is probed where it happens instead: a plain uprobe on
//! each of its RET instructions, which leaves the stack alone.
//!
//! The entry is probed after the prologue's stack check, not at the first instruction. A
//! goroutine whose stack is too small there (or that the scheduler asked to yield) calls
//! `runtime.morestack`, which grows the stack (or reschedules the goroutine) and then runs the
//! function again from its first instruction: a probe there would see that one call twice.
//!
//! Decoding uses `iced-x86`: an instruction's length depends on its prefixes, opcode, ModRM,
//! SIB, displacement and immediate (and VEX/EVEX for vector code, which Go's runtime uses), so
//! finding RETs by looking for byte 0xC3 would also find it inside immediates and
//! displacements — and a uprobe in the middle of an instruction corrupts the program.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// How many instructions from the start of a function its stack check may be at: Go's
/// prologue is `[LEAQ -framesize(SP), R12 | MOVQ SP, R12; SUBQ $framesize, R12; JCS ...]`
/// then `CMPQ SP|R12, 16(R14)` and `JLS morestack`.
const STACK_CHECK_WINDOW: usize = 6;

/// Offset of `stackguard0` in Go's `runtime.g` (after `stack.lo` and `stack.hi`); the
/// prologue compares the stack pointer against it. R14 holds the current `g` in Go's internal
/// register ABI.
const G_STACKGUARD0: u64 = 0x10;

/// The probe points of one Go function, as ELF virtual addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoProbePoints {
    /// Where the call starts for a tracer: after the stack check, or the function's first
    /// instruction when it has none (a `NOSPLIT` function).
    pub entry: u64,
    /// Each RET instruction (`C3`, `C2 iw`, with any prefixes: the address of the first
    /// byte). Empty for a function that only ends in tail jumps or never returns.
    pub returns: Vec<u64>,
}

/// Why a function's code could not be turned into probe points.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GoCodeError {
    /// The symbol table gives the function no size, so where its code ends is unknown.
    #[error("the symbol table does not say how long the function is")]
    UnknownSize,
    /// Some bytes of the function are not a valid instruction: probing anything after them
    /// could put a breakpoint inside an instruction.
    #[error("the bytes at {address:#x} are not a valid x86-64 instruction")]
    Undecodable { address: u64 },
}

/// Decodes the function whose machine code is `code`, loaded at `address`.
pub fn probe_points(code: &[u8], address: u64) -> Result<GoProbePoints, GoCodeError> {
    if code.is_empty() {
        return Err(GoCodeError::UnknownSize);
    }
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    let mut entry = address;
    let mut returns = Vec::new();
    // Index of the stack check's CMP while the prologue is being looked at.
    let mut stack_check: Option<usize> = None;
    let mut in_prologue = true;
    let mut index = 0usize;
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        if instruction.code() == Code::INVALID {
            return Err(GoCodeError::Undecodable {
                address: instruction.ip(),
            });
        }
        if in_prologue {
            match stack_check {
                Some(check) if index == check + 1 => {
                    if is_jcc(instruction.mnemonic()) {
                        entry = instruction.next_ip();
                    }
                    in_prologue = false;
                }
                Some(_) => in_prologue = false,
                None if is_stack_check(&instruction) => stack_check = Some(index),
                None if index >= STACK_CHECK_WINDOW || ends_prologue(&instruction) => {
                    in_prologue = false
                }
                None => {}
            }
        }
        if instruction.mnemonic() == Mnemonic::Ret {
            returns.push(instruction.ip());
        }
        index += 1;
    }
    Ok(GoProbePoints { entry, returns })
}

/// `CMPQ reg, 16(R14)`: the stack pointer (or what it will be) against `g.stackguard0`.
fn is_stack_check(instruction: &Instruction) -> bool {
    instruction.mnemonic() == Mnemonic::Cmp
        && (0..instruction.op_count()).any(|i| instruction.op_kind(i) == OpKind::Memory)
        && instruction.memory_base() == Register::R14
        && instruction.memory_index() == Register::None
        && instruction.memory_displacement64() == G_STACKGUARD0
}

/// An instruction that is not part of Go's stack check: only `MOVQ`/`LEAQ`/`SUBQ` into a
/// scratch register and the large-frame check's `JCS morestack` come before the compare, and
/// none of them moves the stack pointer.
fn ends_prologue(instruction: &Instruction) -> bool {
    let writes_rsp = instruction.op_count() > 0
        && instruction.op0_kind() == OpKind::Register
        && instruction.op0_register() == Register::RSP;
    let mnemonic = instruction.mnemonic();
    writes_rsp
        || !(matches!(mnemonic, Mnemonic::Mov | Mnemonic::Lea | Mnemonic::Sub) || is_jcc(mnemonic))
}

/// A conditional jump.
fn is_jcc(mnemonic: Mnemonic) -> bool {
    matches!(
        mnemonic,
        Mnemonic::Ja
            | Mnemonic::Jae
            | Mnemonic::Jb
            | Mnemonic::Jbe
            | Mnemonic::Je
            | Mnemonic::Jne
            | Mnemonic::Jg
            | Mnemonic::Jge
            | Mnemonic::Jl
            | Mnemonic::Jle
            | Mnemonic::Jo
            | Mnemonic::Jno
            | Mnemonic::Jp
            | Mnemonic::Jnp
            | Mnemonic::Js
            | Mnemonic::Jns
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `main.work` as Go 1.19 compiles it (see `go tool objdump`): stack check, a loop with
    /// calls, one RET, and the morestack tail that jumps back to the start.
    const WORK: &[u8] = &[
        0x49, 0x3b, 0x66, 0x10, // CMPQ 0x10(R14), SP
        0x76, 0x1c, // JBE morestack
        0x48, 0x83, 0xec, 0x28, // SUBQ $0x28, SP
        0x48, 0x89, 0x6c, 0x24, 0x20, // MOVQ BP, 0x20(SP)
        0x48, 0x8d, 0x6c, 0x24, 0x20, // LEAQ 0x20(SP), BP
        0xb8, 0xc3, 0x00, 0x00, 0x00, // MOVL $0xc3, AX: a C3 byte that is no RET
        0xe8, 0x00, 0x00, 0x00, 0x00, // CALL
        0x48, 0x8b, 0x6c, 0x24, 0x20, // MOVQ 0x20(SP), BP
        0x48, 0x83, 0xc4, 0x28, // ADDQ $0x28, SP
        0xc3, // RET (offset 0x27)
        0x48, 0x89, 0x44, 0x24, 0x08, // MOVQ AX, 0x8(SP)
        0xe8, 0x00, 0x00, 0x00, 0x00, // CALL runtime.morestack_noctxt
        0xeb, 0xcd, // JMP main.work
    ];

    #[test]
    fn finds_the_entry_after_the_stack_check_and_the_real_ret() {
        let points = probe_points(WORK, 0x1000).expect("decodes");
        assert_eq!(points.entry, 0x1006);
        assert_eq!(points.returns, vec![0x1027]);
    }

    #[test]
    fn c3_bytes_inside_other_instructions_are_not_returns() {
        let code = [
            0x48, 0xc7, 0xc0, 0xc3, 0xc3, 0xc3, 0xc3, // MOV RAX, 0xc3c3c3c3
            0x48, 0x8b, 0x83, 0xc3, 0x00, 0x00, 0x00, // MOV RAX, [RBX+0xc3]
            0xc2, 0x10, 0x00, // RET 0x10
            0xf3, 0xc3, // REP RET: probed at the prefix
            0xcb, // RETF: not a near return
            0xc3, // RET
        ];
        let points = probe_points(&code, 0x2000).expect("decodes");
        // No stack check: a NOSPLIT function is entered at its first instruction.
        assert_eq!(points.entry, 0x2000);
        assert_eq!(points.returns, vec![0x200e, 0x2011, 0x2014]);
    }

    #[test]
    fn large_frames_check_after_a_branch() {
        // MOVQ SP, R12; SUBQ $0x2000, R12; JB m; CMPQ R12, 0x10(R14); JBE m; SUBQ ..; RET
        let code = [
            0x49, 0x89, 0xe4, // MOVQ SP, R12
            0x49, 0x81, 0xec, 0x00, 0x20, 0x00, 0x00, // SUBQ $0x2000, R12
            0x72, 0x0d, // JB morestack
            0x4d, 0x3b, 0x66, 0x10, // CMPQ 0x10(R14), R12
            0x76, 0x08, // JBE morestack
            0x48, 0x81, 0xec, 0x00, 0x20, 0x00, 0x00, // SUBQ $0x2000, SP
            0xc3, // RET
            0xeb, 0xe6, // morestack: JMP start
        ];
        let points = probe_points(&code, 0).expect("decodes");
        assert_eq!(points.entry, 0x12);
        assert_eq!(points.returns, vec![0x19]);
    }

    #[test]
    fn a_compare_of_something_else_is_no_stack_check() {
        // CMPQ 0x18(R14), SP; JBE; RET: not stackguard0, so the entry stays at the start.
        let code = [0x49, 0x3b, 0x66, 0x18, 0x76, 0x01, 0xc3, 0xc3];
        let points = probe_points(&code, 0).expect("decodes");
        assert_eq!(points.entry, 0);
        // A tail-jump-only function has no return.
        let code = [0x48, 0x89, 0xc3, 0xe9, 0x00, 0x00, 0x00, 0x00]; // MOVQ AX, BX; JMP
        assert_eq!(
            probe_points(&code, 0).expect("decodes").returns,
            Vec::<u64>::new()
        );
    }

    #[test]
    fn undecodable_or_truncated_code_is_refused() {
        // 0x06 (PUSH ES) is invalid in 64-bit mode.
        assert_eq!(
            probe_points(&[0x90, 0x06, 0xc3], 0x10),
            Err(GoCodeError::Undecodable { address: 0x11 })
        );
        // A MOV whose immediate is cut off by the end of the function.
        assert_eq!(
            probe_points(&[0xc3, 0x48, 0xc7, 0xc0, 0xc3], 0),
            Err(GoCodeError::Undecodable { address: 1 })
        );
        assert_eq!(probe_points(&[], 0), Err(GoCodeError::UnknownSize));
    }
}
