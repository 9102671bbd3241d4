//! Packed, register-blocked f32 GEMM (`C = A @ B`) in the style of BLIS.
//!
//! The algorithm is Goto & van de Geijn, "Anatomy of High-Performance Matrix
//! Multiplication" (ACM TOMS 2008), as restructured by BLIS (Van Zee & van de Geijn 2015):
//!
//! ```text
//! for jc in 0..n step NC            // columns of C and B: a panel of B lives in L3
//!   for pc in 0..k step KC          // depth: pack B[pc.., jc..] into NR-wide slivers
//!     for ic in 0..m step MC        // rows: pack A[ic.., pc..] into MR-tall slivers (L2)
//!       for jr in 0..nc step NR     // one B sliver (L1/L2) ...
//!         for ir in 0..mc step MR   // ... against every A sliver
//!           microkernel: an MR x NR tile of C, in registers, += over KC with FMA
//! ```
//!
//! Packing reads A and B through arbitrary strides (a transposed operand costs nothing
//! extra) and pads the last sliver with zeros, so the microkernel always runs a full
//! tile; only the valid part of the tile is written back to C. Packing is also where the
//! input type is widened: f16 and bf16 operands ([`GemmInput`]) are converted to f32 as
//! they are packed, so the products accumulate in f32 with the f32 microkernels and
//! nothing is converted twice (each value is packed once per use, as an f32 would be).
//! The exceptions are bf16 operands on a CPU with Intel AMX, packed as rows of the AMX
//! tiles for `tdpbf16ps` (`gemm_amx.rs`), or else with AVX512_BF16, packed as pairs of
//! bf16 for the dot-product instruction `vdpbf16ps` (`gemm_bf16.rs`): [`Bf16Path`].
//! What a packed word holds and how a sliver is filled is a `Packing`; the loops
//! below are the same for all three.
//!
//! An [`Epilogue`] (bias per output column, then an elementwise activation) is applied to
//! each column sliver of a C block right after its last depth block is computed, while
//! that part of C is still in cache: `act(A @ B + bias)` costs one pass over C, not three.
//!
//! The microkernel is chosen once per process by runtime detection: AVX-512F (14 x 32
//! with zmm), then AVX2 + FMA (6 x 16 with ymm), then a portable scalar kernel that
//! compiles on every target. The row blocks (`ic`) run in parallel on the kernels' pool
//! ([`crate::parallel`]) when the product is large.
//!
//! f32 products small or moderate enough that packing A costs more than it saves take
//! the unpacked path of `gemm_small.rs` instead (A read in place). An A that many
//! products share (a recurrent layer's weights over a sequence) can be packed once
//! ([`PackedA`], `gemm_packed_a.rs`).

#[cfg(target_arch = "x86_64")]
use super::gemm_amx::{self, AmxTiles};
#[cfg(target_arch = "x86_64")]
use super::gemm_bf16::{self, Bf16Pairs};
pub use super::gemm_packed_a::{PackedA, gemm_packed_a};
use super::gemm_small;
use super::simd::vector_lanes;
use super::transpose::transpose;
use super::unary::{UnaryOp, bias_activation_f32};
use crate::parallel;
use half::{bf16, f16};
use std::cell::Cell;
use std::sync::OnceLock;
use std::thread::LocalKey;

/// Depth of one packed block of f32 words, for products up to twice as deep; deeper ones
/// take blocks of up to twice this ([`depth_block`]). Each tile of C is read and written
/// back once per block, and each block costs a pack of B and a pass of the threads, so
/// deeper is better as long as the slivers stream from L2 (an A sliver is 28 KB, a B
/// sliver 64 KB): measured on Zen 4 at 1024^3, 2048^3 and 4096 x 384 x 1536, on 1 and 2
/// threads, 512 is 0-3% faster than 384 and 3-10% faster than 256, with the AVX-512 and
/// the AVX2 kernels. (bf16 pairs take twice the depth in the same bytes, [`Packing::KC`].)
pub(super) const KC: usize = 512;
/// Rows of A packed at once for a block of KC words (rounded to a multiple of MR), fewer
/// for deeper blocks: an MC x KC block (480 KB) stays in L2. (240 and 480 rows measured
/// the same.)
const MC: usize = 240;
/// Columns of B packed at once: a KC x NC panel stays in L3.
const NC: usize = 4096;
/// Below this many multiply-adds (`m * n * k`) the product runs on the calling thread.
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 18;
/// From this many multiply-adds on, bf16 products that the unpacked path would take run
/// packed on `vdpbf16ps` instead, where the CPU has it. Measured through `Tensor::matmul`
/// at 2 threads on Zen 4: 128^3 (2^21) 80 GFLOP/s packed, 104 widened and unpacked; 256^3
/// (2^24) 172 packed, 145 widened; 512^3 327-338 packed. The threshold sits between the
/// first two.
const BF16_DOT_MIN_WORK: usize = 1 << 22;
/// The same for the AMX tiles. On a Xeon with AMX, packed on the tiles against widened
/// and unpacked, best of 5 x 50 calls, GFLOP/s at one thread (two): `64^3` (2^18) 153
/// against 85 (82 against 50), `128^3` 251 against 104 (226 against 100), `256^3` and up
/// the same (both packed). Smaller products are not measured, and stay unpacked.
const BF16_TILES_MIN_WORK: usize = 1 << 18;
/// Below this many values a B panel is packed on the calling thread.
const PARALLEL_PACK_MIN: usize = 1 << 16;

/// The instruction sets the GEMM has a microkernel for, narrowest first (the order of
/// `<`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, any target.
    Scalar,
    /// x86-64 AVX2 + FMA: a 6 x 16 tile in twelve ymm registers.
    Avx2Fma,
    /// x86-64 AVX-512F: a 14 x 32 tile in twenty-eight zmm registers.
    Avx512,
}

impl Isa {
    /// Every ISA, slowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2Fma, Isa::Avx512];

    /// Whether this CPU can run the ISA's microkernel.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2Fma | Isa::Avx512 => false,
        }
    }

    /// The fastest available ISA, detected once per process, at most the one the
    /// environment variable [`ISA_CAP_VARIABLE`] names where it is set (`scalar`, `avx2`
    /// or `avx512`): every kernel that dispatches on the ISA then runs the narrower
    /// kernels, to compare them or reproduce another machine's rounding. A value that
    /// names no ISA is reported once on stderr and ignored.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let detected = Isa::ALL.into_iter().rev().find(|isa| isa.is_available()).unwrap_or(Isa::Scalar);
            let setting = std::env::var(ISA_CAP_VARIABLE).ok();
            Isa::capped(detected, setting.as_deref()).unwrap_or_else(|message| {
                eprintln!("aigc: {message}; using {detected:?}");
                detected
            })
        })
    }

    /// `detected` capped by the setting of [`ISA_CAP_VARIABLE`] (`None`: unset), or why
    /// the setting names no ISA.
    fn capped(detected: Isa, setting: Option<&str>) -> Result<Isa, String> {
        let Some(setting) = setting else {
            return Ok(detected);
        };
        let cap = match setting.trim().to_ascii_lowercase().as_str() {
            "scalar" => Isa::Scalar,
            "avx2" => Isa::Avx2Fma,
            "avx512" => Isa::Avx512,
            _ => {
                return Err(format!("{ISA_CAP_VARIABLE}={setting:?} is not one of scalar, avx2, avx512"));
            }
        };
        Ok(detected.min(cap))
    }
}

/// The environment variable that caps [`Isa::best`]: `AIGC_CPU_ISA=avx2` runs the AVX2
/// kernels on an AVX-512 CPU, `scalar` the portable ones. It cannot raise the ISA above
/// what the CPU has.
pub const ISA_CAP_VARIABLE: &str = "AIGC_CPU_ISA";

/// How the packed GEMM multiplies bf16 operands (f32 accumulation in every case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Path {
    /// Widened to f32 as they are packed, on the f32 microkernel.
    Widened,
    /// AVX512_BF16 `vdpbf16ps`: two depth steps per instruction (`gemm_bf16.rs`).
    DotProduct,
    /// Intel AMX tiles, `tdpbf16ps`: a 16 x 16 x 32 block per instruction (`gemm_amx.rs`).
    Tiles,
}

impl Bf16Path {
    /// Every path; [`Bf16Path::best`] takes the last one available. (The order is not
    /// always by speed: on a Xeon with AMX the dot product ran slower than widening.)
    pub const ALL: [Bf16Path; 3] = [Bf16Path::Widened, Bf16Path::DotProduct, Bf16Path::Tiles];

    /// Whether this CPU (and, for the tiles, this process) can take the path.
    pub fn is_available(self) -> bool {
        match self {
            Bf16Path::Widened => true,
            #[cfg(target_arch = "x86_64")]
            Bf16Path::DotProduct => gemm_bf16::has_dot_product(),
            #[cfg(target_arch = "x86_64")]
            Bf16Path::Tiles => Isa::Avx512.is_available() && gemm_amx::is_available(),
            #[cfg(not(target_arch = "x86_64"))]
            Bf16Path::DotProduct | Bf16Path::Tiles => false,
        }
    }

    /// The fastest path this CPU has, detected once per process.
    pub fn best() -> Bf16Path {
        static BEST: OnceLock<Bf16Path> = OnceLock::new();
        *BEST.get_or_init(|| {
            Bf16Path::ALL.into_iter().rev().find(|path| path.is_available()).unwrap_or(Bf16Path::Widened)
        })
    }

    /// The path bf16 operands take with the f32 microkernel of `isa`: the best one with
    /// AVX-512, else widened.
    fn with_isa(isa: Isa) -> Bf16Path {
        if isa == Isa::Avx512 { Bf16Path::best() } else { Bf16Path::Widened }
    }

    /// From how many multiply-adds a bf16 product that the unpacked path would take runs
    /// packed on this path instead.
    fn packed_min_work(self) -> usize {
        match self {
            Bf16Path::Widened => usize::MAX,
            Bf16Path::DotProduct => BF16_DOT_MIN_WORK,
            Bf16Path::Tiles => BF16_TILES_MIN_WORK,
        }
    }

    /// The path's name: `widened`, `vdpbf16ps` or `amx`.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Path::Widened => "widened",
            Bf16Path::DotProduct => "vdpbf16ps",
            Bf16Path::Tiles => "amx",
        }
    }
}

/// An element type the GEMM reads: f32 as it is, f16 and bf16 widened to f32 (exactly)
/// when they are packed.
pub trait GemmInput: Copy + Send + Sync + 'static {
    /// The value as an f32.
    fn to_f32(self) -> f32;

    /// `dst[i] = src[i].to_f32()` for every `i` (same lengths).
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d = s.to_f32());
    }
}

impl GemmInput for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl GemmInput for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // A bf16 is the top half of an f32.
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

impl GemmInput for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// A strided read-only matrix: element `(i, j)` is `data[offset + i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a, T = f32> {
    pub data: &'a [T],
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<T> MatRef<'_, T> {
    /// One past the index of the last value that a `rows x cols` view (both nonzero)
    /// reads in `data`.
    pub(super) fn end(&self, rows: usize, cols: usize) -> usize {
        self.offset + (rows - 1) * self.row_stride + (cols - 1) * self.col_stride + 1
    }
}

impl<T: GemmInput> MatRef<'_, T> {
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[self.offset + i * self.row_stride + j * self.col_stride].to_f32()
    }
    /// The same view when the elements are f32 (the unpacked path reads only f32).
    fn as_f32(&self) -> Option<MatRef<'_, f32>> {
        self.cast::<f32>()
    }

    /// The same view when the elements are of type `U`.
    fn cast<U: 'static>(&self) -> Option<MatRef<'_, U>> {
        let data = super::matmul::cast::<T, U>(self.data)?;
        Some(MatRef { data, offset: self.offset, row_stride: self.row_stride, col_stride: self.col_stride })
    }

    /// The same elements read as the transpose.
    pub(super) fn transposed(self) -> Self {
        MatRef { row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }
}

/// What is done to C after the product: `C = activation(A @ B + bias)`, with `bias`
/// indexed by C's column (a linear layer's bias) and `activation` one of the
/// elementwise ops with an f32 kernel ([`UnaryOp::has_f32_kernel`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    /// Added to every row of C (`n` values), if given.
    pub bias: Option<&'a [f32]>,
    /// Applied to every element after the bias, if given.
    pub activation: Option<UnaryOp>,
}

impl Epilogue<'_> {
    /// The plain product.
    pub const NONE: Epilogue<'static> = Epilogue { bias: None, activation: None };

    fn is_none(&self) -> bool {
        self.bias.is_none() && self.activation.is_none()
    }

    /// Applies the epilogue (if any) to the `rows x cols` block of `c` at column `j0`
    /// (rows `ld` apart).
    pub(super) fn apply(&self, isa: Isa, c: &mut [f32], ld: usize, rows: usize, j0: usize, cols: usize) {
        if self.is_none() {
            return;
        }
        let bias = self.bias.map(|b| &b[j0..j0 + cols]);
        bias_activation_f32(isa, &mut c[j0..], ld, rows, cols, bias, self.activation);
    }
}

/// `C = A @ B` for f32 with the fastest microkernel this CPU has.
///
/// A is `m x k` and B `k x n`, each a strided [`MatRef`]; `c` is the row-major `m x n` output and is overwritten.
///
/// # Panics
/// If `c.len() != m * n` or a strided operand reaches past its slice.
pub fn sgemm(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32]) {
    gemm(m, n, k, a, b, c, Epilogue::NONE);
}

/// `C = epilogue(A @ B)` with f32 accumulation for any [`GemmInput`] (f32, f16, bf16),
/// with the fastest microkernel this CPU has. Shapes as in [`sgemm`].
///
/// # Panics
/// As [`sgemm`]; also if the bias does not hold `n` values or the activation has no f32
/// kernel.
pub fn gemm<T: GemmInput>(m: usize, n: usize, k: usize, a: MatRef<T>, b: MatRef<T>, c: &mut [f32], epilogue: Epilogue) {
    gemm_with_isa(Isa::best(), m, n, k, a, b, c, epilogue);
}

/// [`gemm`] with an explicit microkernel, for testing each ISA path.
///
/// # Panics
/// If `isa` is not available on this CPU, and as [`gemm`].
#[allow(clippy::too_many_arguments)] // the BLAS argument list: sizes, operands, output, epilogue
pub fn gemm_with_isa<T: GemmInput>(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<T>,
    b: MatRef<T>,
    c: &mut [f32],
    epilogue: Epilogue,
) {
    assert!(isa.is_available(), "gemm: {isa:?} is not supported by this CPU");
    if without_products(isa, [m, n, k], c, epilogue) {
        return;
    }
    if gemm_small::is_faster_unpacked(isa, [m, n, k], parallel::threads(), a.col_stride == 1) {
        if let (Some(a32), Some(b32)) = (a.as_f32(), b.as_f32()) {
            gemm_small::small_sgemm(isa, m, n, k, a32, b32, c, epilogue);
            return;
        }
        // f16/bf16: the unpacked path reads f32, so the operands are widened first when
        // their views are compact (a copy of `m k + k n` values, small next to the
        // `m n k` multiply-adds; the packed path's packing costs more at these sizes),
        // unless the packed path multiplies bf16 on the dot product or the AMX tiles.
        let packed_pays = a.cast::<bf16>().is_some() && m * n * k >= Bf16Path::with_isa(isa).packed_min_work();
        if !packed_pays && let (Some(a_wide), Some(b_wide)) = (widened_span(a, m, k), widened_span(b, k, n)) {
            let a32 = MatRef { data: &a_wide, offset: 0, row_stride: a.row_stride, col_stride: a.col_stride };
            let b32 = MatRef { data: &b_wide, offset: 0, row_stride: b.row_stride, col_stride: b.col_stride };
            gemm_small::small_sgemm(isa, m, n, k, a32, b32, c, epilogue);
            crate::buffers::recycle(a_wide);
            crate::buffers::recycle(b_wide);
            return;
        }
    }
    packed_gemm(isa, m, n, k, a, b, c, epilogue);
}

/// Checks the output's length and the epilogue for an `m x n x k` product, then does
/// the whole product if it has no multiply-adds: nothing when C is empty, C set to the
/// epilogue of zeros when `k` is 0. Returns whether it did (whether the caller is done).
///
/// # Panics
/// If `c` does not hold `m * n` values, the bias `n`, or the activation has no f32 kernel.
pub(super) fn without_products(isa: Isa, [m, n, k]: [usize; 3], c: &mut [f32], epilogue: Epilogue) -> bool {
    assert_eq!(c.len(), m * n, "gemm: output holds {} values, expected m * n = {m} * {n}", c.len());
    if let Some(bias) = epilogue.bias {
        assert_eq!(bias.len(), n, "gemm: the bias holds {} values, expected one per column (n = {n})", bias.len());
    }
    if let Some(op) = epilogue.activation {
        assert!(op.has_f32_kernel(), "gemm: the activation {} has no f32 kernel", op.name());
    }
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        c.fill(0.0);
        epilogue.apply(isa, c, n, m, 0, n);
        return true;
    }
    false
}

/// The values a `rows x cols` view spans in its buffer, widened to f32 (a buffer from the
/// cache): what the unpacked path reads, with the view's strides from offset 0, instead
/// of a half-precision view. `None` when the span holds more than twice the view's values
/// (a narrow window of a large buffer: widening it all would cost more than the product).
fn widened_span<T: GemmInput>(x: MatRef<T>, rows: usize, cols: usize) -> Option<Vec<f32>> {
    let span = x.end(rows, cols) - x.offset;
    if span > 2 * rows * cols {
        return None;
    }
    let mut wide = crate::buffers::for_overwrite(span);
    T::widen(&x.data[x.offset..x.offset + span], &mut wide);
    Some(wide)
}

/// The packed path of [`gemm_with_isa`] for a product with `m`, `n` and `k` nonzero (the
/// arguments already checked): transposed when its rows are few
/// ([`computed_transposed`]), else [`blocked_gemm`] with the ISA's microkernel.
#[allow(clippy::too_many_arguments)] // as gemm_with_isa
fn packed_gemm<T: GemmInput>(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<T>,
    b: MatRef<T>,
    c: &mut [f32],
    epilogue: Epilogue,
) {
    if computed_transposed(isa, [m, n, k], depth_contiguous(a, b)) {
        // C^T = B^T A^T has n rows, which split evenly across the threads; C is its
        // transpose (m * n values, few next to the product's work). The transposed product
        // takes the whole dispatch: with one column block it streams B^T unpacked.
        let mut transposed = crate::buffers::for_overwrite(m * n);
        gemm_with_isa(isa, n, m, k, b.transposed(), a.transposed(), &mut transposed, Epilogue::NONE);
        // C's rows in one part per thread, each the transpose of its columns of C^T in
        // 8 x 8 blocks (every line of C^T read once per part): column by column, each of
        // C's rows read every line of C^T (`27 x 65536 x 16`, a transposed convolution's
        // product, ran 2x slower on two threads than on one).
        let rows_per_part = m.div_ceil(parallel::threads()).next_multiple_of(8);
        parallel::for_each_chunk_mut(c, rows_per_part * n, |part, c_rows| {
            let rows = c_rows.len() / n;
            transpose(isa, &transposed[part * rows_per_part..], m, c_rows, n, [n, rows]);
            epilogue.apply(isa, c_rows, n, rows, 0, n);
        });
        crate::buffers::recycle(transposed);
        return;
    }
    let problem = Problem { dims: Dims { m, n, k }, isa, epilogue };
    if let (Some(a), Some(b)) = (a.cast::<bf16>(), b.cast::<bf16>()) {
        blocked_bf16_gemm(Bf16Path::with_isa(isa), problem, a, b, c);
        return;
    }
    widened_blocked_gemm(problem, Left::Strided(a), b, c);
}

/// [`blocked_gemm`] on bf16 operands by `path` (the problem's ISA is the f32
/// microkernel's for [`Bf16Path::Widened`]).
///
/// # Panics
/// If this CPU cannot take `path`.
pub(super) fn blocked_bf16_gemm(path: Bf16Path, problem: Problem, a: MatRef<bf16>, b: MatRef<bf16>, c: &mut [f32]) {
    assert!(path.is_available(), "gemm: the bf16 path {path:?} is not supported by this CPU");
    match path {
        Bf16Path::Widened => widened_blocked_gemm(problem, Left::Strided(a), b, c),
        #[cfg(target_arch = "x86_64")]
        Bf16Path::DotProduct => {
            let kernel = gemm_bf16::avx512_bf16_tile;
            blocked_gemm::<bf16, Bf16Pairs, { x86::AVX512_MR }, { x86::AVX512_NR }>(
                kernel,
                problem,
                Left::Strided(a),
                b,
                c,
            );
        }
        #[cfg(target_arch = "x86_64")]
        Bf16Path::Tiles => {
            let kernel = gemm_amx::amx_tile;
            blocked_gemm::<bf16, AmxTiles, { gemm_amx::AMX_MR }, { gemm_amx::AMX_NR }>(
                kernel,
                problem,
                Left::Strided(a),
                b,
                c,
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        Bf16Path::DotProduct | Bf16Path::Tiles => unreachable!("not available off x86-64"),
    }
}

/// [`blocked_gemm`] with the f32 microkernel of `problem.isa`, every operand widened to f32
/// as it is packed (or already packed so, [`Left::Packed`]).
pub(super) fn widened_blocked_gemm<T: GemmInput>(problem: Problem, a: Left<T, f32>, b: MatRef<T>, c: &mut [f32]) {
    match problem.isa {
        Isa::Scalar => blocked_gemm::<T, Widened, SCALAR_MR, SCALAR_NR>(scalar_tile, problem, a, b, c),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => {
            blocked_gemm::<T, Widened, { x86::AVX2_MR }, { x86::AVX2_NR }>(x86::avx2_tile, problem, a, b, c)
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            blocked_gemm::<T, Widened, { x86::AVX512_MR }, { x86::AVX512_NR }>(x86::avx512_tile, problem, a, b, c)
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2Fma | Isa::Avx512 => unreachable!("checked by is_available"),
    }
}

/// The f32 microkernel's tile for `isa`: `[rows, columns]`, the heights of its A
/// slivers and the widths of its B slivers.
pub(super) fn tile_shape(isa: Isa) -> [usize; 2] {
    match isa {
        Isa::Scalar => [SCALAR_MR, SCALAR_NR],
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => [x86::AVX2_MR, x86::AVX2_NR],
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => [x86::AVX512_MR, x86::AVX512_NR],
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2Fma | Isa::Avx512 => [SCALAR_MR, SCALAR_NR],
    }
}

/// Whether a product of more columns than rows, too big for one thread, is better
/// computed transposed (`C^T = B^T A^T`), because its rows are few:
///
/// - too few to split evenly across the threads (fewer than four row tiles per thread):
///   row blocks are whole tiles, so 16 rows on 2 threads would split 6 + 10 with AVX2's
///   tiles of 6 rows, 14 + 2 with AVX-512's of 14 (one recurrent step of a batch of 16; a
///   decoding step has 1 row), while the transposed product's rows split evenly;
/// - or, on any number of threads, at most two vectors of them, when the transposed
///   product, one column block, then streams `B^T` unpacked instead of packing `B` (see
///   `gemm_small::is_faster_unpacked`). Past the unpacked depth limit the transposed
///   product would be packed again: transposing there too made a one-thread LSTM's
///   backward (whose `d_h W_hh` is `16 x 512 x 2048`) 12% slower per call.
///
/// Measured at one thread on Zen 3 (AVX2), GFLOP/s before -> after the second rule:
/// `16 x 2048 x 512` (`h W^T`, `W` row-major) 56 -> 90, the same with a row-major B
/// 50 -> 65, `8 x 1024 x 1024` 38 -> 69, `1 x 4096 x 1024` 5.0 -> 8.2; training at one
/// thread (`rnn_shakespeare`, 512 hidden) RNN 54 -> 66 it/s, LSTM 14.5 -> 16.1-16.3.
fn computed_transposed(isa: Isa, [m, n, k]: [usize; 3], [_, b_columns]: [bool; 2]) -> bool {
    let threads = parallel::threads();
    let split_needs_it = threads > 1 && m < 4 * threads * tile_shape(isa)[0];
    let streams_unpacked =
        m <= 2 * vector_lanes(isa) && gemm_small::is_faster_unpacked(isa, [n, m, k], threads, b_columns);
    m * n * k >= PARALLEL_MIN_WORK && n > m && (split_needs_it || streams_unpacked)
}

/// Whether A's rows and B's columns, the lines along the depth, are contiguous. (For the
/// transposed product `B^T A^T` the same two, swapped.)
fn depth_contiguous<T>(a: MatRef<T>, b: MatRef<T>) -> [bool; 2] {
    [a.col_stride == 1, b.row_stride == 1]
}

/// Whether [`gemm`] would pack an f32 `m x n x k` product's operands with `isa`'s tiles
/// on this many threads (rather than stream A unpacked, `gemm_small.rs`), and if so
/// whether it would compute the product transposed ([`computed_transposed`]): `None`,
/// `Some(false)` or `Some(true)`. `depth_contiguous`: whether A's rows and B's columns
/// are contiguous.
pub(super) fn packed_route(isa: Isa, [m, n, k]: [usize; 3], depth_contiguous: [bool; 2]) -> Option<bool> {
    let threads = parallel::threads();
    let [a_rows, b_columns] = depth_contiguous;
    if m == 0 || n == 0 || k == 0 || gemm_small::is_faster_unpacked(isa, [m, n, k], threads, a_rows) {
        None
    } else if computed_transposed(isa, [m, n, k], depth_contiguous) {
        (!gemm_small::is_faster_unpacked(isa, [n, m, k], threads, b_columns)).then_some(true)
    } else {
        Some(false)
    }
}

/// The problem size: `C (m x n) = A (m x k) @ B (k x n)`.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// One product: its size, the ISA of its microkernel (also used by the epilogue) and the
/// epilogue.
#[derive(Clone, Copy)]
pub(super) struct Problem<'a> {
    pub dims: Dims,
    pub isa: Isa,
    pub epilogue: Epilogue<'a>,
}

/// Where [`blocked_gemm`] reads A.
#[derive(Clone, Copy)]
pub(super) enum Left<'a, T, W> {
    /// A strided matrix, packed one block at a time as the product runs.
    Strided(MatRef<'a, T>),
    /// A packed ahead for the product's microkernel (`gemm_packed_a.rs`): for each depth
    /// block of `block_depth` steps in turn (the last one shorter where it must be), the
    /// slivers of all `m` rows, laid out as [`pack_a`] lays out one block's.
    Packed { words: &'a [W], block_depth: usize },
}

/// A microkernel: the MR x NR tile `T = sum over p of a[p] (outer) b[p]` (with
/// `a.len() == b.len()`, the depth) is written to `c` (`first`) or added to it: row `r`
/// of the tile is `c[r * ldc..][..NR]`.
///
/// `unsafe` because the SIMD kernels require their CPU features, which [`gemm_with_isa`]
/// and [`blocked_bf16_gemm`] check before choosing one, and the AMX kernel the tile
/// configuration that its packing's [`Packing::with_microkernel_state`] sets up around
/// the calls.
///
/// # Panics
/// If `c` is shorter than `(MR - 1) * ldc + NR`.
type Microkernel<W, const MR: usize, const NR: usize> =
    unsafe fn(a: &[[W; MR]], b: &[[W; NR]], c: &mut [f32], ldc: usize, first: bool);

/// How an operand is packed for a microkernel: what one packed word holds and how a
/// sliver is filled from a strided matrix of `T`.
pub(super) trait Packing<T: GemmInput> {
    /// One packed word: an f32 (one depth step), or two bf16 of consecutive depth steps.
    type Word: PackedWord;
    /// Depth steps per word.
    const DEPTH_PER_WORD: usize;
    /// Depth of one packed block, in depth steps (a multiple of `DEPTH_PER_WORD`).
    const KC: usize;

    /// Fills `sliver` (`depth.div_ceil(DEPTH_PER_WORD)` words deep) with the words of
    /// `x[lane0 + w, pc..pc + depth]` for the lanes `w` below `lane_end`, zeros past them
    /// (rows of `x` are the sliver's lanes, its columns the depth), and zeros for the
    /// depth steps past `depth` in the last word. `operand` says which of the product's
    /// operands `x` is (the AMX tiles lay out A and B differently).
    fn pack_sliver<const W: usize>(
        x: MatRef<T>,
        operand: Operand,
        lane0: usize,
        lane_end: usize,
        pc: usize,
        depth: usize,
        sliver: &mut [[Self::Word; W]],
    );

    /// Runs `microkernel_calls` (one thread's calls for one block of C) with the state the
    /// microkernel needs: nothing for the vector kernels, the tile configuration for AMX.
    fn with_microkernel_state(microkernel_calls: impl FnOnce()) {
        microkernel_calls();
    }
}

/// Which operand of `C = A @ B` a sliver is packed from: its lanes are A's rows or B's
/// columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Operand {
    /// The left operand: a sliver's lanes are rows of A.
    A,
    /// The right operand: a sliver's lanes are columns of B.
    B,
}

/// A packed word type, with this thread's packing buffers for it.
pub(super) trait PackedWord: Copy + Default + Send + Sync + 'static {
    /// This thread's buffers: `[packed A blocks, packed B panels]`.
    fn buffers() -> [&'static LocalKey<Cell<Vec<Self>>>; 2];
}

/// Implements [`PackedWord`] with a pair of thread-local buffers of the type.
macro_rules! packed_word {
    ($($word:ty),*) => {$(
        impl PackedWord for $word {
            fn buffers() -> [&'static LocalKey<Cell<Vec<$word>>>; 2] {
                thread_local! {
                    static PACKED_A: Cell<Vec<$word>> = const { Cell::new(Vec::new()) };
                    static PACKED_B: Cell<Vec<$word>> = const { Cell::new(Vec::new()) };
                }
                [&PACKED_A, &PACKED_B]
            }
        }
    )*};
}
// f32 for the f32 microkernels, u32 for bf16 pairs, tile rows for AMX.
packed_word!(f32, u32);
#[cfg(target_arch = "x86_64")]
packed_word!(gemm_amx::TileRow);

/// Every input widened to one f32 per depth step, for the f32 microkernels.
pub(super) struct Widened;

impl<T: GemmInput> Packing<T> for Widened {
    type Word = f32;
    const DEPTH_PER_WORD: usize = 1;
    const KC: usize = KC;

    fn pack_sliver<const W: usize>(
        x: MatRef<T>,
        _: Operand,
        lane0: usize,
        lane_end: usize,
        pc: usize,
        depth: usize,
        sliver: &mut [[f32; W]],
    ) {
        debug_assert_eq!(depth, sliver.len());
        pack_sliver(x, lane0, lane_end, pc, sliver);
    }
}

/// The five-loop blocked GEMM around one microkernel, its operands packed as `P` says
/// (see the module docs).
fn blocked_gemm<T: GemmInput, P: Packing<T>, const MR: usize, const NR: usize>(
    kernel: Microkernel<P::Word, MR, NR>,
    Problem { dims: Dims { m, n, k }, isa, epilogue }: Problem,
    a: Left<T, P::Word>,
    b: MatRef<T>,
    c: &mut [f32],
) {
    let parallel = m * n * k >= PARALLEL_MIN_WORK;
    let threads = if parallel { parallel::threads() } else { 1 };
    // Split the rows into blocks of at most MC rows, as many blocks as a multiple of the
    // threads, each of whole A slivers and as even as whole slivers allow (so that every
    // thread gets the same number of rows, give or take a sliver).
    let block_depth = match a {
        Left::Strided(_) => depth_block(k, P::KC, P::DEPTH_PER_WORD, threads > 1),
        Left::Packed { block_depth, .. } => block_depth,
    };
    // As many rows as keep the packed A block within the bytes of MC x KC f32 words.
    let block_bytes = block_depth.div_ceil(P::DEPTH_PER_WORD) * size_of::<P::Word>();
    let mc_max = (MC * KC * size_of::<f32>() / block_bytes).max(MR);
    let blocks = m.div_ceil(mc_max).next_multiple_of(threads);
    // The packing buffers are reused from call to call (one per thread): a fresh
    // allocation would fault its pages in on every call, and its first writes miss.
    let [packed_a_buffer, packed_b_buffer] = P::Word::buffers();
    let mut packed_b = packed_b_buffer.take();
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(block_depth) {
            let kc = block_depth.min(k - pc);
            let words = kc.div_ceil(P::DEPTH_PER_WORD);
            let last_depth_block = pc + kc == k;
            let b_slivers = pack_b::<T, P, NR>(b, pc, kc, jc, nc, &mut packed_b, parallel);
            let block = |ic: usize, c_rows: &mut [f32]| {
                let rows = c_rows.len() / n;
                if rows == 0 {
                    return; // more blocks than slivers (a product of few rows on many threads)
                }
                let mut packed_a = packed_a_buffer.take();
                let a_slivers = match a {
                    Left::Strided(a) => pack_a::<T, P, MR>(a, ic, rows, pc, kc, &mut packed_a),
                    Left::Packed { words: all, .. } => {
                        // Depth block `pc`, from sliver `ic / MR` (`ic` is whole slivers).
                        let start = (m.div_ceil(MR) * pc / P::DEPTH_PER_WORD + ic / MR * words) * MR;
                        all[start..][..rows.div_ceil(MR) * words * MR].as_chunks::<MR>().0
                    }
                };
                let mut edge = [[0.0f32; NR]; MR];
                P::with_microkernel_state(|| {
                    for (jr, b_sliver) in b_slivers.chunks_exact(words).enumerate() {
                        for (ir, a_sliver) in a_slivers.chunks_exact(words).enumerate() {
                            let (i0, j0) = (ir * MR, jc + jr * NR);
                            let (tile_rows, tile_cols) = (MR.min(rows - i0), NR.min(jc + nc - j0));
                            if tile_rows == MR && tile_cols == NR {
                                // SAFETY: `kernel` comes from `gemm_with_isa` or `blocked_bf16_gemm`,
                                // which checked that the CPU has its features, and runs inside
                                // `P::with_microkernel_state`; the slivers have the same depth.
                                unsafe { kernel(a_sliver, b_sliver, &mut c_rows[i0 * n + j0..], n, pc == 0) };
                                continue;
                            }
                            // A tile over the edge of C: computed into a full-size scratch tile,
                            // then its valid part is stored.
                            // SAFETY: as above; `edge` holds (MR - 1) * NR + NR values.
                            unsafe { kernel(a_sliver, b_sliver, edge.as_flattened_mut(), NR, true) };
                            for (r, tile_row) in edge.iter().take(tile_rows).enumerate() {
                                let c_row = &mut c_rows[(i0 + r) * n + j0..][..tile_cols];
                                store_tile_row(c_row, &tile_row[..tile_cols], pc == 0);
                            }
                        }
                    }
                });
                if last_depth_block && !epilogue.is_none() {
                    epilogue.apply(isa, c_rows, n, rows, jc, nc);
                }
                packed_a_buffer.set(packed_a);
            };
            if parallel {
                parallel::for_each_part_mut(c, MR * n, blocks, |offset, c_rows| block(offset / n, c_rows));
            } else {
                // The same blocks as `for_each_part_mut` makes, on this thread.
                let block_start = |index: usize| index * m.div_ceil(MR) / blocks * MR;
                for index in 0..blocks {
                    let rows = block_start(index)..block_start(index + 1).min(m);
                    block(rows.start, &mut c[rows.start * n..rows.end * n]);
                }
            }
        }
    }
    packed_b_buffer.set(packed_b);
}

/// `buffer` grown to hold `slivers` slivers of `depth` words of `W` lanes, viewed as such,
/// from its first word on a 64-byte boundary (a cache line: a sliver row of whole lines
/// is then loaded without a line split; large allocations start 16 bytes past one here,
/// glibc's chunk header). The values are left as they were: packing writes every lane,
/// padding included.
pub(super) fn sliver_buffer<D: PackedWord, const W: usize>(
    buffer: &mut Vec<D>,
    slivers: usize,
    depth: usize,
) -> &mut [[D; W]] {
    let len = slivers * depth * W;
    let slack = CACHE_LINE.div_ceil(size_of::<D>());
    if buffer.len() < len + slack {
        buffer.resize(len + slack, D::default());
    }
    // `align_offset` may give up (`usize::MAX`): then the words start where the buffer does.
    let offset = buffer.as_ptr().align_offset(CACHE_LINE);
    let start = if offset <= slack { offset } else { 0 };
    buffer[start..start + len].as_chunks_mut::<W>().0
}

/// Bytes in a cache line.
const CACHE_LINE: usize = 64;

/// The depth of the blocks of a product of depth `k`, given the packing's block depth
/// `kc` ([`Packing::KC`]; a multiple of `per_word`, its depth steps per word): as few
/// blocks as cover `k`, of equal depth (a multiple of `per_word`; the last one shorter
/// where it must be), at most `kc` deep, or at most `2 kc` when `k > 2 kc` and the
/// product runs on several threads (`shared`).
///
/// The deeper blocks halve the passes over C, the packs of B and the threads' meetings of
/// a deep product; a shallower one keeps its B slivers within L1. Measured on Zen 3 (AVX2,
/// GFLOP/s) against blocks of at most `kc` (512): two threads, alternating binaries, best
/// of 12: `2048^3` 182-183 -> 187, the same with B column-major 184-185 -> 189-191,
/// `512 x 128 x 768` 159-160 -> 163.5-164.2 (the even split), `1024 x 1024 x 2048`
/// 181-182 -> 177-178 (the one loss); `bench_kernels sgemm` (medians, raced against the
/// `gemm` crate) `2048^3` 177-178 -> 182.5-185, `4096 x 384 x 1536` 169-178 -> 186-187.
/// At one thread the same deeper blocks ran 1.5-2.8% faster in the best-of-12 loops but
/// 2-2.5% slower in `bench_kernels` (`2048^3` 90.3-91.6 -> 88.1-89.0), so one thread keeps
/// `kc`. Blocks of up to 1024 for a product of depth 768 lost 2-5% at one thread
/// (`128 x 128 x 768`, `512 x 128 x 768`: weight gradients, B slivers past L1).
pub(super) fn depth_block(k: usize, kc: usize, per_word: usize, shared: bool) -> usize {
    let max = if shared && k > 2 * kc { 2 * kc } else { kc };
    let blocks = k.div_ceil(max).max(1);
    k.div_ceil(blocks).next_multiple_of(per_word).max(per_word)
}

/// Writes (first depth block) or accumulates (later blocks) one row of a tile into C.
fn store_tile_row(c_row: &mut [f32], tile_row: &[f32], first: bool) {
    if first {
        // A loop rather than `copy_from_slice`: rows are short, a `memmove` call costs more.
        c_row.iter_mut().zip(tile_row).for_each(|(c, &t)| *c = t);
    } else {
        c_row.iter_mut().zip(tile_row).for_each(|(c, t)| *c += t);
    }
}

/// Packs `B[pc..pc + kc, jc..jc + nc]` into NR-wide slivers of `kc` depth steps each
/// (as words of `P`), zero-padded past column `nc`, in `buffer`: sliver `s`, word `p`
/// holds `B[pc + p, jc + s * NR ..][..NR]` (one depth step per word).
pub(super) fn pack_b<'buf, T: GemmInput, P: Packing<T>, const NR: usize>(
    b: MatRef<T>,
    pc: usize,
    kc: usize,
    jc: usize,
    nc: usize,
    buffer: &'buf mut Vec<P::Word>,
    parallel: bool,
) -> &'buf [[P::Word; NR]] {
    let words = kc.div_ceil(P::DEPTH_PER_WORD);
    let packed = sliver_buffer::<P::Word, NR>(buffer, nc.div_ceil(NR), words);
    // A B sliver is a sliver of B^T: lanes are B's columns, depth runs down B's rows.
    pack_slivers::<T, P, NR>(b.transposed(), Operand::B, jc..jc + nc, pc, kc, packed, parallel);
    packed
}

/// Packs `A[ic..ic + mc, pc..pc + kc]` into MR-tall slivers of `kc` depth steps each (as
/// words of `P`), zero-padded past row `mc`, in `buffer`: sliver `s`, word `p` holds
/// `A[ic + s * MR ..][..MR, pc + p]` (one depth step per word).
fn pack_a<'buf, T: GemmInput, P: Packing<T>, const MR: usize>(
    a: MatRef<T>,
    ic: usize,
    mc: usize,
    pc: usize,
    kc: usize,
    buffer: &'buf mut Vec<P::Word>,
) -> &'buf [[P::Word; MR]] {
    let words = kc.div_ceil(P::DEPTH_PER_WORD);
    let packed = sliver_buffer::<P::Word, MR>(buffer, mc.div_ceil(MR), words);
    pack_slivers::<T, P, MR>(a, Operand::A, ic..ic + mc, pc, kc, packed, false);
    packed
}

/// Fills `slivers` (whole slivers of `kc.div_ceil(DEPTH_PER_WORD)` words each) with the
/// rows `lanes` of `x` (the slivers' lanes, `W` per sliver, zero past the range) at the
/// depth steps `pc..pc + kc` (`x`'s columns), on every thread when `parallel` and the
/// slivers are large enough.
pub(super) fn pack_slivers<T: GemmInput, P: Packing<T>, const W: usize>(
    x: MatRef<T>,
    operand: Operand,
    lanes: std::ops::Range<usize>,
    pc: usize,
    kc: usize,
    slivers: &mut [[P::Word; W]],
    parallel: bool,
) {
    let words = kc.div_ceil(P::DEPTH_PER_WORD);
    let pack = |s: usize, sliver: &mut [[P::Word; W]]| {
        P::pack_sliver(x, operand, lanes.start + s * W, lanes.end, pc, kc, sliver)
    };
    if parallel && slivers.len() * W >= PARALLEL_PACK_MIN {
        parallel::for_each_chunk_mut(slivers, words, pack);
    } else {
        slivers.chunks_mut(words).enumerate().for_each(|(s, sliver)| pack(s, sliver));
    }
}

/// Fills `sliver[p][w] = x[lane0 + w, pc + p]` for the lanes below `lane_end` and zeros
/// the rest: rows of `x` are the sliver's lanes, its columns the depth. The loop order
/// follows the operand's layout so that the reads are contiguous when either stride is 1.
fn pack_sliver<T: GemmInput, const W: usize>(
    x: MatRef<T>,
    lane0: usize,
    lane_end: usize,
    pc: usize,
    sliver: &mut [[f32; W]],
) {
    let (lanes, depth) = (W.min(lane_end - lane0), sliver.len());
    #[cfg(target_arch = "x86_64")]
    if x.col_stride == 1
        && W <= x86::PACK_MAX_LANES
        && let Some(data) = super::matmul::cast::<T, f32>(x.data)
        && Isa::Avx2Fma.is_available()
    {
        // Depth is contiguous and the values are f32: transpose 8 x 8 blocks in registers.
        let mut lines = [&data[..0]; x86::PACK_MAX_LANES];
        for (w, line) in lines.iter_mut().take(lanes).enumerate() {
            *line = &data[x.offset + (lane0 + w) * x.row_stride + pc..][..depth];
        }
        // SAFETY: the CPU has AVX2 (checked above); `lines` holds `lanes <= W` lines of
        // `depth` values each, as the function requires. It zeroes the padding lanes too.
        unsafe { x86::pack_lines_avx2(&lines[..lanes], sliver, |line, p| line[p]) };
        return;
    }
    if lanes < W {
        sliver.iter_mut().for_each(|row| row[lanes..].fill(0.0));
    }
    if x.col_stride == 1 && lanes == W {
        // Depth is contiguous (a row-major A, or a B that is a transposed row-major
        // matrix): read the W lines side by side, so that each sliver row is written
        // whole (the lines stream through L1 together).
        let line = |w: usize| &x.data[x.offset + (lane0 + w) * x.row_stride + pc..][..depth];
        let lines: [&[T]; W] = std::array::from_fn(line);
        for (p, dst) in sliver.iter_mut().enumerate() {
            for (d, l) in dst.iter_mut().zip(&lines) {
                *d = l[p].to_f32();
            }
        }
    } else if x.col_stride == 1 {
        // The same with fewer lanes (the last sliver), line by line.
        for w in 0..lanes {
            let start = x.offset + (lane0 + w) * x.row_stride + pc;
            for (dst, &v) in sliver.iter_mut().zip(&x.data[start..start + depth]) {
                dst[w] = v.to_f32();
            }
        }
    } else if x.row_stride == 1 {
        // The lanes are contiguous (a row-major B, or a transposed A): each sliver row
        // is one slice (for f32 a copy of a length known at compile time when the sliver
        // is whole: vector moves; the element-by-element loop this replaces stayed scalar,
        // and packing B took 5.8% of a 256^3 product at one thread).
        for (p, dst) in sliver.iter_mut().enumerate() {
            let start = x.offset + lane0 + (pc + p) * x.col_stride;
            if lanes == W {
                T::widen(&x.data[start..start + W], dst);
            } else {
                T::widen(&x.data[start..start + lanes], &mut dst[..lanes]);
            }
        }
    } else {
        for (p, dst) in sliver.iter_mut().enumerate() {
            for (w, v) in dst.iter_mut().take(lanes).enumerate() {
                *v = x.at(lane0 + w, pc + p);
            }
        }
    }
}

/// Tile height of the portable kernel.
pub(super) const SCALAR_MR: usize = 4;
/// Tile width of the portable kernel.
const SCALAR_NR: usize = 8;

/// The portable microkernel: plain multiply-adds the compiler may vectorise.
fn scalar_tile(a: &[[f32; SCALAR_MR]], b: &[[f32; SCALAR_NR]], c: &mut [f32], ldc: usize, first: bool) {
    let mut tile = [[0.0f32; SCALAR_NR]; SCALAR_MR];
    for (a_col, b_row) in a.iter().zip(b) {
        for (tile_row, &a_val) in tile.iter_mut().zip(a_col) {
            for (t, &b_val) in tile_row.iter_mut().zip(b_row) {
                *t += a_val * b_val;
            }
        }
    }
    for (r, tile_row) in tile.iter().enumerate() {
        store_tile_row(&mut c[r * ldc..][..SCALAR_NR], tile_row, first);
    }
}

/// The x86-64 SIMD microkernels.
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// Tile height of the AVX2 kernel.
    pub const AVX2_MR: usize = 6;
    /// Tile width of the AVX2 kernel: two ymm registers of 8 lanes.
    pub const AVX2_NR: usize = 16;
    /// Tile height of the AVX-512 kernel.
    pub const AVX512_MR: usize = 14;
    /// Tile width of the AVX-512 kernel: two zmm registers of 16 lanes.
    pub const AVX512_NR: usize = 32;

    /// Defines a microkernel whose tile row is two vector registers of `$lanes` f32
    /// lanes: for each packed word of depth, load the B row (two vectors), then for each
    /// of the MR rows broadcast the A word and multiply-add it into the row's two
    /// accumulators. The C rows are prefetched first, so that their cache misses overlap
    /// the multiply-adds instead of stalling the final read-add-write: every line of each
    /// row, its first and last values and the one a vector on (a row of two AVX-512
    /// vectors spans three lines where it does not start on one, as in a buffer from
    /// `malloc`, 16 bytes past a page). Asking for the first and last values only, C
    /// 16 bytes past a 2 MB boundary against on it (same process, median GFLOP/s, one
    /// thread / two) ran `4096 x 384 x 1536` at 139.4-139.9 / 277 against 148.9-149.3 /
    /// 292-302, and `2048^3` at 148-149 / 291-296 against 152.8-153.0 / 309-310; with the
    /// middle line too, 144.0-148.5 / 293-297 and 150.8-152.4 / 306-308 (aligned C the
    /// same either way).
    ///
    /// With `$ahead > 0`, each depth step also asks for the A and B words `$ahead` steps
    /// on (the start of A's word and both ends of B's row). The slivers stream from L2
    /// (a 64 KB B sliver does not stay in L1 beside the A sliver), and the traffic around
    /// them slows that stream: called back to back on the same 17 A slivers and B sliver
    /// (as in a block), the AVX-512 kernel ran at 83-86% of the FMA peak, at 77% with its
    /// C tiles spread over a 1 MB block, 68% over 4 MB, 71% with a new B sliver per
    /// column of tiles, and about 72% inside a `1024^3` product (its 81% share of perf's
    /// samples). Eight steps ahead, the two
    /// orders alternated in one process on a Xeon with AMX and 480 MB of L3, median GFLOP/s
    /// without -> with, one thread / two: AVX-512 `1024^3` 111.3 -> 119.1 / 226 -> 244,
    /// `2048^3` 108.5 -> 113.9 / 231 -> 254, `4096 x 384 x 1536` 113.5 -> 114.5 / 247 ->
    /// 254; AVX2 `1024^3` 65.9 -> 67.9 / 135.3 -> 135.6, `2048^3` 76.0 -> 77.9 / 154.9 ->
    /// 159.7, `4096 x 384 x 1536` 74.8 -> 75.9 / 156.0 -> 157.0. (With AVX-512, 4 steps
    /// ahead gained 0-4%; 16 and 32 were within 2% of 8, either way.)
    ///
    /// The packed words are `$word` (f32, or a pair of bf16); `$load_b`, `$splat` and
    /// `$fmadd` load B's words, broadcast an A word, and multiply-add (`a * b + acc`) in
    /// that representation. C is f32 (`$load`, `$add`, `$store`).
    macro_rules! two_vector_microkernel {
        ($(#[$doc:meta])* $name:ident, $feature:literal, $word:ty, $mr:expr, $lanes:literal, $ahead:literal,
         $zero:ident, $load_b:ident, $splat:ident, $fmadd:ident, $load:ident, $add:ident, $store:ident) => {
            $(#[$doc])*
            #[target_feature(enable = $feature)]
            pub unsafe fn $name(a: &[[$word; $mr]], b: &[[$word; 2 * $lanes]], c: &mut [f32], ldc: usize, first: bool) {
                assert!(c.len() >= ($mr - 1) * ldc + 2 * $lanes, "microkernel: C tile out of bounds");
                let c_ptr = c.as_mut_ptr();
                for r in 0..$mr {
                    // SAFETY: the assert above covers every row start and row end; a
                    // prefetch never faults.
                    unsafe {
                        _mm_prefetch::<_MM_HINT_T0>(c_ptr.add(r * ldc).cast());
                        _mm_prefetch::<_MM_HINT_T0>(c_ptr.add(r * ldc + $lanes).cast());
                        _mm_prefetch::<_MM_HINT_T0>(c_ptr.add(r * ldc + 2 * $lanes - 1).cast());
                    }
                }
                let mut acc = [[$zero(); 2]; $mr];
                let (a_start, b_start) = (a.as_ptr(), b.as_ptr());
                for (p, (a_col, b_row)) in a.iter().zip(b).enumerate() {
                    if $ahead > 0 {
                        // A prefetch never faults, and `wrapping_add` may point past the
                        // slivers (the last steps ask for the words after them: the next
                        // A sliver's first words, or nothing of use).
                        let ahead = p + $ahead;
                        let (a_ahead, b_ahead) = (a_start.wrapping_add(ahead), b_start.wrapping_add(ahead));
                        _mm_prefetch::<_MM_HINT_T0>(a_ahead.cast());
                        _mm_prefetch::<_MM_HINT_T0>(b_ahead.cast());
                        _mm_prefetch::<_MM_HINT_T0>(b_ahead.cast::<$word>().wrapping_add(2 * $lanes - 1).cast());
                    }
                    let b_ptr = b_row.as_ptr();
                    // SAFETY: `b_row` holds 2 * lanes words; the unaligned loads read lanes
                    // [0, lanes) and [lanes, 2 * lanes).
                    let (b0, b1) = unsafe { ($load_b(b_ptr), $load_b(b_ptr.add($lanes))) };
                    for (acc_row, &a_val) in acc.iter_mut().zip(a_col) {
                        let a_bcast = $splat(a_val);
                        acc_row[0] = $fmadd(a_bcast, b0, acc_row[0]);
                        acc_row[1] = $fmadd(a_bcast, b1, acc_row[1]);
                    }
                }
                for (r, acc_row) in acc.iter().enumerate() {
                    // SAFETY: row `r` of the tile, `c[r * ldc..][..2 * lanes]`, is inside `c`
                    // (the assert above); unaligned loads and stores.
                    unsafe {
                        let row = c_ptr.add(r * ldc);
                        let (mut lo, mut hi) = (acc_row[0], acc_row[1]);
                        if !first {
                            lo = $add(lo, $load(row));
                            hi = $add(hi, $load(row.add($lanes)));
                        }
                        $store(row, lo);
                        $store(row.add($lanes), hi);
                    }
                }
            }
        };
    }

    /// The most lanes [`pack_lines_avx2`] packs (the widest sliver, AVX-512's B).
    pub const PACK_MAX_LANES: usize = 32;

    /// `sliver[p][w]` = word `p` of `lines[w]` for the given lines and a zero word for
    /// the lanes past them (`lines.len() <= W`), where a word is four bytes of a line: one
    /// f32, or two consecutive bf16 (`E` is the lines' element, `D` the packed word).
    /// Packs lines whose depth is contiguous (a row-major A, a B that is a transposed
    /// row-major matrix) 8 lines x 8 words at a time, each block loaded as eight vectors,
    /// transposed in registers (the shuffles move bits, whatever they mean) and stored as
    /// eight sliver rows; the scalar loop it replaces moved one value per load and store.
    /// The words past the last whole block of 8 that every line holds are taken one at a
    /// time from `word(line, p)` (where a line may end inside a word).
    ///
    /// A group of fewer than 8 lanes (the last one when `W` is not a multiple of 8) is
    /// still stored 8 lanes wide: the extra lanes spill into the start of the next sliver
    /// row, which a later store overwrites, since the groups are stored last to first and
    /// the rows in order. (A masked store is slow on AMD cores.) Only the sliver's last row
    /// is stored exactly.
    ///
    /// # Safety
    /// The CPU must support AVX2 (and FMA, the ISA this is dispatched with).
    ///
    /// # Panics
    /// If there are more than `W` lines, `D` is not four bytes or `E` does not divide them.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn pack_lines_avx2<E: Copy, D: Copy + Default, const W: usize>(
        lines: &[&[E]],
        sliver: &mut [[D; W]],
        word: impl Fn(&[E], usize) -> D,
    ) {
        assert!(lines.len() <= W, "pack_lines: {} lines for {W} lanes", lines.len());
        assert!(size_of::<D>() == 4 && 4 % size_of::<E>() == 0, "pack_lines: words are four bytes");
        let per_word = 4 / size_of::<E>();
        let depth = sliver.len();
        let whole_words = lines.iter().map(|line| line.len() / per_word).min().unwrap_or(depth).min(depth);
        let blocks = whole_words / 8 * 8;
        let flat = sliver.as_flattened_mut();
        for group in (0..W).step_by(8).rev() {
            let width = 8.min(W - group);
            for p0 in (0..blocks).step_by(8) {
                let mut rows = [_mm256_setzero_ps(); 8];
                for (row, line) in rows.iter_mut().zip(lines.iter().skip(group).take(width)) {
                    // SAFETY: `line` holds at least `blocks * per_word >= (p0 + 8) * per_word`
                    // elements, the 32 bytes read (an unaligned load).
                    *row = unsafe { _mm256_loadu_ps(line.as_ptr().add(p0 * per_word).cast()) };
                }
                for (j, column) in transpose8(rows).iter().enumerate() {
                    let start = (p0 + j) * W + group;
                    if start + 8 <= flat.len() {
                        // SAFETY: `flat[start..start + 8]` is in bounds (checked), 32 bytes.
                        unsafe { _mm256_storeu_ps(flat[start..].as_mut_ptr().cast(), *column) };
                    } else {
                        let mut lanes = [D::default(); 8];
                        // SAFETY: `lanes` holds 8 four-byte words.
                        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr().cast(), *column) };
                        flat[start..start + width].copy_from_slice(&lanes[..width]);
                    }
                }
            }
        }
        for (p, row) in sliver.iter_mut().enumerate().skip(blocks) {
            for (w, value) in row.iter_mut().enumerate() {
                *value = lines.get(w).map_or(D::default(), |line| word(line, p));
            }
        }
    }

    /// The transpose of an 8 x 8 block held as eight row vectors.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(in crate::cpu) fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    two_vector_microkernel!(
        /// AVX2 + FMA microkernel: a 6 x 16 tile in twelve ymm accumulators.
        ///
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        avx2_tile, "avx2,fma", f32, AVX2_MR, 8, 8,
        _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps,
        _mm256_loadu_ps, _mm256_add_ps, _mm256_storeu_ps
    );

    two_vector_microkernel!(
        /// AVX-512F microkernel: a 14 x 32 tile in twenty-eight zmm accumulators.
        ///
        /// # Safety
        /// The CPU must support AVX-512F.
        ///
        avx512_tile, "avx512f", f32, AVX512_MR, 16, 8,
        _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps,
        _mm512_loadu_ps, _mm512_add_ps, _mm512_storeu_ps
    );

    /// For the bf16 pair kernel (`gemm_bf16`), which has the same shape.
    pub(in crate::cpu) use two_vector_microkernel;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A strided f32 operand: `rows x cols` stored row-major (`transposed == false`) or
    /// column-major, with `pad` unused slots at the front and an extra `gap` between lines.
    #[derive(Clone, Debug)]
    struct Operand {
        data: Vec<f32>,
        offset: usize,
        row_stride: usize,
        col_stride: usize,
    }

    impl Operand {
        fn new(rows: usize, cols: usize, transposed: bool, pad: usize, gap: usize, seed: u64) -> Self {
            let (lines, line_len) = if transposed { (cols, rows) } else { (rows, cols) };
            let line_stride = line_len + gap;
            let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let data = (0..pad + lines * line_stride)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
                })
                .collect();
            let (row_stride, col_stride) = if transposed { (1, line_stride) } else { (line_stride, 1) };
            Operand { data, offset: pad, row_stride, col_stride }
        }

        fn at(&self, i: usize, j: usize) -> f64 {
            self.data[self.offset + i * self.row_stride + j * self.col_stride] as f64
        }
    }

    /// Naive triple loop in f64, written independently of the blocked code.
    fn naive_product(m: usize, n: usize, k: usize, a: &Operand, b: &Operand) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a.at(i, p) * b.at(p, j)).sum();
            }
        }
        c
    }

    impl Operand {
        fn view(&self) -> MatRef<'_> {
            MatRef { data: &self.data, offset: self.offset, row_stride: self.row_stride, col_stride: self.col_stride }
        }
    }

    fn run(isa: Isa, m: usize, n: usize, k: usize, a: &Operand, b: &Operand) -> Vec<f32> {
        let mut c = vec![f32::NAN; m * n];
        gemm_with_isa(isa, m, n, k, a.view(), b.view(), &mut c, Epilogue::NONE);
        c
    }

    /// The product through each path on its own, whatever its size: the packed one and,
    /// when `m`, `n` and `k` are nonzero (as `gemm_with_isa` ensures), the unpacked one.
    fn run_each_path(isa: Isa, m: usize, n: usize, k: usize, a: &Operand, b: &Operand) -> Vec<Vec<f32>> {
        run_each_path_with(isa, m, n, k, a, b, Epilogue::NONE)
    }

    /// [`run_each_path`] with an epilogue.
    fn run_each_path_with(
        isa: Isa,
        m: usize,
        n: usize,
        k: usize,
        a: &Operand,
        b: &Operand,
        epilogue: Epilogue,
    ) -> Vec<Vec<f32>> {
        let mut packed = vec![f32::NAN; m * n];
        if m > 0 && n > 0 && k > 0 {
            packed_gemm(isa, m, n, k, a.view(), b.view(), &mut packed, epilogue);
            let mut unpacked = vec![f32::NAN; m * n];
            gemm_small::small_sgemm(isa, m, n, k, a.view(), b.view(), &mut unpacked, epilogue);
            return vec![packed, unpacked];
        }
        let mut c = vec![f32::NAN; m * n];
        gemm_with_isa(isa, m, n, k, a.view(), b.view(), &mut c, epilogue);
        vec![c]
    }

    impl Operand {
        /// The operand's values converted to a half type (`data` is first rounded to it,
        /// so that [`naive_product`] sees exactly the values the GEMM reads).
        fn round_to_half<H: GemmInput>(&mut self, from_f32: fn(f32) -> H) -> Vec<H> {
            let half: Vec<H> = self.data.iter().map(|&v| from_f32(v)).collect();
            self.data = half.iter().map(|h| h.to_f32()).collect();
            half
        }

        fn view_of<'a, H>(&self, data: &'a [H]) -> MatRef<'a, H> {
            MatRef { data, offset: self.offset, row_stride: self.row_stride, col_stride: self.col_stride }
        }
    }

    /// Checks `got` against the f64 reference with a tolerance relative to `sum |a||b|`.
    fn assert_matches_naive(got: &[f32], m: usize, n: usize, k: usize, a: &Operand, b: &Operand) {
        let want = naive_product(m, n, k, a, b);
        for i in 0..m {
            for j in 0..n {
                let scale: f64 = (0..k).map(|p| (a.at(i, p) * b.at(p, j)).abs()).sum::<f64>().max(1.0);
                let (g, w) = (got[i * n + j] as f64, want[i * n + j]);
                assert!((g - w).abs() <= 1e-4 * scale, "C[{i},{j}] = {g}, expected {w} ({m}x{n}x{k})");
            }
        }
    }

    fn available_isas() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.is_available()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn sgemm_matches_naive_f64_on_random_strided_operands(
            m in 0usize..=70, n in 0usize..=70, k in 0usize..=70,
            a_t in any::<bool>(), b_t in any::<bool>(),
            pads in (0usize..4, 0usize..4), gaps in (0usize..3, 0usize..3), seed in any::<u64>(),
        ) {
            let a = Operand::new(m, k, a_t, pads.0, gaps.0, seed);
            let b = Operand::new(k, n, b_t, pads.1, gaps.1, seed ^ 0x9e37);
            assert_matches_naive(&run(Isa::best(), m, n, k, &a, &b), m, n, k, &a, &b);
            for got in run_each_path(Isa::best(), m, n, k, &a, &b) {
                assert_matches_naive(&got, m, n, k, &a, &b);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// f16 and bf16 operands on every ISA this CPU has (widened to f32 while packing;
        /// bf16 on AVX-512 by the best [`Bf16Path`]) against the f64
        /// product of their values.
        #[test]
        fn half_precision_inputs_accumulate_in_f32_on_every_isa(
            m in 0usize..=40, n in 0usize..=40, k in 0usize..=300,
            a_t in any::<bool>(), b_t in any::<bool>(), use_f16 in any::<bool>(), seed in any::<u64>(),
        ) {
            let a = Operand::new(m, k, a_t, 1, 1, seed);
            let b = Operand::new(k, n, b_t, 2, 0, seed ^ 0x51);
            if use_f16 {
                check_half_on_every_isa(f16::from_f32, m, n, k, a, b);
            } else {
                check_half_on_every_isa(bf16::from_f32, m, n, k, a, b);
            }
        }
    }

    /// The product of `a` and `b` rounded to a half type, on every available ISA, against
    /// the f64 product of the rounded values.
    fn check_half_on_every_isa<H: GemmInput>(
        from_f32: fn(f32) -> H,
        m: usize,
        n: usize,
        k: usize,
        mut a: Operand,
        mut b: Operand,
    ) {
        let (ah, bh) = (a.round_to_half(from_f32), b.round_to_half(from_f32));
        for isa in available_isas() {
            let mut c = vec![f32::NAN; m * n];
            gemm_with_isa(isa, m, n, k, a.view_of(&ah), b.view_of(&bh), &mut c, Epilogue::NONE);
            assert_matches_naive(&c, m, n, k, &a, &b);
        }
    }

    /// `activation(A @ B + bias)` in f64, the reference of the epilogue.
    fn naive_fused(m: usize, n: usize, k: usize, a: &Operand, b: &Operand, bias: &[f32], op: UnaryOp) -> Vec<f64> {
        let mut c = naive_product(m, n, k, a, b);
        for (j, v) in c.iter_mut().enumerate() {
            *v = op.apply(*v + bias[j % n] as f64);
        }
        c
    }

    #[test]
    fn epilogue_adds_the_bias_and_applies_the_activation_on_every_isa_and_block() {
        let ops = [
            UnaryOp::Gelu,
            UnaryOp::GeluTanh,
            UnaryOp::Relu,
            UnaryOp::Silu,
            UnaryOp::Tanh,
            UnaryOp::Affine { mul: 2.0, add: -1.0 },
        ];
        // Edge tiles, one depth block, several depth blocks (the epilogue must wait for
        // the last), several row blocks, one column block of B with work enough for the
        // threads (streamed unpacked), and few rows on several threads (computed
        // transposed: a recurrent step, a decoding step; 20 rows transposed back in parts
        // of 16 and 4 on two threads).
        let few_rows = [(16, 300, 200), (1, 400, 700), (5, 257, 300), (20, 300, 200)];
        if parallel::threads() > 1 {
            let b_column_major = [true, true];
            assert!(few_rows.iter().all(|&(m, n, k)| computed_transposed(Isa::best(), [m, n, k], b_column_major)));
        }
        let shapes = [(1, 1, 1), (7, 17, 5), (29, 65, 31), (13, 40, 600), (500, 33, 70), (600, 16, 300), (700, 9, 64)];
        for (m, n, k) in shapes.into_iter().chain(few_rows) {
            let a = Operand::new(m, k, false, 1, 0, 21);
            let b = Operand::new(k, n, true, 0, 2, 22);
            let bias: Vec<f32> = (0..n).map(|j| (j as f32 * 0.37).sin()).collect();
            for isa in available_isas() {
                for op in ops {
                    let epilogue = Epilogue { bias: Some(&bias), activation: Some(op) };
                    let want = naive_fused(m, n, k, &a, &b, &bias, op);
                    for (path, c) in run_each_path_with(isa, m, n, k, &a, &b, epilogue).iter().enumerate() {
                        for (idx, (&g, &w)) in c.iter().zip(&want).enumerate() {
                            let tol = 2e-4 * (k as f64).sqrt().max(1.0) + 1e-5 * w.abs();
                            assert!(
                                (g as f64 - w).abs() <= tol,
                                "{isa:?} {op:?} {m}x{n}x{k} path {path}: C[{idx}] = {g}, expected {w}"
                            );
                        }
                    }
                }
                // Bias alone, and the activation alone.
                let mut c = vec![f32::NAN; m * n];
                gemm_with_isa(
                    isa,
                    m,
                    n,
                    k,
                    a.view(),
                    b.view(),
                    &mut c,
                    Epilogue { bias: Some(&bias), activation: None },
                );
                let want = naive_fused(m, n, k, &a, &b, &bias, UnaryOp::Affine { mul: 1.0, add: 0.0 });
                assert!(c.iter().zip(&want).all(|(&g, &w)| (g as f64 - w).abs() <= 2e-4 * (k as f64).sqrt()));
                let relu = Epilogue { bias: None, activation: Some(UnaryOp::Relu) };
                gemm_with_isa(isa, m, n, k, a.view(), b.view(), &mut c, relu);
                let plain = naive_product(m, n, k, &a, &b);
                assert!(c.iter().zip(&plain).all(|(&g, &w)| (g as f64 - w.max(0.0)).abs() <= 2e-4 * (k as f64).sqrt()));
            }
        }
    }

    #[test]
    fn epilogue_applies_to_an_empty_depth_product() {
        let a = Operand::new(2, 0, false, 0, 0, 1);
        let b = Operand::new(0, 3, false, 0, 0, 2);
        let mut c = vec![f32::NAN; 6];
        let bias = [1.0, -2.0, 0.5];
        gemm(2, 3, 0, a.view(), b.view(), &mut c, Epilogue { bias: Some(&bias), activation: Some(UnaryOp::Relu) });
        assert_eq!(c, [1.0, 0.0, 0.5, 1.0, 0.0, 0.5]);
    }

    #[test]
    #[should_panic(expected = "one per column")]
    fn gemm_rejects_a_bias_of_the_wrong_length() {
        let v = MatRef { data: &[1.0f32, 2.0], offset: 0, row_stride: 1, col_stride: 1 };
        let epilogue = Epilogue { bias: Some(&[1.0]), activation: None };
        gemm(2, 2, 1, v, MatRef { row_stride: 2, ..v }, &mut [0.0; 4], epilogue);
    }

    #[test]
    #[should_panic(expected = "has no f32 kernel")]
    fn gemm_rejects_an_activation_without_an_f32_kernel() {
        let v = MatRef { data: &[1.0f32, 2.0], offset: 0, row_stride: 1, col_stride: 1 };
        let epilogue = Epilogue { bias: None, activation: Some(UnaryOp::Softplus) };
        gemm(2, 2, 1, v, MatRef { row_stride: 2, ..v }, &mut [0.0; 4], epilogue);
    }

    #[test]
    fn every_available_isa_matches_naive_on_the_same_edge_sizes() {
        let isas = available_isas();
        assert!(isas.contains(&Isa::Scalar));
        for (m, n, k) in [(0, 3, 2), (3, 0, 2), (2, 3, 0), (1, 1, 1), (7, 17, 5), (15, 33, 9), (29, 65, 31)] {
            let a = Operand::new(m, k, true, 1, 1, 7);
            let b = Operand::new(k, n, false, 2, 3, 11);
            for &isa in &isas {
                for got in run_each_path(isa, m, n, k, &a, &b) {
                    assert_matches_naive(&got, m, n, k, &a, &b);
                }
            }
        }
    }

    #[test]
    fn every_available_isa_matches_naive_across_block_boundaries() {
        // Past one row block and one depth block, with partial tiles at both edges.
        let (m, n, k) = (MC + 60, 257, KC + 1);
        let a = Operand::new(m, k, false, 0, 1, 3);
        let b = Operand::new(k, n, true, 1, 0, 5);
        for isa in available_isas() {
            assert_matches_naive(&run(isa, m, n, k, &a, &b), m, n, k, &a, &b);
            for got in run_each_path(isa, m, n, k, &a, &b) {
                assert_matches_naive(&got, m, n, k, &a, &b);
            }
        }
    }

    #[test]
    fn depth_blocks_are_equal_whole_words_within_their_limit() {
        for ((kc, per_word), shared) in [(512, 1), (1024, 2), (6, 2)].into_iter().zip([true, false, true]) {
            for k in 1..=5 * kc {
                let depth = depth_block(k, kc, per_word, shared);
                let max = if shared && k > 2 * kc { 2 * kc } else { kc };
                assert!(depth.is_multiple_of(per_word) && depth <= max, "k {k}, kc {kc}: {depth}");
                assert_eq!(k.div_ceil(depth), k.div_ceil(max), "k {k}, kc {kc}: as few blocks as the limit allows");
            }
        }
    }

    #[test]
    fn deep_products_match_naive_on_every_thread_count() {
        // Past twice KC: on several threads two blocks of (2 KC + 7) / 2 steps, on one
        // three blocks; on every ISA and both paths.
        let (m, n, k) = (37, 45, 2 * KC + 7);
        for (a_t, b_t) in [(false, false), (true, true)] {
            let a = Operand::new(m, k, a_t, 1, 0, 41);
            let b = Operand::new(k, n, b_t, 0, 1, 42);
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                for isa in available_isas() {
                    for got in pool.install(|| run_each_path(isa, m, n, k, &a, &b)) {
                        assert_matches_naive(&got, m, n, k, &a, &b);
                    }
                }
            }
        }
    }

    #[test]
    fn unpacked_path_matches_naive_across_its_row_blocks() {
        // Rows of A in blocks of about 2^15 values: several blocks, the last one partial
        // and ending in a short tile; B row-major, column-major, and a single column block;
        // on two threads, C's rows cut into 2 to 8 parts (the last one ragged). Packed B's
        // rows go by in groups of 4 and a remainder of 0-3 (depths 600, 257, 302, 603),
        // or only a remainder (depth 3).
        let shapes = [
            (131, 40, 600, false),
            (131, 40, 600, true),
            (250, 16, 257, false),
            (97, 33, 1024, true),
            (293, 40, 300, false),
            (140, 64, 302, true),
            (70, 48, 603, false),
            (1024, 96, 3, false),
        ];
        for (m, n, k, b_t) in shapes {
            let a = Operand::new(m, k, false, 1, 2, 31);
            let b = Operand::new(k, n, b_t, 0, 1, 32);
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                for isa in available_isas() {
                    let mut c = vec![f32::NAN; m * n];
                    pool.install(|| gemm_small::small_sgemm(isa, m, n, k, a.view(), b.view(), &mut c, Epilogue::NONE));
                    assert_matches_naive(&c, m, n, k, &a, &b);
                }
            }
        }
    }

    #[test]
    fn unpacked_path_on_several_threads_packs_each_calls_b() {
        // On several threads every thread packs B for itself and keeps it for its later
        // parts of the same call (4 parts on 2 threads here): a second call with the same
        // shapes and the same B buffer, its values changed, must not reuse the first's.
        let (m, n, k) = (293, 40, 300);
        let a = Operand::new(m, k, false, 1, 2, 41);
        let mut b = Operand::new(k, n, false, 0, 1, 42);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for isa in available_isas() {
            for round in 0..3 {
                b.data.iter_mut().for_each(|v| *v = -*v + round as f32 * 0.25);
                let mut c = vec![f32::NAN; m * n];
                pool.install(|| gemm_small::small_sgemm(isa, m, n, k, a.view(), b.view(), &mut c, Epilogue::NONE));
                assert_matches_naive(&c, m, n, k, &a, &b);
            }
        }
    }

    /// The AVX2 transposing pack against its definition, for every sliver width the
    /// microkernels use, fewer lines than lanes, and depths around the 8-value blocks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transposing_pack_matches_its_definition() {
        fn check<const W: usize>() {
            for depth in [0, 1, 7, 8, 9, 16, 23] {
                for line_count in [0, 1, W / 2, W - 1, W] {
                    let data: Vec<Vec<f32>> =
                        (0..line_count).map(|w| (0..depth + 3).map(|p| (w * 100 + p) as f32).collect()).collect();
                    let lines: Vec<&[f32]> = data.iter().map(|line| &line[..]).collect();
                    let mut sliver = vec![[f32::NAN; W]; depth];
                    // SAFETY: checked that the CPU has AVX2 and FMA.
                    unsafe { x86::pack_lines_avx2(&lines, &mut sliver, |line, p| line[p]) };
                    for (p, row) in sliver.iter().enumerate() {
                        for (w, &v) in row.iter().enumerate() {
                            let want = if w < line_count { (w * 100 + p) as f32 } else { 0.0 };
                            assert_eq!(v, want, "W {W}, depth {depth}, {line_count} lines: [{p}][{w}]");
                        }
                    }
                }
            }
        }
        if Isa::Avx2Fma.is_available() {
            check::<4>();
            check::<6>();
            check::<8>();
            check::<14>();
            check::<16>();
            check::<32>();
        }
    }

    #[test]
    fn the_isa_cap_lowers_the_detected_isa_and_never_raises_it() {
        assert_eq!(Isa::capped(Isa::Avx512, None), Ok(Isa::Avx512));
        assert_eq!(Isa::capped(Isa::Avx512, Some("avx2")), Ok(Isa::Avx2Fma));
        assert_eq!(Isa::capped(Isa::Avx512, Some(" Scalar ")), Ok(Isa::Scalar));
        assert_eq!(Isa::capped(Isa::Avx2Fma, Some("avx512")), Ok(Isa::Avx2Fma));
        assert_eq!(Isa::capped(Isa::Scalar, Some("AVX2")), Ok(Isa::Scalar));
        let err = Isa::capped(Isa::Avx512, Some("sse4")).unwrap_err();
        assert!(err.contains("AIGC_CPU_ISA=\"sse4\"") && err.contains("scalar, avx2, avx512"), "{err}");
    }

    #[test]
    fn detected_isa_is_available_and_stable() {
        let best = Isa::best();
        assert!(best.is_available());
        assert_eq!(Isa::best(), best);
    }

    #[test]
    #[should_panic(expected = "expected m * n")]
    fn sgemm_rejects_a_wrongly_sized_output() {
        let v = MatRef { data: &[1.0, 2.0], offset: 0, row_stride: 1, col_stride: 1 };
        sgemm(2, 2, 1, v, MatRef { row_stride: 2, ..v }, &mut [0.0; 3]);
    }

    /// Release-mode timing: `cargo test --release -p aigc-kernels gemm -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, run by hand in release mode"]
    fn report_sgemm_gflops() {
        for size in [512, 1024] {
            let a = Operand::new(size, size, false, 0, 0, 1);
            let b = Operand::new(size, size, false, 0, 0, 2);
            run(Isa::best(), size, size, size, &a, &b);
            let reps = 5;
            let start = std::time::Instant::now();
            for _ in 0..reps {
                std::hint::black_box(run(Isa::best(), size, size, size, &a, &b));
            }
            let secs = start.elapsed().as_secs_f64() / reps as f64;
            let gflops = 2.0 * (size as f64).powi(3) / secs / 1e9;
            println!(
                "sgemm {size}^3 on {:?}, {} threads: {gflops:.1} GFLOP/s",
                Isa::best(),
                rayon::current_num_threads()
            );
        }
    }
}
