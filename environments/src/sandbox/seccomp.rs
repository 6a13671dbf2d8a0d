//! The system-call filter a sandboxed program runs under: a classic BPF program for
//! `seccomp(SECCOMP_SET_MODE_FILTER)`, written by hand.
//!
//! It kills a process making a system call for another architecture (the i386 ABI through
//! `int 0x80` on x86_64, say), answers `EPERM` to the calls a test program never needs
//! (debugging other processes, mounts, BPF, keyrings, kernel modules, reboot, swap, clock
//! setting, file handles, namespace creation: `unshare`, `setns`, `clone` with any `CLONE_NEW*`
//! flag), `ENOSYS` to `clone3` (whose flags sit in memory a filter cannot read; the C library
//! then falls back to `clone`, whose flags it can) and allows everything else. The namespaces
//! backend installs it in the program's process right before `execve` (after `no_new_privs` and
//! dropping to the unprivileged uid); bubblewrap loads the same bytes through `--seccomp FD`.

use std::fmt;

use libc::sock_filter;

/// `AUDIT_ARCH_*` (`EM_*` | 64-bit | little-endian), not exported by the `libc` crate.
const AUDIT_ARCH_64BIT_LE: u32 = 0x8000_0000 | 0x4000_0000;
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = AUDIT_ARCH_64BIT_LE | 62;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = AUDIT_ARCH_64BIT_LE | 183;

/// x32 system calls on x86_64 have this bit set in their number.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Offsets into `struct seccomp_data { int nr; u32 arch; u64 ip; u64 args[6]; }`.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
/// The low 32 bits of `args[0]`.
#[cfg(target_endian = "little")]
const OFFSET_ARG0_LOW: u32 = 16;
#[cfg(target_endian = "big")]
const OFFSET_ARG0_LOW: u32 = 20;

/// Every `CLONE_NEW*` flag `clone` accepts (`CLONE_NEWTIME` is `unshare`/`clone3` only; in
/// `clone`'s flags its bit is part of the exit signal).
const CLONE_NEW_MASK: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u32;

/// `personality(PER_LINUX)` and `personality(0xffffffff)` (a query) stay allowed.
const PERSONALITY_DEFAULT: u32 = 0;
const PERSONALITY_QUERY: u32 = 0xffff_ffff;

/// The calls answered with `EPERM` on every supported architecture.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const DENIED_COMMON: [libc::c_long; 38] = [
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_userfaultfd,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_fanotify_init,
];
#[cfg(target_arch = "x86_64")]
const DENIED_ARCH: [libc::c_long; 4] = [
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_lookup_dcookie,
    libc::SYS_uselib,
];
#[cfg(target_arch = "aarch64")]
const DENIED_ARCH: [libc::c_long; 1] = [libc::SYS_lookup_dcookie];

/// A compiled filter.
#[derive(Clone)]
pub(crate) struct Filter {
    insns: Vec<sock_filter>,
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Filter({} instructions)", self.insns.len())
    }
}

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

fn load(offset: u32) -> sock_filter {
    stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset)
}

fn ret(action: u32) -> sock_filter {
    stmt(libc::BPF_RET | libc::BPF_K, action)
}

fn errno(code: i32) -> u32 {
    libc::SECCOMP_RET_ERRNO | (code as u32 & libc::SECCOMP_RET_DATA)
}

impl Filter {
    /// The filter for this machine's architecture; `None` where none is written (neither
    /// x86_64 nor aarch64), and the sandbox then runs without one.
    pub fn for_this_arch() -> Option<Filter> {
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        {
            let denied: Vec<u32> = DENIED_COMMON
                .iter()
                .chain(DENIED_ARCH.iter())
                .map(|&nr| nr as u32)
                .collect();
            Some(Self::build(
                AUDIT_ARCH,
                &denied,
                libc::SYS_clone as u32,
                libc::SYS_clone3 as u32,
                libc::SYS_personality as u32,
                cfg!(target_arch = "x86_64"),
            ))
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            None
        }
    }

    fn build(
        arch: u32,
        denied: &[u32],
        clone: u32,
        clone3: u32,
        personality: u32,
        deny_x32: bool,
    ) -> Filter {
        let eq = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
        let mut insns = vec![
            load(OFFSET_ARCH),
            jump(eq, arch, 1, 0),
            ret(libc::SECCOMP_RET_KILL_PROCESS),
            load(OFFSET_NR),
        ];
        if deny_x32 {
            #[cfg(target_arch = "x86_64")]
            insns.extend([
                jump(
                    libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
                    X32_SYSCALL_BIT,
                    0,
                    1,
                ),
                ret(errno(libc::EPERM)),
            ]);
        }
        for &nr in denied {
            insns.extend([jump(eq, nr, 0, 1), ret(errno(libc::EPERM))]);
        }
        insns.extend([
            jump(eq, clone3, 0, 1),
            ret(errno(libc::ENOSYS)),
            // clone: inspect the flags.
            jump(eq, clone, 0, 4),
            load(OFFSET_ARG0_LOW),
            jump(
                libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
                CLONE_NEW_MASK,
                0,
                1,
            ),
            ret(errno(libc::EPERM)),
            ret(libc::SECCOMP_RET_ALLOW),
            // personality: the default and the query only.
            jump(eq, personality, 0, 5),
            load(OFFSET_ARG0_LOW),
            jump(eq, PERSONALITY_DEFAULT, 2, 0),
            jump(eq, PERSONALITY_QUERY, 1, 0),
            ret(errno(libc::EPERM)),
            ret(libc::SECCOMP_RET_ALLOW),
            ret(libc::SECCOMP_RET_ALLOW),
        ]);
        Filter { insns }
    }

    /// The instructions, for `struct sock_fprog`.
    pub fn instructions(&self) -> &[sock_filter] {
        &self.insns
    }

    /// The program as bytes in the kernel's layout (`bwrap --seccomp` reads these).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.insns.len() * 8);
        for insn in &self.insns {
            bytes.extend_from_slice(&insn.code.to_ne_bytes());
            bytes.push(insn.jt);
            bytes.push(insn.jf);
            bytes.extend_from_slice(&insn.k.to_ne_bytes());
        }
        bytes
    }
}

/// Installs `insns` on the calling thread. Async-signal-safe: no allocation.
///
/// # Safety
/// `no_new_privs` must be set (or the caller have `CAP_SYS_ADMIN`); the filter applies to
/// every later system call of this thread and its children.
pub(crate) unsafe fn install(insns: &[sock_filter]) -> bool {
    let prog = libc::sock_fprog {
        len: insns.len() as libc::c_ushort,
        filter: insns.as_ptr().cast_mut(),
    };
    // SAFETY: prog points to a valid filter for the duration of the call (the kernel copies it).
    unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &prog as *const libc::sock_fprog,
            0,
            0,
        ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a filter on one system call, as the kernel would: the subset of classic BPF the
    /// filter uses (absolute 32-bit loads, `jeq`/`jge`/`jset` on constants, `ret`).
    fn verdict(filter: &Filter, arch: u32, nr: u32, arg0: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        data[16..24].copy_from_slice(&arg0.to_ne_bytes());
        let insns = filter.instructions();
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let insn = insns.get(pc).expect("the program ran off its end");
            let code = u32::from(insn.code);
            pc += 1;
            if code == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS {
                let at = insn.k as usize;
                acc = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
            } else if code == libc::BPF_RET | libc::BPF_K {
                return insn.k;
            } else {
                let taken = match code {
                    c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => acc == insn.k,
                    c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => acc >= insn.k,
                    c if c == libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K => acc & insn.k != 0,
                    other => panic!("unexpected instruction {other:#x}"),
                };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
        }
    }

    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn the_filter_checks_the_architecture_then_denies_the_listed_calls() {
        let filter = Filter::for_this_arch().expect("a filter for this architecture");
        let n = filter.instructions().len();
        assert!(n <= libc::BPF_MAXINSNS as usize, "{n} instructions");
        assert_eq!(filter.to_bytes().len(), n * 8);
        // The first instructions load the architecture and kill on a mismatch.
        let first = filter.instructions()[0];
        assert_eq!(
            u32::from(first.code),
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS
        );
        assert_eq!(first.k, OFFSET_ARCH);
        let eperm = errno(libc::EPERM);
        let nr = |n: libc::c_long| n as u32;
        // Another ABI (i386 is 0x40000003) is killed whatever the call.
        assert_eq!(
            verdict(&filter, 0x4000_0003, nr(libc::SYS_getpid), 0),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        for denied in DENIED_COMMON.iter().chain(DENIED_ARCH.iter()) {
            assert_eq!(
                verdict(&filter, AUDIT_ARCH, nr(*denied), 0),
                eperm,
                "{denied}"
            );
        }
        for allowed in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_mmap,
            libc::SYS_wait4,
            libc::SYS_futex,
            libc::SYS_exit_group,
        ] {
            assert_eq!(
                verdict(&filter, AUDIT_ARCH, nr(allowed), 0),
                libc::SECCOMP_RET_ALLOW,
                "{allowed}"
            );
        }
        assert_eq!(
            verdict(&filter, AUDIT_ARCH, nr(libc::SYS_clone3), 0),
            errno(libc::ENOSYS)
        );
        // fork() and pthread_create() as glibc makes them through clone.
        let fork = u64::from(libc::SIGCHLD as u32)
            | (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u64;
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        let vfork = (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64;
        for flags in [fork, thread, vfork] {
            assert_eq!(
                verdict(&filter, AUDIT_ARCH, nr(libc::SYS_clone), flags),
                libc::SECCOMP_RET_ALLOW,
                "{flags:#x}"
            );
        }
        for new in [
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWNS,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWCGROUP,
        ] {
            assert_eq!(
                verdict(&filter, AUDIT_ARCH, nr(libc::SYS_clone), fork | new as u64),
                eperm,
                "{new:#x}"
            );
        }
        let personality = nr(libc::SYS_personality);
        assert_eq!(
            verdict(&filter, AUDIT_ARCH, personality, 0),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(
            verdict(&filter, AUDIT_ARCH, personality, 0xffff_ffff),
            libc::SECCOMP_RET_ALLOW
        );
        // ADDR_NO_RANDOMIZE
        assert_eq!(verdict(&filter, AUDIT_ARCH, personality, 0x0040000), eperm);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            verdict(
                &filter,
                AUDIT_ARCH,
                X32_SYSCALL_BIT | nr(libc::SYS_getpid),
                0
            ),
            eperm
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_bytes_are_the_kernel_layout() {
        let filter = Filter::for_this_arch().unwrap();
        let bytes = filter.to_bytes();
        // ld [4]: code 0x20, jt 0, jf 0, k 4.
        assert_eq!(&bytes[..8], &[0x20, 0, 0, 0, 4, 0, 0, 0]);
        // jeq #AUDIT_ARCH_X86_64 (0xc000003e), 1, 0
        assert_eq!(&bytes[8..16], &[0x15, 0, 1, 0, 0x3e, 0, 0, 0xc0]);
    }
}
