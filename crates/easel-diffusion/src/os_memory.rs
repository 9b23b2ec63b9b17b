//! Returning freed memory to the operating system.
//!
//! Weights are many allocations of 1–50 MB. glibc's allocator serves
//! allocations below its mmap threshold (adaptive, up to 32 MB on 64-bit)
//! from its heaps and keeps their pages when they are freed, so a model
//! dropped after use (FLUX's T5 under `--offload-t5`, a model evicted from
//! the engine's cache) can leave gigabytes resident that the next stage
//! cannot use for its own, larger, mmapped buffers. [`release_freed_memory`]
//! hands those pages back.

/// Give the pages of freed heap memory back to the operating system
/// (glibc's `malloc_trim(0)`, which since glibc 2.8 releases free pages
/// anywhere in its heaps, not only at their top). Call it after dropping
/// something large. A no-op on other C libraries, whose allocators return
/// memory on their own terms.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it
    // takes the allocator's locks and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
