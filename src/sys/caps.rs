//! Dropping every capability once setup is done (all but CAP_BPF where the kernel wants it for map access).

use std::io;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// CAP_BPF's bit in the second capability word (CAP_BPF is 39).
const CAP_BPF_HIGH_BIT: u32 = 1 << (39 - 32);

/// Sets the calling thread's capability sets (effective, permitted; inheritable cleared).
fn set(effective: [u32; 2], permitted: [u32; 2]) -> io::Result<()> {
    let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [0, 1].map(|word| CapData { effective: effective[word], permitted: permitted[word], inheritable: 0 });
    // SAFETY: capset reads a v3 header and two CapData words, which is what we pass.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the relay must keep CAP_BPF to go on using the BPF maps it has open. Older kernels
/// (Debian 11's 5.10) check every bpf() command, map updates on open fds included, against
/// kernel.unprivileged_bpf_disabled; newer ones (Debian 12's 6.1) only loading and creating.
/// `use_map` is tried on a thread of its own with no effective capability (capabilities are
/// per thread, so the caller keeps its own).
pub fn maps_need_cap_bpf(use_map: impl FnOnce() -> io::Result<()> + Send) -> io::Result<bool> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                set([0, 0], [0, 0])?;
                Ok(matches!(use_map(), Err(error) if error.raw_os_error() == Some(libc::EPERM)))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Clears the calling thread's effective, permitted, inheritable and ambient
/// capabilities (all but CAP_BPF with `keep_bpf`) and sets no_new_privs.
/// Capabilities are per thread: call it before spawning the threads that should run without them.
pub fn drop_all(keep_bpf: bool) -> io::Result<()> {
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let kept = [0, if keep_bpf { CAP_BPF_HIGH_BIT } else { 0 }];
    set(kept, kept)?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
