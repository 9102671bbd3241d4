//! bf16 GEMM on Intel AMX tiles: `tdpbf16ps` (AMX-BF16).
//!
//! AMX adds eight tile registers, `tmm0` to `tmm7`, of up to 16 rows of 64 bytes, and a
//! matrix unit that multiplies them. `tdpbf16ps c, a, b` reads `a` as 16 rows of 32 bf16
//! (a 16 x 32 block of A, the depth along each row) and `b` as 16 rows of 16 pairs of
//! bf16 (a 32 x 16 block of B, two consecutive depth steps of one column in each 32-bit
//! word), and adds their product to the 16 x 16 f32 tile `c`:
//! `c[i][j] += sum over p of a[i][2p] b[p][2j] + a[i][2p + 1] b[p][2j + 1]` (Intel SDM,
//! "TDPBF16PS"). Each accumulation rounds to nearest even; denormal inputs are read as
//! zero and denormal results flushed to zero, as with `vdpbf16ps` (`gemm_bf16.rs`).
//! One instruction is 8192 multiply-adds, 512 f32 FMAs of 16 lanes.
//!
//! The microkernel keeps a 32 x 32 tile of C in four f32 tiles (two by two). For every
//! 32 depth steps it loads two A tiles (rows 0-15 and 16-31) and two B tiles (columns
//! 0-15 and 16-31) and issues the four products.
//!
//! The blocked GEMM of `gemm.rs` runs around it unchanged, with one packed word per tile
//! row ([`TileRow`], 64 bytes: 32 depth steps of one lane), so that the tiles load
//! straight from the packed slivers:
//!
//! - an A sliver row is the two A tiles: word `w` is row `w` of A, its 32 bf16 in depth
//!   order; a tile is 16 consecutive words;
//! - a B sliver row is the two B tiles, row by row interleaved: word `2p + h` is row `p`
//!   of tile `h`, the pairs `(B[2p, j], B[2p + 1, j])` of its 16 columns `j`; a tile is
//!   every other word, 128 bytes apart.
//!
//! The depth is padded with zeros to whole words, rows and columns to whole slivers.
//!
//! Measured on a 2-vCPU Intel Xeon with AMX (`bench_kernels quick bf16`, in GFLOP/s,
//! against our f32 GEMM in the same run): at one thread `512^3` 628 (5.5x f32), `1024^3`
//! 518 (3.6x), `4096 x 1536 x 384` 548 (4.0x); at two threads 843, 1048 and 1245 (3.7-4.4x).
//! Other runs of these lines varied by up to 1.5x on this shared host. The same loop as
//! the microkernel, in a standalone program with its slivers in L2, ran at 600-760
//! GFLOP/s on one core. The `vdpbf16ps` kernel ran at 0.66-0.83x f32 on the same CPU: ten
//! independent chains issued 1.6 G `vdpbf16ps` per second against 6.5 G `vfmadd231ps`,
//! half the f32 FMA's multiply-adds per second.
//!
//! Linux asks a process to request the tiles' register state before its first tile
//! instruction (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`): [`is_available`]
//! asks once and uses AMX only where the CPU has it and the kernel grants it. A thread
//! configures the tiles (`ldtilecfg`) before its microkernel calls for one block of C and
//! releases them (`tilerelease`) after, so it holds no tile state between products.
//! (Configuring them in every call put 56% of the microkernel's `perf` samples on
//! `ldtilecfg` over the `bench_kernels quick bf16` lines; configuring once per block made
//! five of the six lines 1.1-1.6x faster in one pair of runs, the sixth (`512^3` at two
//! threads) 16% slower, within this host's noise. In a loop whose C stayed in L1 the
//! configure and release cost about 100 ns a call, so in the product `ldtilecfg` most
//! likely waited for the stores of the previous tile of C.)

use super::gemm::{KC, MatRef, Operand, Packing};
use half::bf16;
use std::arch::asm;
use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
use std::sync::OnceLock;

/// Tile height of the microkernel: two A tiles of 16 rows.
pub(super) const AMX_MR: usize = 32;
/// Tile width of the microkernel: two B tiles of 16 columns.
pub(super) const AMX_NR: usize = 32;

/// Depth steps in one packed word, one tile row.
const WORD_DEPTH: usize = 32;

/// One 64-byte tile row: 32 bf16, on a cache line of its own.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
pub(super) struct TileRow([bf16; WORD_DEPTH]);

/// Whether this CPU has AMX-BF16 and this process may use the tiles, checked (and asked
/// of the kernel) once.
pub(super) fn is_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| cpu_has_amx_bf16() && tile_data_granted())
}

/// CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
fn cpu_has_amx_bf16() -> bool {
    use std::arch::x86_64::{__cpuid_count, __get_cpuid_max};
    let (max_leaf, _) = __get_cpuid_max(0);
    if max_leaf < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    edx & (1 << 22) != 0 && edx & (1 << 24) != 0
}

/// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
/// XFEATURE_XTILEDATA)`); whether it was granted.
#[cfg(target_os = "linux")]
fn tile_data_granted() -> bool {
    const SYS_ARCH_PRCTL: isize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let result: isize;
    // SAFETY: the `arch_prctl` system call with this request only extends the register
    // state this process may use; it reads no memory. `syscall` overwrites rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => result,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    result == 0
}

/// Elsewhere the tile state is not requested, and AMX is not used.
#[cfg(not(target_os = "linux"))]
fn tile_data_granted() -> bool {
    false
}

/// bf16 operands packed as tile rows (see the module docs).
pub(super) struct AmxTiles;

impl Packing<bf16> for AmxTiles {
    type Word = TileRow;
    const DEPTH_PER_WORD: usize = WORD_DEPTH;
    const KC: usize = KC;

    fn pack_sliver<const W: usize>(
        x: MatRef<bf16>,
        operand: Operand,
        lane0: usize,
        lane_end: usize,
        pc: usize,
        depth: usize,
        sliver: &mut [[TileRow; W]],
    ) {
        debug_assert_eq!(sliver.len(), depth.div_ceil(WORD_DEPTH));
        let lanes = W.min(lane_end - lane0);
        if lanes < W {
            sliver.iter_mut().for_each(|row| row.fill(TileRow::default()));
        } else if !depth.is_multiple_of(WORD_DEPTH) {
            sliver.last_mut().expect("depth > 0").fill(TileRow::default());
        }
        let line_start = |w: usize| x.offset + (lane0 + w) * x.row_stride + pc * x.col_stride;
        match operand {
            Operand::A if x.col_stride == 1 => {
                // A row-major A: each word is a copy of 32 values of a row.
                for w in 0..lanes {
                    let line = &x.data[line_start(w)..][..depth];
                    for (row, values) in sliver.iter_mut().zip(line.chunks(WORD_DEPTH)) {
                        row[w].0[..values.len()].copy_from_slice(values);
                    }
                }
            }
            Operand::A => {
                for (q, row) in sliver.iter_mut().enumerate() {
                    let steps = WORD_DEPTH.min(depth - q * WORD_DEPTH);
                    for (w, word) in row.iter_mut().take(lanes).enumerate() {
                        for (s, value) in word.0.iter_mut().take(steps).enumerate() {
                            *value = x.data[line_start(w) + (q * WORD_DEPTH + s) * x.col_stride];
                        }
                    }
                }
            }
            Operand::B => {
                // Tile row `r` holds depth steps `2r` and `2r + 1` of every lane,
                // interleaved: 64 bytes per 16 lanes, so value `f = 2 W r + 2 w + s` of
                // the sliver row (lane `w`, step `s` of the pair) is in word `f / 32`.
                // With the lanes contiguous (a row-major B) each depth step is read as
                // one run of `lanes` values.
                assert!(W.is_multiple_of(16), "B slivers are whole tiles of 16 lanes");
                let lanes_contiguous = x.row_stride == 1;
                for (q, row) in sliver.iter_mut().enumerate() {
                    for step in 0..WORD_DEPTH.min(depth - q * WORD_DEPTH) {
                        let p = q * WORD_DEPTH + step;
                        let first = step / 2 * 2 * W + step % 2;
                        let mut put = |w: usize, v: bf16| {
                            let f = first + 2 * w;
                            row[f / WORD_DEPTH].0[f % WORD_DEPTH] = v;
                        };
                        if lanes_contiguous {
                            let values = &x.data[line_start(0) + p * x.col_stride..][..lanes];
                            values.iter().enumerate().for_each(|(w, &v)| put(w, v));
                        } else {
                            (0..lanes).for_each(|w| put(w, x.data[line_start(w) + p * x.col_stride]));
                        }
                    }
                }
            }
        }
    }

    fn with_microkernel_state(microkernel_calls: impl FnOnce()) {
        assert!(is_available(), "AMX tiles used where the CPU or the kernel does not allow them");
        // SAFETY: the CPU has AMX and the process holds the tile state (asserted); the
        // configuration is 64 valid bytes.
        unsafe { asm!("ldtilecfg [{config}]", config = in(reg) &TILE_CONFIG, options(nostack, preserves_flags)) };
        microkernel_calls();
        // SAFETY: as above; releasing the tiles returns them to their initial state.
        unsafe { asm!("tilerelease", options(nostack, preserves_flags)) };
    }
}

/// The tile configuration `ldtilecfg` loads (palette 1): every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

/// Tiles 0-3 hold C (16 x 16 f32), 4-5 A (16 x 32 bf16), 6-7 B (16 x 16 pairs).
static TILE_CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

// The microkernel's offsets (1024 and 64 bytes to the second A and B tile, 2048 per
// sliver row) are for 32 x 32 tiles of 64-byte words.
const _: () = assert!(size_of::<TileConfig>() == 64 && size_of::<TileRow>() == 64 && AMX_MR == 32 && AMX_NR == 32);

/// AMX microkernel: a 32 x 32 f32 tile of C in four tile registers, 32 depth steps per
/// packed word (see the module docs for the sliver layouts). Writes the tile's product
/// to `c` (`first`) or adds it; row `r` of the tile is `c[r * ldc..][..32]`.
///
/// # Safety
/// The tiles must be configured (as `AmxTiles::with_microkernel_state` does) on this
/// thread: [`is_available`] returned true and the last `ldtilecfg` loaded
/// [`TILE_CONFIG`].
///
/// # Panics
/// If `a` and `b` differ in depth or are empty, or `c` is shorter than `31 * ldc + 32`.
pub(super) unsafe fn amx_tile(
    a: &[[TileRow; AMX_MR]],
    b: &[[TileRow; AMX_NR]],
    c: &mut [f32],
    ldc: usize,
    first: bool,
) {
    assert!(a.len() == b.len() && !a.is_empty(), "amx_tile: slivers of depths {} and {}", a.len(), b.len());
    assert!(c.len() >= (AMX_MR - 1) * ldc + AMX_NR, "amx_tile: C tile out of bounds");
    let c_ptr = c.as_mut_ptr();
    let row_bytes = ldc * size_of::<f32>();
    // The tile's 64 cache lines of C on their way while the products run, so that the
    // stores at the end find them: `bench_kernels quick bf16`, three alternated runs, mean
    // 1.1-1.4x faster with this, most on the shallow `4096 x 1536 x 384`, whose C does
    // not stay in cache.
    for r in 0..AMX_MR {
        // SAFETY: row `r` of the tile, 32 values from `r * ldc`, is inside `c` (asserted);
        // a prefetch never faults.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(c_ptr.add(r * ldc).cast());
            _mm_prefetch::<_MM_HINT_T0>(c_ptr.add(r * ldc + 16).cast());
        }
    }
    // SAFETY: the tiles are configured by `TILE_CONFIG` (the caller's promise). C: rows
    // 0-15 and 16-31 (`c_low`), 16 rows `row_bytes` apart, 64 bytes each at columns 0 and
    // 16, all inside `c` (asserted). A: `a.len()` sliver rows of 2 KB, each two tiles of 16
    // rows 64 bytes apart (at 0 and 1 KB). B: as many rows of 2 KB, each two tiles of 16
    // rows 128 bytes apart (at 0 and 64). The loop runs `a.len() >= 1` times.
    unsafe {
        let c_low = c_ptr.add(16 * ldc);
        asm!(
            "test {first}, {first}",
            "jz 2f",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "jmp 3f",
            "2:",
            "tileloadd tmm0, [{c} + {row_bytes} * 1]",
            "tileloadd tmm1, [{c} + {row_bytes} * 1 + 64]",
            "tileloadd tmm2, [{c_low} + {row_bytes} * 1]",
            "tileloadd tmm3, [{c_low} + {row_bytes} * 1 + 64]",
            "3:",
            "tileloadd tmm4, [{a} + {a_stride} * 1]",
            "tileloadd tmm5, [{a} + {a_stride} * 1 + 1024]",
            "tileloadd tmm6, [{b} + {b_stride} * 1]",
            "tileloadd tmm7, [{b} + {b_stride} * 1 + 64]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 2048",
            "add {b}, 2048",
            "dec {words}",
            "jnz 3b",
            "tilestored [{c} + {row_bytes} * 1], tmm0",
            "tilestored [{c} + {row_bytes} * 1 + 64], tmm1",
            "tilestored [{c_low} + {row_bytes} * 1], tmm2",
            "tilestored [{c_low} + {row_bytes} * 1 + 64], tmm3",
            first = in(reg) usize::from(first),
            c = in(reg) c_ptr,
            c_low = in(reg) c_low,
            row_bytes = in(reg) row_bytes,
            a = inout(reg) a.as_ptr() => _,
            b = inout(reg) b.as_ptr() => _,
            a_stride = in(reg) size_of::<TileRow>(),
            b_stride = in(reg) 2 * size_of::<TileRow>(),
            words = inout(reg) a.len() => _,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm_bf16::tests::{matrix, view};

    /// Every value of a packed sliver is where the module docs put it, for both operands,
    /// the three layouts of `matrix` (row-major, column-major, neither stride 1), depths
    /// within, at and past a word, and slivers with fewer lanes than `W`.
    #[test]
    fn slivers_hold_the_tile_rows_for_every_layout() {
        const W: usize = 32;
        for operand in [Operand::A, Operand::B] {
            for layout in 0..3 {
                for depth in [1, 2, 31, 32, 33, 70] {
                    let (rows, pc) = (W + 3, 2);
                    let x = matrix(rows, depth + pc, layout, 17);
                    let x = view(&x);
                    for (lane0, lane_end) in [(0, W), (3, W + 3), (1, 20), (W, W + 1)] {
                        let mut sliver =
                            vec![[TileRow([bf16::from_f32(9.0); WORD_DEPTH]); W]; depth.div_ceil(WORD_DEPTH)];
                        AmxTiles::pack_sliver(x, operand, lane0, lane_end, pc, depth, &mut sliver);
                        for (q, row) in sliver.iter().enumerate() {
                            for w in 0..W {
                                for s in 0..WORD_DEPTH {
                                    let p = q * WORD_DEPTH + s;
                                    let want = if lane0 + w < lane_end && p < depth {
                                        x.data[x.offset + (lane0 + w) * x.row_stride + (pc + p) * x.col_stride]
                                    } else {
                                        bf16::ZERO
                                    };
                                    let got = match operand {
                                        Operand::A => row[w].0[s],
                                        Operand::B => {
                                            let f = 2 * W * (s / 2) + 2 * w + s % 2;
                                            row[f / WORD_DEPTH].0[f % WORD_DEPTH]
                                        }
                                    };
                                    assert_eq!(
                                        got.to_bits(),
                                        want.to_bits(),
                                        "{operand:?} layout {layout} depth {depth} lanes {lane0}..{lane_end}: lane {w}, step {p}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// One call of the microkernel against the tile rows' own product, writing and then
    /// adding to a C with rows wider than the tile. Skipped without AMX.
    #[test]
    fn microkernel_writes_then_adds_the_tile_product() {
        if !is_available() {
            return;
        }
        let words = 3;
        let value = |i: usize, p: usize, salt: usize| bf16::from_f32(((i * 7 + p * 3 + salt) % 11) as f32 - 5.0);
        let a: Vec<[TileRow; AMX_MR]> = (0..words)
            .map(|q| std::array::from_fn(|i| TileRow(std::array::from_fn(|s| value(i, q * WORD_DEPTH + s, 1)))))
            .collect();
        // B's row `r` of tile `h`: steps 2r, 2r + 1 of columns 16 h ..
        let b: Vec<[TileRow; AMX_NR]> = (0..words)
            .map(|q| {
                std::array::from_fn(|word| {
                    let (r, h) = (word / 2, word % 2);
                    TileRow(std::array::from_fn(|s| value(16 * h + s / 2, q * WORD_DEPTH + 2 * r + s % 2, 2)))
                })
            })
            .collect();
        let ldc = 40;
        let mut c = vec![0.5f32; AMX_MR * ldc];
        let want = |i: usize, j: usize| -> f32 {
            (0..words * WORD_DEPTH).map(|p| value(i, p, 1).to_f32() * value(j, p, 2).to_f32()).sum()
        };
        for (first, times) in [(true, 1.0), (false, 2.0)] {
            // SAFETY: the tiles are configured around the call.
            AmxTiles::with_microkernel_state(|| unsafe { amx_tile(&a, &b, &mut c, ldc, first) });
            for i in 0..AMX_MR {
                for j in 0..ldc {
                    let expected = if j < AMX_NR { times * want(i, j) } else { 0.5 };
                    assert_eq!(c[i * ldc + j], expected, "first {first}: C[{i}, {j}]");
                }
            }
        }
    }
}
