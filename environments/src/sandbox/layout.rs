//! What the sandbox shows of the host: the interpreter, the system directories it needs, and
//! the environment and paths a program sees.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use super::SandboxError;

/// The working directory inside the sandbox, the only writable place.
pub(crate) const WORKDIR: &str = "/tmp";
/// Size of that directory's tmpfs, and the largest file a program may write.
pub(crate) const WORKDIR_BYTES: u64 = 64 << 20;
/// System directories shown read-only when they exist (symlinks are recreated as symlinks).
pub(crate) const SYSTEM_DIRS: [&str; 7] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];
/// Single files of `/etc` the dynamic linker and interpreter use; nothing else of `/etc`.
pub(crate) const ETC_FILES: [&str; 1] = ["/etc/ld.so.cache"];
/// Device nodes shown inside.
pub(crate) const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

/// The interpreter the sandbox offers.
#[derive(Debug, Clone)]
pub(crate) struct Python {
    /// The real executable (not a pyenv shim), as a path valid both outside and inside.
    pub executable: String,
    /// Directories outside `/usr` it needs (its prefix and base prefix), shown read-only at the
    /// same paths inside.
    pub roots: Vec<PathBuf>,
}

const PROBE: &str = "import sys; print(sys.executable); print(sys.prefix); print(sys.base_prefix)";

impl Python {
    /// Every working interpreter, best first: `python3` from `PATH`, then `/usr/bin/python3`;
    /// each asked where it really lives. An error lists why each candidate failed.
    pub fn find_all() -> Result<Vec<Python>, SandboxError> {
        let mut candidates: Vec<PathBuf> = find_in_path("python3").into_iter().collect();
        candidates.push(PathBuf::from("/usr/bin/python3"));
        let mut found: Vec<Python> = Vec::new();
        let mut errors = Vec::new();
        for candidate in candidates {
            match Self::probe(&candidate) {
                Ok(python) if found.iter().any(|p| p.executable == python.executable) => {}
                Ok(python) => found.push(python),
                Err(err) => errors.push(format!("{}: {err}", candidate.display())),
            }
        }
        if found.is_empty() {
            return Err(SandboxError::NoPython(errors.join("; ")));
        }
        Ok(found)
    }

    /// Whether a user other than its owner can reach the interpreter and its directories.
    pub fn reachable_by_others(&self) -> bool {
        reachable_by_others(Path::new(&self.executable))
            && self.roots.iter().all(|root| reachable_by_others(root))
    }

    fn probe(candidate: &Path) -> Result<Python, String> {
        let output = Command::new(candidate)
            .args(["-c", PROBE])
            .output()
            .map_err(|err| err.to_string())?;
        if !output.status.success() {
            return Err(format!("exited with {}", output.status));
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let lines: Vec<&str> = text.lines().collect();
        let [executable, prefix, base_prefix] = lines.as_slice() else {
            return Err(format!("unexpected output {text:?}"));
        };
        if !executable.starts_with('/') || !Path::new(executable).exists() {
            return Err(format!(
                "sys.executable {executable:?} is not an absolute path"
            ));
        }
        let mut roots = Vec::new();
        for dir in [prefix, base_prefix] {
            let dir = std::fs::canonicalize(dir).map_err(|err| format!("{dir}: {err}"))?;
            if !dir.starts_with("/usr") && !roots.contains(&dir) {
                roots.push(dir);
            }
        }
        // The executable itself may be a symlink out of the prefix (a venv): show its target's
        // prefix too.
        let real = std::fs::canonicalize(executable).map_err(|err| err.to_string())?;
        if let Some(bin_parent) = real.parent().and_then(Path::parent)
            && !bin_parent.starts_with("/usr")
            && !roots.iter().any(|root| real.starts_with(root))
        {
            roots.push(bin_parent.to_path_buf());
        }
        Ok(Python {
            executable: executable.to_string(),
            roots,
        })
    }

    /// The directory of the executable, first on the sandbox's `PATH`.
    pub fn bin_dir(&self) -> &str {
        self.executable
            .rsplit_once('/')
            .map(|(dir, _)| dir)
            .filter(|dir| !dir.is_empty())
            .unwrap_or("/usr/bin")
    }
}

/// The first executable file `name` on `PATH`.
pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether every directory above `path` lets other users through (`o+x`).
fn reachable_by_others(path: &Path) -> bool {
    path.ancestors()
        .skip(1)
        .all(|dir| std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// The host directory the namespaces backend mounts its new root on: an empty directory only
/// this user can use.
pub(crate) fn root_mountpoint() -> Result<PathBuf, SandboxError> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let dir = std::env::temp_dir().join(format!("chorus-sandbox-root-{uid}"));
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(SandboxError::Os {
                what: format!("creating {}", dir.display()),
                source,
            });
        }
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(|source| SandboxError::Os {
        what: format!("inspecting {}", dir.display()),
        source,
    })?;
    use std::os::unix::fs::MetadataExt;
    if !meta.is_dir() || meta.uid() != uid {
        return Err(SandboxError::Unavailable(format!(
            "{} is not a directory owned by uid {uid}",
            dir.display()
        )));
    }
    Ok(dir)
}

/// A C string, or an error naming `what` held a NUL byte.
pub(crate) fn c_string(bytes: &[u8], what: &str) -> Result<CString, SandboxError> {
    CString::new(bytes.to_vec())
        .map_err(|_| SandboxError::InvalidRequest(format!("{what} contains a NUL byte")))
}

/// The environment every program gets (nothing is inherited from the host).
pub(crate) fn environment(python: &Python) -> Vec<String> {
    vec![
        format!("PATH={}:/usr/local/bin:/usr/bin:/bin", python.bin_dir()),
        format!("HOME={WORKDIR}"),
        format!("TMPDIR={WORKDIR}"),
        "LANG=C.UTF-8".into(),
        "LC_ALL=C.UTF-8".into(),
        "PYTHONHASHSEED=0".into(),
        "PYTHONDONTWRITEBYTECODE=1".into(),
        "PYTHONUTF8=1".into(),
        "PYTHONNOUSERSITE=1".into(),
    ]
}

/// `argv[0]` as an absolute path: kept if it contains a `/`, else looked up on the sandbox's
/// `PATH` (whose directories are the host's, shown at the same paths).
pub(crate) fn resolve_program(program: &str, python: &Python) -> Result<String, SandboxError> {
    if program.is_empty() {
        return Err(SandboxError::InvalidRequest("argv[0] is empty".into()));
    }
    if program.contains('/') {
        return Ok(program.to_string());
    }
    [python.bin_dir(), "/usr/local/bin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable(candidate))
        .map(|found| found.display().to_string())
        .ok_or_else(|| {
            SandboxError::InvalidRequest(format!(
                "program `{program}` is not on the sandbox's PATH"
            ))
        })
}

/// Checks a request file's path: relative, plain components only (no `..`, no `.`).
pub(crate) fn check_file_path(path: &str) -> Result<(), SandboxError> {
    let bad = |why: &str| SandboxError::InvalidRequest(format!("file path {path:?} {why}"));
    if path.is_empty() {
        return Err(bad("is empty"));
    }
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    for component in Path::new(path).components() {
        match component {
            Component::Normal(_) => {}
            Component::RootDir => {
                return Err(bad(
                    "is absolute (it must be relative to the working directory)",
                ));
            }
            _ => return Err(bad("may not contain `.` or `..`")),
        }
    }
    Ok(())
}

/// The parent directories of request files, parents first, deduplicated (relative paths).
pub(crate) fn file_dirs<'a>(paths: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut dirs: Vec<String> = Vec::new();
    for path in paths {
        let mut ancestors: Vec<&Path> = Path::new(path)
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .collect();
        ancestors.reverse();
        for dir in ancestors {
            let dir = dir.display().to_string();
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

/// Remount flags a read-only bind of `path` must keep (its mount's locked `nosuid`, `nodev`,
/// `noexec` and atime flags).
pub(crate) fn locked_flags(path: &Path) -> libc::c_ulong {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs writes into the zeroed struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and stat is valid.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return 0;
    }
    let pairs = [
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    pairs
        .iter()
        .filter(|(st, _)| stat.f_flag & st != 0)
        .fold(0, |flags, (_, ms)| flags | ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_paths_must_stay_inside() {
        assert!(check_file_path("a/b.py").is_ok());
        for bad in ["", "/etc/x", "../x", "a/../../x", "./a", "a\0b"] {
            let err = check_file_path(bad).unwrap_err().to_string();
            assert!(err.contains("file path"), "{bad:?}: {err}");
        }
        assert_eq!(
            file_dirs(["a/b/c.py", "a/d.py", "e.py"].into_iter()),
            vec!["a".to_string(), "a/b".to_string()]
        );
    }
}
