//! GPU buffers: uploads of weights and vectors, and readbacks.

use wgpu::util::DeviceExt;

use crate::backend::gpu::device::GpuContext;
use crate::backend::gpu::kernels::dtype_code;
use crate::backend::gpu::GpuError;
use crate::model::tensor::Tensor;
use crate::quant::DType;

/// Bytes added after every storage buffer's data: kernels read raw blocks a `u32` at a time at
/// offsets that are 2 mod 4 by splicing two words (shaders/lib/quant.wgsl), and the splice of the
/// last word reads one word further.
const TAIL_PAD: u64 = 4;

/// Storage buffers may be read, written, and copied both ways (uploads and readbacks).
const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// The size of a storage buffer holding `len` bytes: rounded up to whole words, plus the tail.
fn padded(len: u64) -> u64 {
    len.div_ceil(4) * 4 + TAIL_PAD
}

fn check_binding(ctx: &GpuContext, what: &str, bytes: u64) -> Result<(), GpuError> {
    if bytes > ctx.max_binding() {
        return Err(GpuError::TooLarge {
            what: what.to_string(),
            bytes,
            limit: ctx.max_binding(),
            adapter: ctx.info.name.clone(),
        });
    }
    Ok(())
}

/// A storage buffer holding `bytes` (padded, see `TAIL_PAD`).
pub fn storage_bytes(ctx: &GpuContext, what: &str, bytes: &[u8]) -> Result<wgpu::Buffer, GpuError> {
    let size = padded(bytes.len() as u64);
    check_binding(ctx, what, size)?;
    // One copy into a padded vector: simpler than writing through a mapped range, and uploads
    // happen once per weight.
    let mut data = Vec::with_capacity(size as usize);
    data.extend_from_slice(bytes);
    data.resize(size as usize, 0);
    Ok(ctx
        .device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(what),
            contents: &data,
            usage: STORAGE,
        }))
}

/// A storage buffer holding `data`.
pub fn storage_f32(ctx: &GpuContext, what: &str, data: &[f32]) -> Result<wgpu::Buffer, GpuError> {
    storage_bytes(ctx, what, bytemuck::cast_slice(data))
}

/// A zeroed storage buffer with room for `len` bytes (wgpu zero-initialises new buffers).
pub fn storage_zeroed(ctx: &GpuContext, what: &str, len: u64) -> Result<wgpu::Buffer, GpuError> {
    let size = padded(len);
    check_binding(ctx, what, size)?;
    Ok(ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(what),
        size,
        usage: STORAGE,
        mapped_at_creation: false,
    }))
}

/// A uniform buffer holding `value` (a `#[repr(C)]` struct laid out as the shader's, padded to
/// 16 bytes).
pub fn uniform<T: bytemuck::Pod>(ctx: &GpuContext, what: &str, value: &T) -> wgpu::Buffer {
    ctx.device
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(what),
            contents: bytemuck::bytes_of(value),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
}

/// One row range of a matrix, in a buffer of its own.
#[derive(Debug)]
pub struct MatrixChunk {
    pub buffer: wgpu::Buffer,
    pub first_row: usize,
    pub rows: usize,
}

/// A weight matrix on the GPU: raw ggml rows in the file's dtype, split into chunks of whole
/// rows that each fit one storage binding (lavapipe allows 128 MiB; a 150k x 1536 f16 vocabulary
/// is 450 MiB).
#[derive(Debug)]
pub struct GpuMatrix {
    pub name: String,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub chunks: Vec<MatrixChunk>,
}

impl GpuMatrix {
    /// Uploads `t` (copied once; the GPU keeps its own copy).
    pub fn upload(ctx: &GpuContext, t: &Tensor) -> Result<GpuMatrix, GpuError> {
        GpuMatrix::from_bytes(ctx, &t.name, t.dtype, t.rows, t.cols, t.bytes())
    }

    /// Uploads `rows x cols` values of `dtype` held in `bytes`.
    pub fn from_bytes(
        ctx: &GpuContext,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<GpuMatrix, GpuError> {
        if dtype_code(dtype).is_none() {
            return Err(GpuError::UnsupportedDtype {
                what: format!("tensor `{name}`"),
                dtype,
            });
        }
        let row_bytes = dtype.bytes_for(cols).ok_or_else(|| {
            GpuError::Shape(format!(
                "tensor `{name}`: {cols} columns are not whole {dtype} blocks"
            ))
        })?;
        if bytes.len() != row_bytes * rows {
            return Err(GpuError::Shape(format!(
                "tensor `{name}`: {rows} x {cols} {dtype} needs {} bytes, got {}",
                row_bytes * rows,
                bytes.len()
            )));
        }
        let room = ctx.max_binding().saturating_sub(TAIL_PAD + 4) as usize;
        let per_chunk = (room / row_bytes.max(1)).max(1);
        if row_bytes > room {
            return Err(GpuError::TooLarge {
                what: format!("one row of tensor `{name}`"),
                bytes: row_bytes as u64,
                limit: ctx.max_binding(),
                adapter: ctx.info.name.clone(),
            });
        }
        let mut chunks = Vec::new();
        let mut first = 0;
        while first < rows.max(1) {
            let n = per_chunk.min(rows - first);
            let data = &bytes[first * row_bytes..(first + n) * row_bytes];
            let what = format!("{name}[{first}..{}]", first + n);
            chunks.push(MatrixChunk {
                buffer: storage_bytes(ctx, &what, data)?,
                first_row: first,
                rows: n,
            });
            first += n;
            if rows == 0 {
                break;
            }
        }
        Ok(GpuMatrix {
            name: name.to_string(),
            dtype,
            rows,
            cols,
            row_bytes,
            chunks,
        })
    }

    /// The chunk holding row `r` and the row's index within it.
    pub fn chunk_of(&self, r: usize) -> Option<(&MatrixChunk, usize)> {
        self.chunks
            .iter()
            .find(|c| r >= c.first_row && r < c.first_row + c.rows)
            .map(|c| (c, r - c.first_row))
    }
}

/// A reusable MAP_READ buffer: copies of GPU results land here and are read after the queue
/// finishes.
pub struct Readback {
    buffer: wgpu::Buffer,
    size: u64,
}

impl Readback {
    pub fn new(ctx: &GpuContext, size: u64) -> Readback {
        let size = size.div_ceil(4) * 4;
        Readback {
            buffer: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size: size.max(4),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            size: size.max(4),
        }
    }

    /// Records a copy of `src[offset..offset + len]` (`offset` a multiple of 4) into the start
    /// of this buffer.
    pub fn record(
        &self,
        enc: &mut wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        offset: u64,
        len: u64,
    ) {
        let len = (len.div_ceil(4) * 4).min(self.size);
        enc.copy_buffer_to_buffer(src, offset, &self.buffer, 0, len);
    }

    /// Waits for the queue, then copies the first `out.len()` words into `out`.
    pub fn read<T: bytemuck::Pod>(&self, ctx: &GpuContext, out: &mut [T]) -> Result<(), GpuError> {
        let len = std::mem::size_of_val(out) as u64;
        if len > self.size {
            return Err(GpuError::Readback(format!(
                "asked for {len} bytes from a {}-byte readback buffer",
                self.size
            )));
        }
        if len == 0 {
            return Ok(());
        }
        let slice = self.buffer.slice(..len);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        ctx.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        rx.recv()
            .map_err(|e| GpuError::Readback(e.to_string()))?
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        {
            let view = slice
                .get_mapped_range()
                .map_err(|e| GpuError::Readback(e.to_string()))?;
            out.copy_from_slice(bytemuck::cast_slice(&view[..len as usize]));
        }
        self.buffer.unmap();
        Ok(())
    }
}

/// Copies `n` values of `buf` back to the CPU (tests and one-off reads).
pub fn read<T: bytemuck::Pod + Default>(
    ctx: &GpuContext,
    buf: &wgpu::Buffer,
    n: usize,
) -> Result<Vec<T>, GpuError> {
    let mut out = vec![T::default(); n];
    let len = std::mem::size_of_val(out.as_slice()) as u64;
    let rb = Readback::new(ctx, len);
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    rb.record(&mut enc, buf, 0, len);
    ctx.queue.submit([enc.finish()]);
    rb.read(ctx, &mut out)?;
    Ok(out)
}

/// Overwrites the start of `buf` with `data` (ordered before the next submission).
pub fn write<T: bytemuck::Pod>(ctx: &GpuContext, buf: &wgpu::Buffer, data: &[T]) {
    let bytes: &[u8] = bytemuck::cast_slice(data);
    if bytes.len().is_multiple_of(4) {
        ctx.queue.write_buffer(buf, 0, bytes);
    } else {
        // write_buffer wants whole words.
        let mut v = bytes.to_vec();
        v.resize(bytes.len().div_ceil(4) * 4, 0);
        ctx.queue.write_buffer(buf, 0, &v);
    }
}
