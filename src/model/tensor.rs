//! Weight tensors as the engine sees them: a dtype, a 2-D shape and bytes.
//!
//! Convention (ggml's and HF `nn.Linear`'s alike): a matrix is `rows x cols` with each row
//! contiguous; a linear layer `y = W x` has `rows = out_features`, `cols = in_features`, so a
//! matvec is one dot product per row. Quantised rows are whole blocks; `cols` is a multiple of
//! the dtype's block size. Bytes are either borrowed from a memory-mapped file or owned.

use std::sync::Arc;

use memmap2::Mmap;

use crate::quant::DType;

/// Where a tensor's bytes live.
#[derive(Clone)]
pub enum Storage {
    /// A range of a memory-mapped file (zero copy; the OS pages it in).
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
    /// Bytes owned by the process.
    Owned(Arc<Vec<u8>>),
}

impl Storage {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            Storage::Owned(v) => v,
        }
    }
}

/// A named 1-D or 2-D tensor. 1-D tensors have `rows == 1`.
#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    storage: Storage,
}

impl Tensor {
    /// Wraps `storage`, checking that it holds exactly `rows x cols` elements of `dtype`.
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        rows: usize,
        cols: usize,
        storage: Storage,
    ) -> Result<Tensor, TensorError> {
        let name = name.into();
        let row_bytes = dtype.bytes_for(cols).ok_or_else(|| TensorError::Shape {
            name: name.clone(),
            detail: format!("row of {cols} elements is not a whole number of {dtype} blocks"),
        })?;
        let want = row_bytes
            .checked_mul(rows)
            .ok_or_else(|| TensorError::Shape {
                name: name.clone(),
                detail: format!("{rows} x {cols} {dtype} overflows"),
            })?;
        let have = storage.bytes().len();
        if have != want {
            return Err(TensorError::Shape {
                name,
                detail: format!("{rows} x {cols} {dtype} needs {want} bytes, storage has {have}"),
            });
        }
        Ok(Tensor {
            name,
            dtype,
            rows,
            cols,
            storage,
        })
    }

    /// An owned f32 tensor (used for small resident vectors and in tests).
    pub fn from_f32(name: impl Into<String>, rows: usize, cols: usize, data: &[f32]) -> Tensor {
        let bytes: Vec<u8> = bytemuck::cast_slice(data).to_vec();
        Tensor::new(
            name,
            DType::F32,
            rows,
            cols,
            Storage::Owned(Arc::new(bytes)),
        )
        .expect("from_f32: data length must be rows * cols")
    }

    pub fn bytes(&self) -> &[u8] {
        self.storage.bytes()
    }

    pub fn row_bytes(&self) -> usize {
        self.bytes().len() / self.rows.max(1)
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.bytes()[r * n..(r + 1) * n]
    }

    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({} {} [{} x {}])",
            self.name, self.dtype, self.rows, self.cols
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("tensor `{name}`: {detail}")]
    Shape { name: String, detail: String },
}
