//! The AMX kernel: a 32 x 32 block as 2 x 2 tiles of 16 x 16 f32 sums, each k step of 32
//! loading two row tiles and two panel tiles and issuing four `tdpbf16ps`. Rust has no
//! stable AMX intrinsics, so the tile instructions are inline assembly; the compiler never
//! uses tile registers itself, so the state they hold between the statements is ours.

#[cfg(target_arch = "x86_64")]
use std::arch::asm;
use std::sync::OnceLock;

use super::{Target, BLOCK, K_STEP, PANEL};

/// Linux's `arch_prctl` request for permission to use a dynamically enabled state
/// component, and AMX's tile data component: without the grant the first tile
/// instruction raises SIGILL.
const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
const XFEATURE_XTILEDATA: libc::c_ulong = 18;

/// Whether the CPU has AMX-TILE and AMX-BF16 and the OS let this process use them (asked
/// once; the grant is for the whole process).
pub(super) fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // Leaf 7 exists on every CPU with AVX-512, which kernels() checks first.
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
            if !(amx_bf16 && amx_tile) {
                return false;
            }
            #[cfg(target_os = "linux")]
            // SAFETY: a request that changes only which state components this process may
            // use; it fails cleanly where the kernel does not support AMX.
            unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
            #[cfg(not(target_os = "linux"))]
            false
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// The tile configuration: palette 1, all eight tiles 16 rows of 64 bytes (tmm0-3 the
/// sums, tmm4-5 the row tiles, tmm6-7 the panel tiles).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        // Bytes per row (u16 at 16 + 2t), rows (u8 at 48 + t).
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

/// Loads the tile configuration on this thread (before its first block).
#[cfg(target_arch = "x86_64")]
pub(super) fn configure() {
    // Also what asks the OS for the tile state, once (a cached flag after that).
    assert!(
        usable(),
        "the AMX kernel was chosen on a CPU or OS without AMX"
    );
    // SAFETY: AMX is usable (just checked); the configuration is a valid palette-1 one.
    unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
}

/// Gives the tile state back, so that the thread's context switches stop saving it.
#[cfg(target_arch = "x86_64")]
pub(super) fn release() {
    // SAFETY: as in configure.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// See [`super::BlockFn`]. `a` holds BLOCK rows of `kp` bf16, `b` two panels.
///
/// # Safety
/// AMX must be usable and [`configure`]d on this thread; `a` and `b` as documented, `out`
/// 32 rows of 32 values that no other thread touches.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn block(a: &[u16], b: &[u16], k: usize, kp: usize, out: Target) {
    debug_assert!(a.len() >= BLOCK * kp && b.len() >= 2 * PANEL * kp && kp.is_multiple_of(K_STEP));
    let row_bytes = kp * 2;
    let a0 = a.as_ptr();
    let a1 = a[PANEL * kp..].as_ptr();
    let b0 = b.as_ptr();
    let b1 = b[PANEL * kp..].as_ptr();
    // The four 16 x 16 quarters of the target, and its row stride in bytes.
    let o = out.ptr;
    // SAFETY: inside the target's 32 x 32 values (the caller's guarantee).
    let (q01, q10, q11) = unsafe {
        (
            o.add(PANEL),
            o.add(PANEL * out.row_stride),
            o.add(PANEL * out.row_stride + PANEL),
        )
    };
    let stride = out.row_stride * 4;
    // SAFETY (every statement): the loads read 16 rows of 64 bytes inside `a` (rows of
    // `row_bytes`, from column kc), `b` (k pairs kc/2.. of a panel, 64 bytes each) and the
    // target's quarters, the stores write those quarters.
    unsafe {
        if out.accumulate {
            asm!(
                "tileloadd tmm0, [{q00} + {s}*1]",
                "tileloadd tmm1, [{q01} + {s}*1]",
                "tileloadd tmm2, [{q10} + {s}*1]",
                "tileloadd tmm3, [{q11} + {s}*1]",
                q00 = in(reg) o,
                q01 = in(reg) q01,
                q10 = in(reg) q10,
                q11 = in(reg) q11,
                s = in(reg) stride,
                options(nostack, readonly)
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
        for kc in (0..k).step_by(K_STEP) {
            asm!(
                "tileloadd tmm4, [{a0} + {rs}*1]",
                "tileloadd tmm5, [{a1} + {rs}*1]",
                "tileloadd tmm6, [{b0} + {ps}*1]",
                "tileloadd tmm7, [{b1} + {ps}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(kc),
                a1 = in(reg) a1.add(kc),
                b0 = in(reg) b0.add(kc * PANEL),
                b1 = in(reg) b1.add(kc * PANEL),
                rs = in(reg) row_bytes,
                ps = in(reg) 2 * PANEL * 2,
                options(nostack, readonly)
            );
        }
        asm!(
            "tilestored [{q00} + {s}*1], tmm0",
            "tilestored [{q01} + {s}*1], tmm1",
            "tilestored [{q10} + {s}*1], tmm2",
            "tilestored [{q11} + {s}*1], tmm3",
            q00 = in(reg) o,
            q01 = in(reg) q01,
            q10 = in(reg) q10,
            q11 = in(reg) q11,
            s = in(reg) stride,
            options(nostack)
        );
    }
}

// Off x86-64 usable() is false, so nothing calls these.
#[cfg(not(target_arch = "x86_64"))]
pub(super) fn configure() {
    unreachable!("AMX is x86-64 only")
}
#[cfg(not(target_arch = "x86_64"))]
pub(super) fn release() {}
#[cfg(not(target_arch = "x86_64"))]
pub(super) unsafe fn block(_: &[u16], _: &[u16], _: usize, _: usize, _: Target) {
    unreachable!("AMX is x86-64 only")
}
