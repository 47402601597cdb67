//! Whether a process listens on a unix socket path, read from
//! `/proc/net/unix` rather than by connecting: a probe connection would be
//! taken by a single-connection listener (a vhost-user backend) as its
//! client and end its run.

use std::path::Path;

/// `SO_ACCEPTCON` in the flags column of `/proc/net/unix`: a listening socket.
const SO_ACCEPTCON: u32 = 1 << 16;

/// True when `/proc/net/unix` lists a listening socket bound to `path`
/// (as given, or made absolute against the current directory).
///
/// The table lists a path as its binder spelled it, so a socket bound
/// through a relative path from another directory is missed; false also
/// when the table cannot be read.
pub fn is_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let mut names = vec![path.to_path_buf()];
    if let Ok(abs) = std::path::absolute(path) {
        names.push(abs);
    }
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let listening = fields
            .get(3)
            .and_then(|f| u32::from_str_radix(f, 16).ok())
            .is_some_and(|flags| flags & SO_ACCEPTCON != 0);
        listening
            && fields
                .get(7)
                .is_some_and(|p| names.iter().any(|n| n.as_os_str() == *p))
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn a_bound_listener_is_seen_and_a_closed_one_is_not() {
        let path = std::env::temp_dir().join(format!("fl-probe-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        assert!(is_listening(&path));
        drop(listener);
        assert!(path.exists(), "the stale file stays");
        assert!(!is_listening(&path));
        std::fs::remove_file(&path).unwrap();
    }
}
