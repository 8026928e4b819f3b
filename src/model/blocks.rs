//! A weight matrix kept in the GGUF file's own quantised blocks, for decode steps.
//!
//! The f32 weights the model trains with are exactly the dequantisation of these blocks, so a
//! product that dequantises each block on the fly (with the same two roundings, `q·d` then `+ m`)
//! and accumulates in the same order as the f32 kernel gives bit-identical results, while
//! streaming 5 (Q4_1) or 8.5 (Q8_0) bits per weight instead of 32.

use candle_core::quantized::GgmlDType;
use half::f16;

/// Block formats the decode kernel reads. Both hold 32 weights per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// `f16 d, f16 m, 16 bytes`: weight `j` is `nibble_j · d + m`, low nibbles first.
    Q4_1,
    /// `f16 d, 32 × i8`: weight `j` is `q_j · d`.
    Q8_0,
}

pub const BLOCK: usize = 32;

impl BlockFormat {
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    pub fn bytes_per_block(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// A `(rows, cols)` matrix stored row by row in blocks of 32 weights.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRows {
    pub format: BlockFormat,
    pub rows: usize,
    pub cols: usize,
    bytes: Vec<u8>,
}

impl BlockRows {
    /// `bytes` as read from the file; `None` when the sizes do not describe such a matrix.
    pub fn new(format: BlockFormat, rows: usize, cols: usize, bytes: Vec<u8>) -> Option<Self> {
        let fits = cols.is_multiple_of(BLOCK)
            && rows
                .checked_mul(cols / BLOCK * format.bytes_per_block())
                .is_some_and(|n| n == bytes.len());
        fits.then_some(Self {
            format,
            rows,
            cols,
            bytes,
        })
    }

    pub fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.bytes_per_block()
    }

    /// The blocks of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.bytes[r * n..(r + 1) * n]
    }

    /// The same matrix with its rows reordered: output row `i` is input row `order[i]`.
    pub fn with_row_order(&self, order: &[usize]) -> Self {
        let bytes = order.iter().flat_map(|&r| self.row(r)).copied().collect();
        Self {
            bytes,
            ..self.clone()
        }
    }

    /// Row `r` as f32, exactly as candle dequantises it.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        dequantize(self.format, self.row(r))
    }
}

/// Whole blocks of `format` as f32, exactly as candle dequantises them.
pub fn dequantize(format: BlockFormat, blocks: &[u8]) -> Vec<f32> {
    let mut out = Vec::with_capacity(blocks.len() / format.bytes_per_block() * BLOCK);
    for block in blocks.chunks_exact(format.bytes_per_block()) {
        let d = half_at(block, 0);
        match format {
            BlockFormat::Q4_1 => {
                let m = half_at(block, 2);
                let qs = &block[4..20];
                out.extend(qs.iter().map(|q| f32::from(q & 0x0F) * d + m));
                out.extend(qs.iter().map(|q| f32::from(q >> 4) * d + m));
            }
            BlockFormat::Q8_0 => {
                out.extend(block[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
    }
    out
}

/// The little-endian f16 at `at`, widened.
#[inline(always)]
pub fn half_at(block: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([block[at], block[at + 1]])).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn dequantisation_matches_candle_for_both_formats() {
        let mut rng = StdRng::seed_from_u64(21);
        let (rows, cols) = (5, 96);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random::<f32>() * 0.4 - 0.2)
            .collect();
        let w = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        for (dtype, format) in [
            (GgmlDType::Q4_1, BlockFormat::Q4_1),
            (GgmlDType::Q8_0, BlockFormat::Q8_0),
        ] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let want = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let blocks = BlockRows::new(format, rows, cols, q.data().unwrap().to_vec()).unwrap();
            for (r, want_row) in want.iter().enumerate() {
                assert_eq!(&blocks.dequantize_row(r), want_row, "{format:?} row {r}");
            }
            let reordered = blocks.with_row_order(&[4, 0, 3, 1, 2]);
            assert_eq!(reordered.dequantize_row(0), want[4]);
            assert_eq!(reordered.dequantize_row(4), want[2]);
        }
    }

    #[test]
    fn sizes_that_do_not_fit_are_refused() {
        assert!(BlockRows::new(BlockFormat::Q4_1, 2, 32, vec![0; 40]).is_some());
        assert!(BlockRows::new(BlockFormat::Q4_1, 2, 32, vec![0; 39]).is_none());
        assert!(BlockRows::new(BlockFormat::Q8_0, 1, 33, vec![0; 34]).is_none());
    }
}
