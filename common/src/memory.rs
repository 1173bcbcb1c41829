//! How the model services use the C heap (glibc's malloc, which Rust's default allocator calls).
//!
//! A forward pass allocates and frees tensors of tens to hundreds of megabytes many times over
//! (SAM ViT-B's global attention scores are 805 MB each). By default glibc serves every block
//! above ~32 MB with a fresh `mmap` and unmaps it on free, and trims the heap's free top, so the
//! next pass faults the same memory in again page by page and the kernel zeroes it: ViT-B spent
//! 45 of its 133 CPU-seconds in the kernel that way. Keeping freed memory in the process removes
//! that; the cost is that the resident size stays at the largest working set seen, which is what
//! a model server needs on its next request anyway.

/// Serves every allocation from one heap that is never trimmed, so freed memory is reused
/// instead of being returned to the kernel and faulted in again: no `mmap` per large block, one
/// arena for every thread (per-thread arenas cap their heaps at 64 MB and fall back to `mmap`
/// above that), no automatic trimming. Call first thing in `main`, before any thread starts.
/// `OSPREY_MALLOC_DEFAULTS=1` keeps glibc's defaults (a comparison, or a machine short of
/// memory). Does nothing on other C libraries.
pub fn keep_freed_memory() {
    if std::env::var_os("OSPREY_MALLOC_DEFAULTS").is_some_and(|v| v == "1") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; these three are valid for every glibc.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_ARENA_MAX, 1);
        // -1 disables trimming altogether.
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
    }
}

/// Hands the heap's free pages back to the kernel once, e.g. after loading weights, whose
/// staging buffers (a whole `.bin` shard, bf16 copies) would otherwise stay resident.
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` walks the allocator's own free lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
