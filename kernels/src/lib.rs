//! CPU matrix multiplication for the 32-value GGUF block formats Q8_0 and Q5_0, used by
//! wattgate's embedded model.
//!
//! Why our own: candle 0.11.1 has no SIMD path for Q5_0 (its dot product is scalar), and its
//! repacked AVX-512/VNNI kernels require the inner dimension to be a multiple of 256, which
//! Gemma 3 270M's hidden size of 640 is not. Those two gaps cover every projection that reads the
//! residual stream (q, k, v, gate, up) and the 262,144-row output head, i.e. most of the bytes a
//! decode step touches. K-quant tensors whose shapes candle handles well stay with candle.
//!
//! The method is the one ggml uses for these formats: activations are quantized to 8 bits per
//! 32-value block, each weight block is widened to 32 signed bytes, and the integer dot product
//! of the two blocks is scaled by both block scales. On x86-64 the integer dot runs on AVX2
//! (`vpmaddubsw`) or, where the CPU has it, AVX-VNNI (`vpdpbusd`); elsewhere a scalar loop that
//! the tests also use as the reference.

use std::ops::Range;

use half::f16;

pub mod attention;

/// Values per block in both formats.
pub const BLOCK: usize = 32;

/// A GGUF block format these kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// f16 scale, 32 signed bytes (34 bytes per block).
    Q8_0,
    /// f16 scale, 32 high bits, 32 low nibbles (22 bytes per block); value = scale * (q - 16).
    Q5_0,
}

impl BlockFormat {
    /// Bytes of one 32-value block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q5_0 => 22,
        }
    }

    /// Bytes of one block's values, without the scale (how [`BlockMatrix`] stores them).
    fn quant_bytes(self) -> usize {
        self.block_bytes() - 2
    }

    /// Widens one block's values (the GGUF block minus its leading f16 scale) to signed bytes.
    fn decode(self, quants: &[u8], out: &mut [i8; BLOCK]) {
        match self {
            Self::Q8_0 => {
                for (o, &b) in out.iter_mut().zip(&quants[..BLOCK]) {
                    *o = b as i8;
                }
            }
            Self::Q5_0 => {
                let qh = u32::from_le_bytes([quants[0], quants[1], quants[2], quants[3]]);
                for j in 0..BLOCK / 2 {
                    let byte = quants[4 + j];
                    let lo = (byte & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                    let hi = (byte >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
                    out[j] = lo as i8 - 16;
                    out[j + BLOCK / 2] = hi as i8 - 16;
                }
            }
        }
    }
}

/// A weight matrix of `rows` x `cols` in one block format. The blocks' f16 scales are kept
/// apart as f32 (4 bytes instead of 2 per 32 values): converting them in the inner loop
/// serialised the four accumulator chains and cost more than the bandwidth.
pub struct BlockMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    /// One scale per block, in the order of `layout`.
    scales: Vec<f32>,
    /// The blocks' values, in the order of `layout`.
    quants: Vec<u8>,
    layout: Layout,
}

/// How a [`BlockMatrix`] keeps its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Row-major, each block's values as in the GGUF file without the scale.
    Rows,
    /// For AVX-VNNI: tiles of [`TILE`] rows. Per (tile, block) come 8 chunks of 4 values for
    /// each of the 8 rows, as unsigned bytes (value + 128), so that one `vpdpbusd` multiplies
    /// 4 values of 8 rows at once and its 8 lanes are the 8 rows' sums: no horizontal
    /// reduction, and a decode step reads the weights as one sequential stream. Scales are
    /// [tile][block][row].
    Tiles,
}

/// Rows per tile of [`Layout::Tiles`].
const TILE: usize = 8;
/// Added to each signed value in [`Layout::Tiles`] to make it unsigned.
const TILE_OFFSET: i32 = 128;

impl BlockMatrix {
    /// Splits GGUF tensor bytes; fails when `cols` is not a whole number of blocks or the byte
    /// count does not match the shape.
    pub fn new(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, String> {
        let expected = Self::gguf_bytes(format, rows, cols)?;
        if data.len() != expected {
            return Err(format!(
                "{} bytes for a {rows}x{cols} {format:?} matrix, expected {expected}",
                data.len()
            ));
        }
        Self::read(format, rows, cols, &mut &data[..]).map_err(|e| e.to_string())
    }

    /// Reads the tensor's GGUF bytes from `reader`, about a megabyte at a time, so that loading
    /// never holds the file's layout and ours at once. The layout suits the CPU's kernel.
    pub fn read<R: std::io::Read>(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        reader: &mut R,
    ) -> std::io::Result<Self> {
        let tiled = Kernel::detect().vnni() && rows.is_multiple_of(TILE);
        let layout = if tiled { Layout::Tiles } else { Layout::Rows };
        Self::read_as(format, rows, cols, reader, layout)
    }

    fn read_as<R: std::io::Read>(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        reader: &mut R,
        layout: Layout,
    ) -> std::io::Result<Self> {
        let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let total = Self::gguf_bytes(format, rows, cols).map_err(invalid)?;
        if layout == Layout::Tiles && !rows.is_multiple_of(TILE) {
            return Err(invalid(format!("{rows} rows is not a multiple of {TILE}")));
        }
        let (block, nb) = (format.block_bytes(), cols / BLOCK);
        let blocks = total / block;
        let mut scales = Vec::with_capacity(blocks);
        let value_bytes = match layout {
            Layout::Rows => format.quant_bytes(),
            Layout::Tiles => BLOCK,
        };
        let mut quants = Vec::with_capacity(blocks * value_bytes);
        // Whole tiles of rows per read.
        let unit = TILE * nb * block;
        let mut chunk = vec![0u8; unit * ((1 << 20) / unit).max(1)];
        let mut left = total;
        let mut values = vec![[0i8; BLOCK]; TILE * nb];
        let mut tile_scales = vec![0f32; TILE * nb];
        while left > 0 {
            let n = left.min(chunk.len());
            reader.read_exact(&mut chunk[..n])?;
            match layout {
                Layout::Rows => {
                    for b in chunk[..n].chunks_exact(block) {
                        scales.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
                        quants.extend_from_slice(&b[2..]);
                    }
                }
                Layout::Tiles => {
                    for tile in chunk[..n].chunks_exact(unit) {
                        for (i, b) in tile.chunks_exact(block).enumerate() {
                            // i = row * nb + block
                            tile_scales[i] = f16::from_le_bytes([b[0], b[1]]).to_f32();
                            format.decode(&b[2..], &mut values[i]);
                        }
                        for b in 0..nb {
                            scales.extend((0..TILE).map(|j| tile_scales[j * nb + b]));
                            for c in 0..BLOCK / 4 {
                                for j in 0..TILE {
                                    let v = &values[j * nb + b][c * 4..c * 4 + 4];
                                    quants.extend(
                                        v.iter().map(|&v| (i32::from(v) + TILE_OFFSET) as u8),
                                    );
                                }
                            }
                        }
                    }
                }
            }
            left -= n;
        }
        Ok(Self {
            format,
            rows,
            cols,
            scales,
            quants,
            layout,
        })
    }

    /// Row `r` widened to signed bytes, with its block scales.
    fn row_i8(&self, r: usize, w: &mut [i8], wd: &mut [f32]) {
        let nb = self.blocks_per_row();
        match self.layout {
            Layout::Rows => {
                let qb = self.format.quant_bytes();
                let quants = &self.quants[r * nb * qb..(r + 1) * nb * qb];
                let mut q = [0i8; BLOCK];
                for (b, block) in quants.chunks_exact(qb).enumerate() {
                    self.format.decode(block, &mut q);
                    w[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&q);
                }
                wd.copy_from_slice(&self.scales[r * nb..(r + 1) * nb]);
            }
            Layout::Tiles => {
                let (tile, j) = (r / TILE, r % TILE);
                for b in 0..nb {
                    let base = (tile * nb + b) * TILE * BLOCK;
                    for c in 0..BLOCK / 4 {
                        for k in 0..4 {
                            let u = self.quants[base + (c * TILE + j) * 4 + k];
                            w[b * BLOCK + c * 4 + k] = (i32::from(u) - TILE_OFFSET) as i8;
                        }
                    }
                    wd[b] = self.scales[(tile * nb + b) * TILE + j];
                }
            }
        }
    }

    /// Size in the GGUF file of a `rows` x `cols` tensor.
    fn gguf_bytes(format: BlockFormat, rows: usize, cols: usize) -> Result<usize, String> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(format!("{cols} columns is not a multiple of {BLOCK}"));
        }
        Ok(rows * (cols / BLOCK) * format.block_bytes())
    }

    /// Output features (rows of the stored matrix).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The block format.
    pub fn format(&self) -> BlockFormat {
        self.format
    }

    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// Row `r` as f32 (an embedding lookup); `None` when `r` is out of range.
    pub fn dequantize_row(&self, r: usize) -> Option<Vec<f32>> {
        if r >= self.rows {
            return None;
        }
        let mut w = vec![0i8; self.cols];
        let mut wd = vec![0f32; self.blocks_per_row()];
        self.row_i8(r, &mut w, &mut wd);
        Some(
            w.chunks_exact(BLOCK)
                .zip(&wd)
                .flat_map(|(q, &d)| q.iter().map(move |&v| d * f32::from(v)))
                .collect(),
        )
    }

    /// `out[t][r] = sum_c x[t][c] * w[r][c]` for the `x.rows()` activation rows, using candle's
    /// CPU thread pool. `out` has `x.rows() * self.rows()` elements.
    pub fn matmul(&self, x: &QuantizedActivations, out: &mut [f32]) -> Result<(), String> {
        if x.cols != self.cols {
            return Err(format!(
                "activations have {} columns, the matrix {}",
                x.cols, self.cols
            ));
        }
        if out.len() != x.rows * self.rows {
            return Err(format!(
                "output has {} elements, expected {}",
                out.len(),
                x.rows * self.rows
            ));
        }
        let out_ptr = OutPtr(out.as_mut_ptr());
        let kernel = Kernel::detect();
        let work = |rows: Range<usize>| {
            // SAFETY: the pool hands out disjoint row ranges, and a range writes only
            // `out[t * self.rows + r]` for its own rows, all inside `out` (checked above).
            unsafe { self.rows_into(kernel, rows, x, out_ptr) }
        };
        // Work items are whole tiles for the tiled layout, rows otherwise.
        let unit = match self.layout {
            Layout::Rows => 1,
            Layout::Tiles => TILE,
        };
        // Small matrices run inline: waking the pool costs more than it saves.
        if self.rows * x.rows * self.cols < 1 << 16 {
            work(0..self.rows);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(self.rows / unit, |items| {
                work(items.start * unit..items.end * unit)
            });
        }
        Ok(())
    }

    /// Computes output rows `rows` for every activation row.
    ///
    /// # Safety
    /// `out` must point to `x.rows * self.rows` writable floats, and no other thread may write
    /// the elements of these rows concurrently.
    unsafe fn rows_into(
        &self,
        kernel: Kernel,
        rows: Range<usize>,
        x: &QuantizedActivations,
        out: OutPtr,
    ) {
        #[cfg(target_arch = "x86_64")]
        if kernel.vnni() && self.layout == Layout::Tiles {
            debug_assert!(rows.start.is_multiple_of(TILE) && rows.end.is_multiple_of(TILE));
            let args = x86::Args {
                quants: &self.quants,
                scales: &self.scales,
                blocks: self.blocks_per_row(),
                rows: rows.start / TILE..rows.end / TILE,
                out_stride: self.rows,
                x,
                out: out.0,
            };
            // SAFETY: each VNNI kernel is chosen only on a CPU with AVX2, FMA and its VNNI
            // form; the ranges are whole tiles; the output contract is this function's.
            unsafe {
                if kernel == Kernel::AvxVnni {
                    x86::matmul_tiles_vnni(args)
                } else {
                    x86::matmul_tiles_vnni512(args)
                }
            };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if kernel != Kernel::Scalar && self.layout == Layout::Rows {
            let args = x86::Args {
                quants: &self.quants,
                scales: &self.scales,
                blocks: self.blocks_per_row(),
                rows,
                out_stride: self.rows,
                x,
                out: out.0,
            };
            // SAFETY: `detect` picked a SIMD kernel only on a CPU with its features; the
            // output contract is this function's.
            unsafe {
                match (kernel, self.format) {
                    (Kernel::AvxVnni, BlockFormat::Q8_0) => x86::matmul_q8_0_vnni(args),
                    (Kernel::AvxVnni, BlockFormat::Q5_0) => x86::matmul_q5_0_vnni(args),
                    (Kernel::Avx512Vnni, BlockFormat::Q8_0) => x86::matmul_q8_0_vnni512(args),
                    (Kernel::Avx512Vnni, BlockFormat::Q5_0) => x86::matmul_q5_0_vnni512(args),
                    (_, BlockFormat::Q8_0) => x86::matmul_q8_0_avx2(args),
                    (_, BlockFormat::Q5_0) => x86::matmul_q5_0_avx2(args),
                }
            }
            return;
        }
        let _ = kernel;
        let mut w = vec![0i8; self.cols];
        let mut wd = vec![0f32; self.blocks_per_row()];
        for r in rows {
            self.row_i8(r, &mut w, &mut wd);
            for t in 0..x.rows {
                let v = dot_scalar(&w, &wd, x.row_q(t), x.row_d(t));
                // SAFETY: see the function's contract.
                unsafe { *out.0.add(t * self.rows + r) = v };
            }
        }
    }
}

/// The output pointer shared with the pool's workers.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: workers write disjoint elements (see `BlockMatrix::matmul`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Activation rows quantized to 8 bits per block, computed once per matmul and shared by all
/// output rows (and by several matrices that read the same input).
pub struct QuantizedActivations {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    /// Per block, scale times the sum of its values: the correction for unsigned weights.
    s: Vec<f32>,
}

impl QuantizedActivations {
    /// Quantizes `rows` rows of `cols` values; `cols` must be a multiple of 32.
    pub fn new(x: &[f32], rows: usize, cols: usize) -> Result<Self, String> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) || x.len() != rows * cols {
            return Err(format!(
                "cannot quantize {} values as {rows} rows of {cols} (a multiple of {BLOCK})",
                x.len()
            ));
        }
        let mut q = vec![0i8; x.len()];
        let mut d = vec![0f32; x.len() / BLOCK];
        let mut sums = vec![0f32; x.len() / BLOCK];
        for (((src, dst), scale), sum) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .zip(d.iter_mut())
            .zip(sums.iter_mut())
        {
            let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = amax / 127.0;
            let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
            let mut total = 0i32;
            for (o, v) in dst.iter_mut().zip(src) {
                *o = (v * inv).round() as i8;
                total += i32::from(*o);
            }
            *scale = s;
            *sum = s * total as f32;
        }
        Ok(Self {
            rows,
            cols,
            q,
            d,
            s: sums,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row_q(&self, t: usize) -> &[i8] {
        &self.q[t * self.cols..(t + 1) * self.cols]
    }

    fn row_d(&self, t: usize) -> &[f32] {
        let b = self.cols / BLOCK;
        &self.d[t * b..(t + 1) * b]
    }
}

/// The integer dot-product implementation chosen for this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Portable loop (also the reference in tests).
    Scalar,
    /// AVX2 + FMA.
    Avx2,
    /// AVX2 + FMA + AVX-VNNI.
    AvxVnni,
    /// AVX2 + FMA + AVX-512 VNNI with VL: the same 256-bit byte dot product as AVX-VNNI,
    /// EVEX-encoded (Intel Ice Lake and later Xeons, AMD Zen 4, which lack the VEX form).
    Avx512Vnni,
}

impl Kernel {
    /// Whether the kernel has a byte dot product instruction (`vpdpbusd`), which the tiled
    /// layout needs.
    fn vnni(self) -> bool {
        matches!(self, Kernel::AvxVnni | Kernel::Avx512Vnni)
    }

    /// The fastest kernel this CPU supports (detected once). `WATTGATE_SCALAR_KERNELS=1` forces
    /// the portable loop, for comparisons.
    pub fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::env::var_os("WATTGATE_SCALAR_KERNELS").is_some() {
                    return Kernel::Scalar;
                }
                let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
                if avx2 && is_x86_feature_detected!("avxvnni") {
                    return Kernel::AvxVnni;
                }
                if avx2
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
                {
                    return Kernel::Avx512Vnni;
                }
                if avx2 {
                    return Kernel::Avx2;
                }
            }
            Kernel::Scalar
        })
    }
}

fn dot_scalar(w: &[i8], wd: &[f32], x: &[i8], xd: &[f32]) -> f32 {
    w.chunks_exact(BLOCK)
        .zip(x.chunks_exact(BLOCK))
        .zip(wd.iter().zip(xd))
        .map(|((wb, xb), (a, b))| {
            let s: i32 = wb
                .iter()
                .zip(xb)
                .map(|(&p, &q)| i32::from(p) * i32::from(q))
                .sum();
            a * b * s as f32
        })
        .sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD kernels. One activation row (decode) streams the weights once, four rows at a
    //! time so that four independent accumulator chains hide the FMA latency. Several rows
    //! (prefill) widen each weight row once and reuse it for four activation rows at a time.

    use super::{QuantizedActivations, BLOCK};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// One call's operands.
    pub struct Args<'a> {
        pub quants: &'a [u8],
        pub scales: &'a [f32],
        pub blocks: usize,
        pub rows: Range<usize>,
        pub out_stride: usize,
        pub x: &'a QuantizedActivations,
        pub out: *mut f32,
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// A Q8_0 block's 32 values as signed bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_q8_0(q: *const u8) -> __m256i {
        // SAFETY: the caller passes a pointer to 32 value bytes.
        unsafe { _mm256_loadu_si256(q as *const __m256i) }
    }

    /// A Q5_0 block's values as signed bytes (-16..=15): 16 low nibbles then 16 high nibbles,
    /// each with its fifth bit from the 32-bit `qh` field that precedes them.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_q5_0(q: *const u8) -> __m256i {
        // SAFETY: the caller passes a pointer to 20 value bytes: qh (4), then 16 nibble bytes.
        let (qh, qs) = unsafe {
            (
                (q as *const u32).read_unaligned(),
                _mm_loadu_si128(q.add(4) as *const __m128i),
            )
        };
        let low4 = _mm_set1_epi8(0x0F);
        let nibbles = _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16::<4>(qs), low4),
            _mm_and_si128(qs, low4),
        );
        // Byte lane i takes byte i / 8 of qh and tests bit i % 8.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(u32::from_le(qh) as i32),
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        let q = _mm256_or_si256(nibbles, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
        _mm256_sub_epi8(q, _mm256_set1_epi8(16))
    }

    /// Signed-by-signed byte dot product of one block as eight i32 partial sums. The
    /// instructions multiply unsigned by signed bytes, so they get |w| and x carrying w's sign.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn block_dot_avx2(w: __m256i, x: __m256i) -> __m256i {
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        // |w| <= 128 and |x| <= 127, so a pair sum is at most 32,512: no i16 saturation.
        let pairs = _mm256_maddubs_epi16(aw, sx);
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,avxvnni")]
    fn block_dot_vnni(w: __m256i, x: __m256i) -> __m256i {
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, sx)
    }

    macro_rules! matmul_fn {
        ($name:ident, $features:literal, $load:ident, $bytes:literal, $dot:ident) => {
            /// # Safety
            /// The CPU must have the named features; `args` must describe whole rows of one
            /// matrix; `args.out` must take `x.rows * out_stride` floats, of which only this
            /// call writes its rows.
            #[target_feature(enable = $features)]
            pub unsafe fn $name(args: Args<'_>) {
                let Args {
                    quants,
                    scales,
                    blocks,
                    rows,
                    out_stride,
                    x,
                    out,
                } = args;
                let row_bytes = blocks * $bytes;
                debug_assert!(rows.end * row_bytes <= quants.len());
                debug_assert!(rows.end * blocks <= scales.len());
                let (qp, sp, xq) = (quants.as_ptr(), scales.as_ptr(), x.q.as_ptr());
                // SAFETY (every read below): row r's values lie at r * row_bytes, its scales at
                // r * blocks, for r in `rows`, inside the slices; activation row t's values lie
                // at t * blocks * 32 inside `x.q`. Writes: see the contract.
                if x.rows == 1 {
                    let ahead = 4 * row_bytes;
                    let mut r = rows.start;
                    while r + 4 <= rows.end {
                        let mut acc = [_mm256_setzero_ps(); 4];
                        for b in 0..blocks {
                            let xv =
                                unsafe { _mm256_loadu_si256(xq.add(b * BLOCK) as *const __m256i) };
                            let xd = _mm256_set1_ps(x.d[b]);
                            for (i, a) in acc.iter_mut().enumerate() {
                                let row = r + i;
                                let at = unsafe { qp.add(row * row_bytes + b * $bytes) };
                                // The same block of the next group of four rows: the
                                // hardware prefetcher alone left a single core at half the
                                // memory bandwidth (9.3 vs 13.4 GB/s measured here).
                                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(ahead) as *const i8);
                                let w = unsafe { $load(at) };
                                let wd = unsafe { _mm256_broadcast_ss(&*sp.add(row * blocks + b)) };
                                let p = _mm256_cvtepi32_ps($dot(w, xv));
                                *a = _mm256_fmadd_ps(p, _mm256_mul_ps(wd, xd), *a);
                            }
                        }
                        for (i, a) in acc.iter().enumerate() {
                            unsafe { *out.add(r + i) = hsum(*a) };
                        }
                        r += 4;
                    }
                    for r in r..rows.end {
                        let mut acc = _mm256_setzero_ps();
                        for b in 0..blocks {
                            let xv =
                                unsafe { _mm256_loadu_si256(xq.add(b * BLOCK) as *const __m256i) };
                            let w = unsafe { $load(qp.add(r * row_bytes + b * $bytes)) };
                            let d = unsafe { *sp.add(r * blocks + b) } * x.d[b];
                            let p = _mm256_cvtepi32_ps($dot(w, xv));
                            acc = _mm256_fmadd_ps(p, _mm256_set1_ps(d), acc);
                        }
                        unsafe { *out.add(r) = hsum(acc) };
                    }
                    return;
                }
                // Several activation rows: widen each weight row once, then four activation
                // rows per pass over it.
                let mut w = vec![_mm256_setzero_si256(); blocks];
                for r in rows {
                    for (b, wb) in w.iter_mut().enumerate() {
                        *wb = unsafe { $load(qp.add(r * row_bytes + b * $bytes)) };
                    }
                    let wd = &scales[r * blocks..(r + 1) * blocks];
                    let mut t = 0;
                    while t < x.rows {
                        let n = (x.rows - t).min(4);
                        let mut acc = [_mm256_setzero_ps(); 4];
                        for b in 0..blocks {
                            let wdb = _mm256_set1_ps(wd[b]);
                            for j in 0..n {
                                let row = t + j;
                                let xv = unsafe {
                                    _mm256_loadu_si256(
                                        xq.add((row * blocks + b) * BLOCK) as *const __m256i
                                    )
                                };
                                let p = _mm256_cvtepi32_ps($dot(w[b], xv));
                                let s = _mm256_mul_ps(wdb, _mm256_set1_ps(x.d[row * blocks + b]));
                                acc[j] = _mm256_fmadd_ps(p, s, acc[j]);
                            }
                        }
                        for j in 0..n {
                            unsafe { *out.add((t + j) * out_stride + r) = hsum(acc[j]) };
                        }
                        t += n;
                    }
                }
            }
        };
    }
    matmul_fn!(matmul_q8_0_avx2, "avx2,fma", load_q8_0, 32, block_dot_avx2);
    matmul_fn!(matmul_q5_0_avx2, "avx2,fma", load_q5_0, 20, block_dot_avx2);
    matmul_fn!(
        matmul_q8_0_vnni,
        "avx2,fma,avxvnni",
        load_q8_0,
        32,
        block_dot_vnni
    );
    matmul_fn!(
        matmul_q5_0_vnni,
        "avx2,fma,avxvnni",
        load_q5_0,
        20,
        block_dot_vnni
    );

    #[inline]
    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    fn block_dot_vnni512(w: __m256i, x: __m256i) -> __m256i {
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx)
    }

    matmul_fn!(
        matmul_q8_0_vnni512,
        "avx2,fma,avx512vnni,avx512vl",
        load_q8_0,
        32,
        block_dot_vnni512
    );
    matmul_fn!(
        matmul_q5_0_vnni512,
        "avx2,fma,avx512vnni,avx512vl",
        load_q5_0,
        20,
        block_dot_vnni512
    );

    /// Activation rows per pass over a tile in the tiled kernels: independent `vpdpbusd`
    /// chains hide the instruction's latency, and each weight load serves them all. Each row's
    /// arithmetic is in the same order as for a row alone, so a row's result does not depend
    /// on how many come with it.
    const GROUP: usize = 4;

    macro_rules! tiles_fn {
        ($name:ident, $features:literal, $dpbusd:ident) => {
            /// The tiled layout (`Layout::Tiles`); `args.rows` counts tiles here.
            ///
            /// For each tile and activation row: per block, eight `vpdpbusd` of the tile's
            /// unsigned bytes with 4 activation bytes broadcast give the 8 rows' integer sums,
            /// scaled by the rows' block scales times the activation's; the +128 offset is
            /// taken off at the end as 128 * sum_b row_scale_b * activation_block_sum_b.
            ///
            /// # Safety
            /// The CPU must have the named features; `args` must describe whole tiles of one
            /// matrix; `args.out` must take `x.rows * out_stride` floats, of which only this
            /// call writes its tiles' rows.
            #[target_feature(enable = $features)]
            pub unsafe fn $name(args: Args<'_>) {
                let Args {
                    quants,
                    scales,
                    blocks,
                    rows: tiles,
                    out_stride,
                    x,
                    out,
                } = args;
                const TILE: usize = super::TILE;
                let tile_bytes = blocks * TILE * BLOCK;
                debug_assert!(tiles.end * tile_bytes <= quants.len());
                debug_assert!(tiles.end * blocks * TILE <= scales.len());
                let offset = _mm256_set1_ps(super::TILE_OFFSET as f32);
                for tile in tiles {
                    // SAFETY (all reads): the tile's bytes and scales lie inside the slices
                    // (checked by the caller's shapes); activation row t's blocks lie inside
                    // `x.q`.
                    let qp = unsafe { quants.as_ptr().add(tile * tile_bytes) };
                    let sp = unsafe { scales.as_ptr().add(tile * blocks * TILE) };
                    if x.rows == 1 {
                        // One stream through the weights: fetch the next tile while this one
                        // runs.
                        let next = qp.wrapping_add(tile_bytes);
                        let mut acc = _mm256_setzero_ps();
                        let mut corr = _mm256_setzero_ps();
                        let xq = x.q.as_ptr();
                        for b in 0..blocks {
                            let wb = unsafe { qp.add(b * TILE * BLOCK) };
                            for line in 0..4 {
                                _mm_prefetch::<_MM_HINT_T0>(
                                    next.wrapping_add(b * TILE * BLOCK + line * 64) as *const i8,
                                );
                            }
                            let mut dot = _mm256_setzero_si256();
                            for c in 0..BLOCK / 4 {
                                let w =
                                    unsafe { _mm256_loadu_si256(wb.add(c * 32) as *const __m256i) };
                                let xv = unsafe {
                                    (xq.add(b * BLOCK + c * 4) as *const i32).read_unaligned()
                                };
                                dot = $dpbusd(dot, w, _mm256_set1_epi32(xv));
                            }
                            let sc = unsafe { _mm256_loadu_ps(sp.add(b * TILE)) };
                            acc = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(dot),
                                _mm256_mul_ps(sc, _mm256_set1_ps(x.d[b])),
                                acc,
                            );
                            corr = _mm256_fmadd_ps(sc, _mm256_set1_ps(x.s[b]), corr);
                        }
                        let res = _mm256_fnmadd_ps(corr, offset, acc);
                        unsafe { _mm256_storeu_ps(out.add(tile * TILE), res) };
                        continue;
                    }
                    let mut t = 0;
                    while t < x.rows {
                        let n = (x.rows - t).min(GROUP);
                        let mut acc = [_mm256_setzero_ps(); GROUP];
                        let mut corr = [_mm256_setzero_ps(); GROUP];
                        for b in 0..blocks {
                            let wb = unsafe { qp.add(b * TILE * BLOCK) };
                            let mut dot = [_mm256_setzero_si256(); GROUP];
                            for c in 0..BLOCK / 4 {
                                let w =
                                    unsafe { _mm256_loadu_si256(wb.add(c * 32) as *const __m256i) };
                                for (j, d) in dot.iter_mut().enumerate().take(n) {
                                    let at = ((t + j) * blocks + b) * BLOCK + c * 4;
                                    let xv = unsafe {
                                        (x.q.as_ptr().add(at) as *const i32).read_unaligned()
                                    };
                                    *d = $dpbusd(*d, w, _mm256_set1_epi32(xv));
                                }
                            }
                            let sc = unsafe { _mm256_loadu_ps(sp.add(b * TILE)) };
                            for j in 0..n {
                                let k = (t + j) * blocks + b;
                                acc[j] = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(dot[j]),
                                    _mm256_mul_ps(sc, _mm256_set1_ps(x.d[k])),
                                    acc[j],
                                );
                                corr[j] = _mm256_fmadd_ps(sc, _mm256_set1_ps(x.s[k]), corr[j]);
                            }
                        }
                        for j in 0..n {
                            let res = _mm256_fnmadd_ps(corr[j], offset, acc[j]);
                            // The 8 rows' results go to 8 consecutive outputs of activation
                            // row t + j.
                            unsafe {
                                _mm256_storeu_ps(out.add((t + j) * out_stride + tile * TILE), res)
                            };
                        }
                        t += n;
                    }
                }
            }
        };
    }
    tiles_fn!(
        matmul_tiles_vnni,
        "avx2,fma,avxvnni",
        _mm256_dpbusd_avx_epi32
    );
    tiles_fn!(
        matmul_tiles_vnni512,
        "avx2,fma,avx512vnni,avx512vl",
        _mm256_dpbusd_epi32
    );

    /// Widens one block's values with the SIMD loaders (for tests against the scalar decoder).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `quants` must hold one block's values.
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn decode(format: super::BlockFormat, quants: &[u8], out: &mut [i8; BLOCK]) {
        let v = unsafe {
            match format {
                super::BlockFormat::Q8_0 => load_q8_0(quants.as_ptr()),
                super::BlockFormat::Q5_0 => load_q5_0(quants.as_ptr()),
            }
        };
        unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, v) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random byte stream (xorshift), so the tests need no extra crate.
    fn bytes(n: usize, mut seed: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    }

    /// Random blocks with small finite f16 scales.
    fn matrix(format: BlockFormat, rows: usize, cols: usize, seed: u64) -> BlockMatrix {
        matrix_as(format, rows, cols, seed, Layout::Rows)
    }

    fn matrix_as(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        seed: u64,
        layout: Layout,
    ) -> BlockMatrix {
        let mut data = bytes(rows * cols / BLOCK * format.block_bytes(), seed);
        for block in data.chunks_exact_mut(format.block_bytes()) {
            let d = f16::from_f32(0.001 + f32::from(block[0]) / 25_600.0);
            block[..2].copy_from_slice(&d.to_le_bytes());
        }
        BlockMatrix::read_as(format, rows, cols, &mut &data[..], layout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn activations(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        bytes(rows * cols, seed)
            .into_iter()
            .map(|b| (f32::from(b) - 127.5) / 40.0)
            .collect()
    }

    /// The f32 product of the dequantized matrix and the (unquantized) activations.
    fn reference(m: &BlockMatrix, x: &[f32], rows: usize) -> Vec<f32> {
        let w: Vec<Vec<f32>> = (0..m.rows())
            .map(|r| m.dequantize_row(r).unwrap_or_default())
            .collect();
        let mut out = vec![0f32; rows * m.rows()];
        for t in 0..rows {
            for (r, wr) in w.iter().enumerate() {
                out[t * m.rows() + r] = wr
                    .iter()
                    .zip(&x[t * m.cols()..(t + 1) * m.cols()])
                    .map(|(a, b)| a * b)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn q5_0_decode_matches_the_ggml_layout() {
        // qh bit j is the fifth bit of value j; nibble byte j holds values j (low) and j+16.
        // (The block's values, without its f16 scale.)
        let mut block = [0u8; 20];
        block[..4].copy_from_slice(&(1u32 | 1 << 17 | 1 << 31).to_le_bytes());
        block[4] = 0x3A; // value 0 = 0xA | 0x10, value 16 = 0x3
        block[5] = 0xF1; // value 1 = 0x1 (bit 1 unset), value 17 = 0xF | 0x10 (bit 17 set)
        let mut scalar = [0i8; BLOCK];
        BlockFormat::Q5_0.decode(&block, &mut scalar);
        assert_eq!(scalar[0], 0x1A - 16);
        assert_eq!(scalar[16], 0x3 - 16);
        assert_eq!(scalar[1], 0x1 - 16);
        assert_eq!(scalar[17], 0x1F - 16);
        assert_eq!(scalar[31], 0x10 - 16);
        assert_eq!(scalar[2], -16);
        #[cfg(target_arch = "x86_64")]
        if Kernel::detect() != Kernel::Scalar {
            for (format, block) in [
                (BlockFormat::Q5_0, &block[..]),
                (BlockFormat::Q8_0, &bytes(32, 3)[..]),
            ] {
                let mut fast = [0i8; BLOCK];
                let mut slow = [0i8; BLOCK];
                // SAFETY: detect() saw AVX2 and FMA; the block is whole.
                unsafe { x86::decode(format, block, &mut fast) };
                format.decode(block, &mut slow);
                assert_eq!(fast, slow, "{format:?}");
            }
        }
    }

    /// Every kernel this CPU can run.
    fn kernels() -> Vec<Kernel> {
        let mut all = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                all.push(Kernel::Avx2);
                if is_x86_feature_detected!("avxvnni") {
                    all.push(Kernel::AvxVnni);
                }
                if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                    all.push(Kernel::Avx512Vnni);
                }
            }
        }
        all
    }

    #[test]
    fn kernels_agree_with_each_other_and_with_f32() {
        // One activation row (decode) and several (prefill, with a partial group of four);
        // 67 output rows leave a partial group of four as well; the tiled layout needs whole
        // tiles of eight (72 rows, 9 tiles, more than the pool's inline threshold at m = 6).
        for (format, m, layout, rows) in [
            (BlockFormat::Q8_0, 1, Layout::Rows, 67),
            (BlockFormat::Q5_0, 1, Layout::Rows, 67),
            (BlockFormat::Q8_0, 6, Layout::Rows, 67),
            (BlockFormat::Q5_0, 6, Layout::Rows, 67),
            (BlockFormat::Q8_0, 1, Layout::Tiles, 72),
            (BlockFormat::Q5_0, 1, Layout::Tiles, 72),
            (BlockFormat::Q8_0, 6, Layout::Tiles, 72),
            (BlockFormat::Q5_0, 6, Layout::Tiles, 72),
        ] {
            let cols = 640;
            let w = matrix_as(format, rows, cols, 7, layout);
            // Both layouts hold the same matrix.
            let plain = matrix(format, rows, cols, 7);
            for r in [0, 5, rows - 1] {
                assert_eq!(
                    w.dequantize_row(r),
                    plain.dequantize_row(r),
                    "{layout:?} row {r}"
                );
            }
            let x = activations(m, cols, 11);
            let xq = QuantizedActivations::new(&x, m, cols).unwrap_or_else(|e| panic!("{e}"));
            let expected = reference(&w, &x, m);
            let mut scalar = vec![0f32; m * rows];
            // SAFETY: `scalar` holds m * rows floats; one thread.
            unsafe { w.rows_into(Kernel::Scalar, 0..rows, &xq, OutPtr(scalar.as_mut_ptr())) };
            let mut pooled = vec![0f32; m * rows];
            w.matmul(&xq, &mut pooled).unwrap_or_else(|e| panic!("{e}"));
            let scale = expected.iter().fold(0f32, |a, v| a.max(v.abs()));
            let mut runs = vec![(Kernel::detect(), pooled)];
            for kernel in kernels() {
                let mut out = vec![0f32; m * rows];
                // SAFETY: `out` holds m * rows floats; one thread.
                unsafe { w.rows_into(kernel, 0..rows, &xq, OutPtr(out.as_mut_ptr())) };
                runs.push((kernel, out));
            }
            for (kernel, fast) in &runs {
                for i in 0..expected.len() {
                    // Integer sums are exact, so kernels differ only by f32 summation order.
                    assert!(
                        (scalar[i] - fast[i]).abs() <= 1e-4 * scale,
                        "{format:?} {layout:?} {kernel:?} m={m} {i}: {} vs {}",
                        scalar[i],
                        fast[i]
                    );
                    // 8-bit activations cost well under 1% of the largest output.
                    assert!(
                        (scalar[i] - expected[i]).abs() <= 0.01 * scale,
                        "{format:?} {i}: {} vs f32 {}",
                        scalar[i],
                        expected[i]
                    );
                }
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        assert!(BlockMatrix::new(BlockFormat::Q8_0, 2, 48, vec![0; 68]).is_err());
        assert!(BlockMatrix::new(BlockFormat::Q8_0, 2, 64, vec![0; 67]).is_err());
        let w = matrix(BlockFormat::Q8_0, 2, 64, 1);
        assert!(w.dequantize_row(2).is_none());
        let x = QuantizedActivations::new(&[0.0; 32], 1, 32).unwrap_or_else(|e| panic!("{e}"));
        assert!(w.matmul(&x, &mut [0.0; 2]).is_err());
        assert!(QuantizedActivations::new(&[0.0; 33], 1, 33).is_err());
    }
}
