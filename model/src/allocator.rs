//! How this process's allocator keeps freed memory for reuse.
//!
//! A training step allocates and frees the same large tensors step after step (activations,
//! their gradients, the optimizer's temporaries: tens of MiB each on a 44M-parameter model).
//! glibc's malloc serves a block above its mmap threshold (at most 32 MiB, adjusted as the
//! process runs) with a fresh `mmap` and returns it with `munmap` when freed, and gives the top
//! of its heap back to the OS above a trim threshold; every such block is then zero-filled page
//! by page by the kernel on its first touch. On `small-d512` (16 x 256 tokens, 2 threads) that
//! kernel's share was large (sys 9.8-12.0 s in runs of 20.8-24.3 s). [`keep_freed_memory`]
//! raises both thresholds once at start-up, so freed blocks stay in the heap and the next step
//! reuses them: the same step ran at about 1.4x the tokens/s on `main`, with the same peak
//! resident memory (measured with `GLIBC_TUNABLES`, which sets the same two values; README,
//! "Training speed"). A thread other than `main` (the learner service's) allocates from arenas
//! of 64 MiB heaps, where a larger block is mapped on its own whatever the threshold: there the
//! gain was 1.2-1.3x.
//!
//! The cost: up to [`TRIM_THRESHOLD`] of freed memory stays with the process instead of going
//! back to the OS, and blocks below [`MMAP_THRESHOLD`] come from the heap, where they can leave
//! holes. A user who chose malloc settings of their own (`GLIBC_TUNABLES` naming
//! `glibc.malloc.`) keeps them.

/// Blocks at least this large are still mapped on their own and unmapped when freed.
pub const MMAP_THRESHOLD: usize = 256 << 20;
/// Free memory at the top of the heap beyond this goes back to the OS.
pub const TRIM_THRESHOLD: usize = 1 << 30;

/// What [`keep_freed_memory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorSetting {
    /// The thresholds were raised to [`MMAP_THRESHOLD`] and [`TRIM_THRESHOLD`].
    Applied,
    /// `GLIBC_TUNABLES` sets malloc options: the user's settings are kept.
    LeftToTheUser,
    /// Not glibc's malloc: nothing to set.
    NotGlibc,
}

impl std::fmt::Display for AllocatorSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Applied => write!(
                f,
                "glibc malloc keeping freed memory (mmap threshold {} MiB, trim threshold {} MiB)",
                MMAP_THRESHOLD >> 20,
                TRIM_THRESHOLD >> 20
            ),
            Self::LeftToTheUser => f.write_str("glibc malloc as GLIBC_TUNABLES sets it"),
            Self::NotGlibc => f.write_str("the system allocator, unchanged"),
        }
    }
}

/// Raises glibc malloc's mmap and trim thresholds for this process (see the module docs);
/// call it once, early in `main`.
pub fn keep_freed_memory() -> AllocatorSetting {
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if tunables.contains("glibc.malloc.") {
        return AllocatorSetting::LeftToTheUser;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> AllocatorSetting {
    // SAFETY: mallopt only changes malloc's parameters; glibc takes its own lock for it.
    let (mmap, trim) = unsafe {
        (
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int),
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int),
        )
    };
    // mallopt returns 1 on success; both values are within glibc's limits (32 MiB is the
    // default maximum of the dynamic threshold, HEAP_MAX is not a limit for an explicit one).
    debug_assert!(mmap == 1 && trim == 1, "mallopt refused: {mmap} {trim}");
    AllocatorSetting::Applied
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> AllocatorSetting {
    AllocatorSetting::NotGlibc
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// glibc marks a chunk served by its own `mmap` with bit 1 (IS_MMAPPED) of the size word
    /// just before the pointer it returns.
    fn served_by_its_own_mapping(bytes: usize) -> bool {
        // SAFETY: a plain malloc/free pair; the size word before a malloc'd pointer is part of
        // glibc's chunk header, readable for as long as the chunk is allocated.
        unsafe {
            let p = libc::malloc(bytes) as *const usize;
            assert!(!p.is_null());
            let mapped = *p.sub(1) & 2 != 0;
            libc::free(p as *mut libc::c_void);
            mapped
        }
    }

    #[test]
    fn freed_blocks_below_the_threshold_come_from_the_heap() {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
            return;
        }
        assert_eq!(keep_freed_memory(), AllocatorSetting::Applied);
        // 40 MiB is above glibc's largest dynamic threshold (32 MiB), so mapped on its own
        // unless the threshold was raised, and fits the 64 MiB heaps of the arena a test
        // thread (not `main`) allocates from.
        assert!(!served_by_its_own_mapping(40 << 20));
        assert!(served_by_its_own_mapping(MMAP_THRESHOLD + (1 << 20)));
    }
}
