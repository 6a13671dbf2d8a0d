//! How many threads the CPU kernels use, within the CPUs this process may run on.
//!
//! candle 0.11 sizes its thread pools (its barrier pool for element-wise kernels, the task count
//! of its matrix products) by the machine's physical cores, whatever the process's CPU affinity
//! (`taskset`, a Slurm or Kubernetes cpuset, a cgroup CPU quota). A learner confined to one of
//! two cores then runs two threads that spin-wait for each other on that one core: the training
//! bench on `nano-1.5m` under `taskset -c 0` ran at about half the speed it reaches with one
//! thread. [`fit_to_allowed_cpus`] gives candle and rayon the count the process may use.

/// The number of CPUs this process may run on (its affinity mask and CPU quota).
pub fn allowed_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The environment variables that size candle's and rayon's pools (`CANDLE_NUM_THREADS`,
/// `RAYON_NUM_THREADS`) and the value each should get, for a process allowed `allowed` CPUs on
/// a machine of `physical` cores: the allowed count when it is below the physical one (candle
/// would otherwise start a thread per physical core), nothing otherwise. A variable the user
/// set is left alone.
pub fn pool_settings(
    allowed: usize,
    physical: usize,
    set: impl Fn(&str) -> bool,
) -> Vec<(&'static str, String)> {
    if allowed >= physical {
        return vec![];
    }
    ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"]
        .into_iter()
        .filter(|name| !set(name))
        .map(|name| (name, allowed.to_string()))
        .collect()
}

/// Sets [`pool_settings`] for this process and returns what it set.
///
/// # Safety
/// Changes the process environment: call it before any other thread exists (first thing in
/// `main`), as `std::env::set_var` requires.
pub unsafe fn fit_to_allowed_cpus() -> Vec<(&'static str, String)> {
    let settings = pool_settings(allowed_cpus(), num_cpus::get_physical(), |name| {
        std::env::var_os(name).is_some()
    });
    for (name, value) in &settings {
        // SAFETY: the caller guarantees no other thread exists.
        unsafe { std::env::set_var(name, value) };
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_shrink_to_the_allowed_cpus_only_when_fewer_than_the_cores() {
        let none = |_: &str| false;
        assert_eq!(
            pool_settings(1, 2, none),
            [
                ("CANDLE_NUM_THREADS", "1".to_string()),
                ("RAYON_NUM_THREADS", "1".to_string())
            ]
        );
        assert!(pool_settings(2, 2, none).is_empty());
        assert!(pool_settings(16, 8, none).is_empty());
        let user_chose_rayon = |name: &str| name == "RAYON_NUM_THREADS";
        assert_eq!(
            pool_settings(3, 8, user_chose_rayon),
            [("CANDLE_NUM_THREADS", "3".to_string())]
        );
    }
}
