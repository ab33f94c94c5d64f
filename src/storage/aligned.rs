//! A heap buffer aligned to [`ALIGN`](super::ALIGN), as direct I/O requires.

use super::{StorageError, ALIGN};
use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// A zeroed heap buffer whose address and length are multiples of 4096 bytes.
///
/// The length asked for is rounded up to the next multiple of 4096 (`new(1).len() == 4096`,
/// `new(0).len() == 0`). Dereferences to `[u8]`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Size of the allocation (at least `ALIGN`, so that a zero-length buffer is still a real
    /// allocation and the pointer is valid and aligned).
    cap: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` rounded up to a multiple of 4096 bytes.
    ///
    /// Aborts through [`alloc::handle_alloc_error`] if the allocator fails, like `Vec`; use
    /// [`AlignedBuf::try_new`] for sizes that come from input.
    pub fn new(len: usize) -> Self {
        match Self::try_new(len) {
            Ok(b) => b,
            Err(_) => {
                let layout = Layout::from_size_align(ALIGN, ALIGN).expect("4096 is a valid layout");
                alloc::handle_alloc_error(layout)
            }
        }
    }

    /// Like [`AlignedBuf::new`], but returns an error instead of aborting.
    pub fn try_new(len: usize) -> Result<Self, StorageError> {
        let rounded = len
            .checked_next_multiple_of(ALIGN)
            .ok_or(StorageError::Alloc { bytes: len })?;
        let cap = rounded.max(ALIGN);
        let layout =
            Layout::from_size_align(cap, ALIGN).map_err(|_| StorageError::Alloc { bytes: len })?;
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(StorageError::Alloc { bytes: len })?;
        Ok(Self {
            ptr,
            len: rounded,
            cap,
        })
    }

    /// Length in bytes (a multiple of 4096).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `try_new` with exactly this layout.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, ALIGN),
            )
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len <= cap` bytes are allocated and initialised (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_rounded_and_zeroed() {
        for len in [0usize, 1, 4095, 4096, 4097, 100_000, 1 << 20] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0, "len {len}");
            assert_eq!(b.len() % ALIGN, 0);
            assert!(b.len() >= len && b.len() < len + ALIGN);
            assert!(b.iter().all(|&x| x == 0));
            b.iter_mut().for_each(|x| *x = 7);
            assert!(b.iter().all(|&x| x == 7));
        }
        assert!(AlignedBuf::new(0).is_empty());
        assert!(AlignedBuf::try_new(usize::MAX).is_err());
        fn send_sync<T: Send + Sync>() {}
        send_sync::<AlignedBuf>();
    }
}
