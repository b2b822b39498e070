//! A model's weight matrices: our own CPU kernels where candle has no fast path for the tensor's
//! format and shape (see the `wattgate-kernels` crate), candle's `QMatMul` everywhere else (K-quants whose
//! width is a multiple of 256, and every tensor on CUDA or Metal).

use std::borrow::Cow;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Storage, Tensor};

use super::gemma3::ModelError;
use wattgate_kernels::{BlockFormat, BlockMatrix, QuantizedActivations, BLOCK};

/// One weight matrix of shape (out, in), applied as `x @ w^T`.
pub enum Linear {
    /// A Q8_0 or Q5_0 matrix on the CPU, run by our kernels.
    Blocks(BlockMatrix),
    /// Anything else, run by candle.
    Candle(QMatMul),
}

impl Linear {
    /// Loads tensor `name` from the GGUF file. Q8_0 and Q5_0 tensors for the CPU are read
    /// straight from the file into our kernels' layout, never holding a second copy.
    pub fn load<R: Read + Seek>(
        content: &Content,
        reader: &mut R,
        name: &str,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let err = |detail: String| ModelError::Tensor {
            name: name.to_owned(),
            detail,
        };
        let info = content
            .tensor_infos
            .get(name)
            .ok_or_else(|| err("not in the GGUF file".to_owned()))?;
        let format = match info.ggml_dtype {
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            GgmlDType::Q5_0 => Some(BlockFormat::Q5_0),
            _ => None,
        };
        if let (Some(format), true) = (format, device.is_cpu()) {
            let (rows, cols) = info.shape.dims2().map_err(|e| err(e.to_string()))?;
            if cols.is_multiple_of(BLOCK) {
                return reader
                    .seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
                    .and_then(|_| BlockMatrix::read(format, rows, cols, reader))
                    .map(Self::Blocks)
                    .map_err(|e| err(format!("reading the {format:?} data: {e}")));
            }
        }
        let tensor = content
            .tensor(reader, name, device)
            .map_err(|e| err(e.to_string()))?;
        Ok(Self::Candle(QMatMul::from_qtensor(tensor)?))
    }

    /// Output features.
    pub fn out_features(&self) -> Result<usize, ModelError> {
        match self {
            Self::Blocks(m) => Ok(m.rows()),
            Self::Candle(QMatMul::QTensor(t)) => Ok(t.shape().dims2()?.0),
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => Ok(t.dims2()?.0),
        }
    }

    /// Input features.
    pub fn in_features(&self) -> Result<usize, ModelError> {
        match self {
            Self::Blocks(m) => Ok(m.cols()),
            Self::Candle(QMatMul::QTensor(t)) => Ok(t.shape().dims2()?.1),
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => Ok(t.dims2()?.1),
        }
    }

    /// `x @ w^T` for `x` of shape (..., in).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Candle(m) => candle_forward(m, x),
            Self::Blocks(m) => {
                let xq = quantize(x, m.cols())?;
                apply(m, &xq, x)
            }
        }
    }

    /// The same input through several matrices (q/k/v, gate/up): for our kernels the input is
    /// quantized once.
    pub fn forward_shared(parts: &[&Linear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let mut xq = None;
        let mut out = Vec::with_capacity(parts.len());
        for part in parts {
            out.push(match part {
                Self::Candle(m) => candle_forward(m, x)?,
                Self::Blocks(m) => {
                    if xq
                        .as_ref()
                        .is_none_or(|q: &QuantizedActivations| q.cols() != m.cols())
                    {
                        xq = Some(quantize(x, m.cols())?);
                    }
                    match &xq {
                        Some(q) => apply(m, q, x)?,
                        None => candle_core::bail!("activations were not quantized"),
                    }
                }
            });
        }
        Ok(out)
    }

    /// Rows `ids` of the matrix as f32, shape (len, in): the embedding lookup of a tied
    /// embedding table, which stays quantized in memory.
    pub fn rows(&self, ids: &[u32], device: &Device) -> Result<Tensor, ModelError> {
        let (vocab, width) = (self.out_features()?, self.in_features()?);
        let check = |t: u32| {
            let t = t as usize;
            if t < vocab {
                Ok(t)
            } else {
                Err(ModelError::Limit(format!(
                    "token id {t} is outside the vocabulary of {vocab}"
                )))
            }
        };
        match self {
            Self::Blocks(m) => {
                let mut data = Vec::with_capacity(ids.len() * width);
                for &t in ids {
                    let row = m.dequantize_row(check(t)?).ok_or_else(|| {
                        ModelError::Limit(format!("token id {t} is outside the vocabulary"))
                    })?;
                    data.extend(row);
                }
                Ok(Tensor::from_vec(data, (ids.len(), width), device)?)
            }
            Self::Candle(QMatMul::QTensor(q)) => {
                let dtype = q.dtype();
                let data = q.data()?;
                let row_bytes = width / dtype.block_size() * dtype.type_size();
                let mut rows = Vec::with_capacity(ids.len());
                for &t in ids {
                    let t = check(t)?;
                    let bytes = &data[t * row_bytes..(t + 1) * row_bytes];
                    let row = QTensor::new(
                        QStorage::from_data(Cow::Borrowed(bytes), device, dtype)?,
                        (1, width),
                    )?;
                    rows.push(row.dequantize(device)?);
                }
                Ok(Tensor::cat(&rows, 0)?)
            }
            Self::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => {
                let checked = ids.iter().map(|&t| check(t).map(|t| t as u32));
                let ids = checked.collect::<Result<Vec<u32>, _>>()?;
                let n = ids.len();
                let ids = Tensor::from_vec(ids, n, device)?;
                Ok(w.index_select(&ids, 0)?.to_dtype(candle_core::DType::F32)?)
            }
        }
    }
}

/// candle's product, giving every row the same result whether it runs alone or with others.
///
/// On x86-64 candle multiplies a Q6_K matrix by one row with a kernel on the compact blocks and
/// by several rows with repacked tiles, and the two round differently (by about 1e-6 here).
/// Through 18 layers that moves a logit by up to 0.6, enough to change a greedy token, so a
/// sequence decoded alone would answer differently from the same sequence in a batch, and a
/// prompt resumed from the prefix cache differently from one computed whole. A single row is
/// therefore run as two (itself twice): the tiles' extra bandwidth on one row is under 2% of a
/// decode step's bytes for Gemma 3 270M, and the answer no longer depends on the company.
fn candle_forward(m: &QMatMul, x: &Tensor) -> candle_core::Result<Tensor> {
    let single_q6k = matches!(m, QMatMul::QTensor(t) if t.dtype() == GgmlDType::Q6K)
        && x.device().is_cpu()
        && x.dims().iter().rev().skip(1).product::<usize>() == 1;
    if !single_q6k {
        return m.forward(x);
    }
    let dims = x.dims().to_vec();
    let width = dims.last().copied().unwrap_or(0);
    let row = x.reshape((1, width))?;
    let twice = Tensor::cat(&[&row, &row], 0)?;
    let out = m.forward(&twice)?.narrow(0, 0, 1)?;
    let mut out_dims = dims;
    if let Some(last) = out_dims.last_mut() {
        *last = out.dim(1)?;
    }
    out.reshape(out_dims)
}

/// Quantizes `x` (..., cols) for our kernels, reading the CPU storage in place.
fn quantize(x: &Tensor, cols: usize) -> candle_core::Result<QuantizedActivations> {
    let x = x.contiguous()?;
    let rows = x.elem_count() / cols.max(1);
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("block kernels run on the CPU only");
    };
    let start = layout.start_offset();
    let data = cpu
        .as_slice::<f32>()?
        .get(start..start + rows * cols)
        .ok_or_else(|| candle_core::Error::Msg("activations shorter than their shape".into()))?;
    QuantizedActivations::new(data, rows, cols).map_err(candle_core::Error::Msg)
}

/// Runs one matrix on already quantized activations; the result has `x`'s shape with the last
/// dimension replaced by the matrix's output width.
fn apply(m: &BlockMatrix, xq: &QuantizedActivations, x: &Tensor) -> candle_core::Result<Tensor> {
    let mut out = vec![0f32; xq.rows() * m.rows()];
    m.matmul(xq, &mut out).map_err(candle_core::Error::Msg)?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = m.rows();
    }
    Tensor::from_vec(out, dims, x.device())
}
