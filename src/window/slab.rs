//! The window's slab: one zeroed, 64-byte-aligned byte buffer allocated once.
//!
//! It never grows or moves, so a pointer to it (or a GPU mapping of it) stays valid for the
//! window's life. Allocation goes through `alloc_zeroed`, so untouched pages cost no memory until
//! a bundle is written into them, and failure is an error instead of an abort.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of the slab start, enough for any SIMD load and for a cache line.
pub const SLAB_ALIGN: usize = 64;

#[repr(C, align(64))]
struct Align64([u8; SLAB_ALIGN]);

pub(crate) struct Slab {
    /// Start of `len` initialised bytes, aligned to [`SLAB_ALIGN`]; dangling (but aligned) when
    /// `len == 0`.
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `Slab` uniquely owns its allocation, like a `Box<[u8]>`.
unsafe impl Send for Slab {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for Slab {}

/// Why the slab could not be created.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SlabError {
    /// `len` rounded up to the alignment does not fit in `isize`.
    TooLarge,
    /// The allocator refused.
    AllocFailed,
}

impl Slab {
    pub(crate) fn zeroed(len: usize) -> Result<Slab, SlabError> {
        if len == 0 {
            return Ok(Slab {
                ptr: NonNull::<Align64>::dangling().cast::<u8>(),
                len: 0,
            });
        }
        let layout = Layout::from_size_align(len, SLAB_ALIGN).map_err(|_| SlabError::TooLarge)?;
        // SAFETY: `layout` has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(SlabError::AllocFailed)?;
        Ok(Slab { ptr, len })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` zero-initialised bytes we own (or is aligned and
        // non-null with `len == 0`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Slab {
    fn drop(&mut self) {
        if self.len != 0 {
            // SAFETY: allocated in `zeroed` with exactly this size and alignment, which
            // `from_size_align` accepted then.
            unsafe {
                alloc::dealloc(
                    self.ptr.as_ptr(),
                    Layout::from_size_align_unchecked(self.len, SLAB_ALIGN),
                )
            }
        }
    }
}

impl std::fmt::Debug for Slab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slab")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}
