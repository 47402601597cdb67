//! What the console puts in front of a kernel message: a `<4>` log level
//! (kmsg dumps), the printk timestamp `[   12.345678]`, the caller id
//! `[  T123]` / `[    C1]` (`CONFIG_PRINTK_CALLER`), and carriage returns
//! left by progress output.

/// One console line split into its printk caller and its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleLine<'a> {
    /// The printk caller id (`T123` for a task, `C1` for a CPU in
    /// interrupt context), when the kernel prints them. Lines of one splat
    /// share it; lines of another CPU's splat printed meanwhile do not.
    pub caller: Option<&'a str>,
    /// It had a printk timestamp. In a log whose kernel lines have one, a
    /// line without is user space writing to the same console.
    pub timestamped: bool,
    /// The message, indentation kept (call traces and KTAP nest by it),
    /// trailing whitespace removed.
    pub body: &'a str,
}

/// Splits a raw console line. Only the prefixes printk adds are removed: a
/// bracketed word that is not a timestamp or caller id (`[drm] …`) stays.
pub fn split(raw: &str) -> ConsoleLine<'_> {
    let line = raw.trim_end_matches(['\r', '\n']);
    // A carriage return in the middle: the terminal shows what follows it.
    let line = match line.rfind('\r') {
        Some(at) => &line[at + 1..],
        None => line,
    };
    let line = strip_log_level(line);
    let (had_timestamp, line) = match strip_bracket(line, is_timestamp) {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    let (caller, line) = match bracket(line).filter(|(inner, _)| is_caller(inner)) {
        Some((inner, rest)) => (Some(inner.trim()), rest),
        None => (None, line),
    };
    let body = if had_timestamp || caller.is_some() {
        // printk separates the prefix from the message with one space.
        line.strip_prefix(' ').unwrap_or(line)
    } else {
        line
    };
    ConsoleLine {
        caller,
        timestamped: had_timestamp,
        body: body.trim_end(),
    }
}

/// `<4>` at the start of a line, as `dmesg -r` and kmsg dumps print it.
fn strip_log_level(line: &str) -> &str {
    let bytes = line.as_bytes();
    if bytes.len() >= 3 && bytes[0] == b'<' && bytes[1].is_ascii_digit() && bytes[2] == b'>' {
        &line[3..]
    } else {
        line
    }
}

/// The text inside a leading `[...]` (leading blanks allowed) and what
/// follows the closing bracket.
fn bracket(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let end = rest.find(']')?;
    Some((&rest[..end], &rest[end + 1..]))
}

fn strip_bracket(line: &str, accept: fn(&str) -> bool) -> Option<&str> {
    bracket(line)
        .filter(|(inner, _)| accept(inner))
        .map(|(_, rest)| rest)
}

/// `   12.345678`: digits and one dot.
fn is_timestamp(inner: &str) -> bool {
    let inner = inner.trim();
    !inner.is_empty()
        && inner.chars().all(|c| c.is_ascii_digit() || c == '.')
        && inner.chars().filter(|&c| c == '.').count() <= 1
}

/// `  T123` or `    C1`.
fn is_caller(inner: &str) -> bool {
    let inner = inner.trim();
    let mut chars = inner.chars();
    matches!(chars.next(), Some('T' | 'C')) && inner.len() > 1 && chars.all(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_timestamp_and_caller_and_keeps_indentation() {
        let line = split("[  897.203644][ T1083]  virtqueue_add+0x20e2/0x60f0");
        assert_eq!(line.caller, Some("T1083"));
        assert_eq!(line.body, " virtqueue_add+0x20e2/0x60f0");
        let cpu = split("[  204.021600][    C1] rcu: INFO: rcu_preempt detected stalls");
        assert_eq!(cpu.caller, Some("C1"));
        assert_eq!(cpu.body, "rcu: INFO: rcu_preempt detected stalls");
        // One space after the timestamp, as the LKP robot's decoded logs print it.
        let tight = split("[ 221.378447][ T7133] dump_stack_lvl (lib/dump_stack.c:107) ");
        assert_eq!(tight.caller, Some("T7133"));
        assert_eq!(tight.body, "dump_stack_lvl (lib/dump_stack.c:107)");
    }

    #[test]
    fn timestamp_only_log_level_and_carriage_returns() {
        assert_eq!(
            split("[   12.345678] BUG: x\r"),
            ConsoleLine {
                caller: None,
                timestamped: true,
                body: "BUG: x"
            }
        );
        assert!(!split("fence-hammer: smoke: first fence").timestamped);
        assert_eq!(
            split("<4>[    3.581234] ------------[ cut here ]------------").body,
            "------------[ cut here ]------------"
        );
        assert_eq!(
            split("50%\r75%\r[    1.0] Oops: 0000 [#1]").body,
            "Oops: 0000 [#1]"
        );
    }

    #[test]
    fn leaves_other_brackets_and_plain_lines_alone() {
        assert_eq!(
            split("[drm] features: +virgl").body,
            "[drm] features: +virgl"
        );
        assert_eq!(split("FENCELAB_BOOT release=7.3.4").caller, None);
        assert_eq!(split("[TASK] not a caller").body, "[TASK] not a caller");
        assert_eq!(split("   indented").body, "   indented");
    }
}
