//! Errno names for the result line's `errors_by_errno` (`-ETIMEDOUT` from a
//! fence becomes `"ETIMEDOUT"`).

/// The name of `errno` (either sign): `"ETIMEDOUT"`, or `"ERRNO_n"` for a
/// number this table does not know.
pub fn name(errno: i32) -> String {
    let n = errno.unsigned_abs();
    match NAMES
        .iter()
        .chain(KERNEL)
        .find(|(value, _)| value.unsigned_abs() == n)
    {
        Some((_, name)) => (*name).to_string(),
        None => format!("ERRNO_{n}"),
    }
}

macro_rules! names {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name))),*]
    };
}

/// The errnos a fence can end with, and their names (libc has no
/// `strerrorname_np` in every C library, hence the table).
const NAMES: &[(i32, &str)] = names!(
    EPERM,
    ENOENT,
    ESRCH,
    EINTR,
    EIO,
    ENXIO,
    E2BIG,
    EBADF,
    EAGAIN,
    ENOMEM,
    EACCES,
    EFAULT,
    EBUSY,
    EEXIST,
    ENODEV,
    EINVAL,
    ENFILE,
    EMFILE,
    ENOTTY,
    ENOSPC,
    EPIPE,
    ERANGE,
    EDEADLK,
    ENOSYS,
    ENODATA,
    ETIME,
    ENOLINK,
    EPROTO,
    EBADMSG,
    EOVERFLOW,
    EOPNOTSUPP,
    ECONNRESET,
    ESHUTDOWN,
    ETIMEDOUT,
    EHOSTDOWN,
    EALREADY,
    ECANCELED,
    EOWNERDEAD,
    ENOTRECOVERABLE,
    EHWPOISON,
);

/// Kernel-internal errnos that can still reach userspace as a fence error.
const KERNEL: &[(i32, &str)] = &[(512, "ERESTARTSYS"), (524, "ENOTSUPP")];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_either_sign() {
        assert_eq!(name(-libc::ETIMEDOUT), "ETIMEDOUT");
        assert_eq!(name(libc::ENODEV), "ENODEV");
        assert_eq!(name(-libc::EIO), "EIO");
        assert_eq!(name(-libc::ECANCELED), "ECANCELED");
        assert_eq!(name(-524), "ENOTSUPP");
        assert_eq!(name(-4000), "ERRNO_4000");
        assert_eq!(name(i32::MIN), "ERRNO_2147483648");
    }

    #[test]
    fn the_table_has_no_duplicates() {
        let all: Vec<i32> = NAMES.iter().chain(KERNEL).map(|(v, _)| *v).collect();
        for (i, v) in all.iter().enumerate() {
            assert!(!all[i + 1..].contains(v), "errno {v} listed twice");
        }
    }
}
