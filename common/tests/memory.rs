//! `keep_freed_memory`: a large block freed and allocated again is served from memory the process
//! already has, without faulting its pages in a second time. Its own binary without the test
//! harness, so the allocator is set before any other thread exists, as in the services' `main`.

const BLOCK: usize = 256 << 20;
const PAGE: usize = 4096;

fn minor_faults() -> i64 {
    // SAFETY: `getrusage` writes only into the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    usage.ru_minflt
}

/// Allocates `BLOCK` bytes, writes one byte per page, frees them; returns the page faults taken.
fn fill_and_free() -> i64 {
    let before = minor_faults();
    let mut block = vec![0u8; BLOCK];
    for i in (0..BLOCK).step_by(PAGE) {
        block[i] = 1;
    }
    std::hint::black_box(&block);
    drop(block);
    minor_faults() - before
}

fn main() {
    osprey_common::memory::keep_freed_memory();
    let pages = (BLOCK / PAGE) as i64;
    let first = fill_and_free();
    // The first pass must fault (otherwise this test could not see the difference).
    assert!(first > pages / 2, "first pass: {first} faults for {pages} pages");
    let second = fill_and_free();
    assert!(
        second < pages / 16,
        "second pass: {second} faults for {pages} pages (first {first}): freed memory was returned"
    );
    println!("memory: first pass {first} page faults, second {second} ({pages} pages)");
}
