//! A splat's signature: its class and a title with everything that differs
//! between two hits of the same bug taken out (addresses, pids, timestamps,
//! offsets, line numbers, task names), so that a soak can count a bug once
//! however often it fires. Where the first line does not tell two bugs apart
//! (every lockdep cycle says "possible circular locking dependency"), the
//! signature adds what does: the locks, the guilty stack frame, the access.
//! The approach follows syzkaller's report titles (`pkg/report/linux.go`).

/// The signature of a splat of `class` whose title line is `title`, followed
/// on the console (same printk caller) by `after_title`.
pub fn signature(class: &str, title: &str, after_title: &[&str]) -> String {
    let detail = match class {
        "kasan" | "ubsan" => sanitizer(title, after_title),
        "warning" => warning(title),
        "suspicious-rcu" => suspicious_rcu(title, after_title),
        "kmemleak" => with_frame(
            "unreferenced object",
            guilty_frame(after_title, ALLOCATOR_FRAMES),
        ),
        "hung-task" => match guilty_frame(after_title, WAIT_FRAMES) {
            Some(frame) => format!("INFO: task hung in {frame}"),
            None => normalize(title),
        },
        "page-fault" | "gpf" | "oops" | "kernel-bug" => {
            with_frame(&normalize(title), crash_site(after_title))
        }
        "sleep-in-atomic" | "scheduling-while-atomic" | "refcount" | "list-corruption" => {
            with_frame(
                &normalize(title),
                guilty_frame(after_title, REPORTING_FRAMES),
            )
        }
        c if c.starts_with("lockdep-") => lockdep(title, after_title),
        _ => normalize(title),
    };
    format!("{class}: {detail}")
}

fn with_frame(what: &str, frame: Option<String>) -> String {
    match frame {
        Some(frame) => format!("{what} in {frame}"),
        None => what.to_owned(),
    }
}

/// `BUG: KASAN: slab-use-after-free in f+0x2c/0x300` + `Read of size 8 …`
/// → `KASAN: slab-use-after-free Read in f`.
fn sanitizer(title: &str, after: &[&str]) -> String {
    let report = title
        .find("KASAN:")
        .or_else(|| title.find("UBSAN:"))
        .map_or(title, |at| &title[at..]);
    let access = after.iter().take(3).find_map(|l| {
        let l = l.trim();
        ["Read of size", "Write of size"]
            .iter()
            .find(|a| l.starts_with(*a))
            .map(|a| &a[..a.find(' ').unwrap_or(a.len())])
    });
    match (report.split_once(" in "), access) {
        (Some((kind, place)), Some(access)) => {
            normalize(&format!("{kind} {access} in {}", symbol(place)))
        }
        (Some((kind, place)), None) => normalize(&format!("{kind} in {}", symbol(place))),
        (None, _) => normalize(report),
    }
}

/// All the kernel's WARNING formats → `WARNING in FUNCTION (FILE)`:
/// `WARNING: CPU: 1 PID: 1 at FILE:LINE FUNC+0x5a/0x80`,
/// `WARNING: FILE:LINE at FUNC+0x5a/0x80, CPU#1: comm/1` (7.x),
/// `WARNING: at FUNC+0x5a/0x80, CPU#1: comm/1`.
fn warning(title: &str) -> String {
    let Some(body) = title.strip_prefix("WARNING:").map(str::trim) else {
        return normalize(title);
    };
    let body = body.split(", CPU#").next().unwrap_or(body);
    let (file, func) = if let Some(rest) = body.strip_prefix("CPU:") {
        // Old format: `CPU: 1 PID: 1 at FILE:LINE FUNC+off`.
        match rest.split_once(" at ") {
            Some((_, place)) => {
                let mut words = place.split_whitespace();
                (words.next(), words.next())
            }
            None => (None, None),
        }
    } else if let Some(func) = body.strip_prefix("at ") {
        (None, Some(func))
    } else {
        match body.split_once(" at ") {
            Some((file, func)) => (Some(file), Some(func)),
            None => (None, None),
        }
    };
    match func {
        Some(func) => {
            let file = file
                .map(|f| f.rsplit_once(':').map_or(f, |(path, _line)| path))
                .map(|f| format!(" ({f})"))
                .unwrap_or_default();
            normalize(&format!("WARNING in {}{file}", symbol(func)))
        }
        None => normalize(title),
    }
}

/// The offending site: `FILE:LINE suspicious rcu_dereference_check() usage!`.
fn suspicious_rcu(title: &str, after: &[&str]) -> String {
    let site = after
        .iter()
        .take(6)
        .map(|l| l.trim())
        .find(|l| l.contains(".c:") || l.contains(".h:") || l.contains(".rs:"));
    match site {
        Some(site) => normalize(&format!("suspicious RCU usage at {site}")),
        None => normalize(title),
    }
}

/// Lock classes: `acquiring (B) while holding (A)`, or the first held lock.
fn lockdep(title: &str, after: &[&str]) -> String {
    let lock_after = |marker: &str| {
        after
            .iter()
            .position(|l| l.contains(marker))
            .and_then(|at| after.get(at + 1))
            .and_then(|l| lock_name(l))
    };
    let title = normalize(
        title
            .trim_start_matches("WARNING: ")
            .trim_start_matches("[ ")
            .trim_end_matches(" ]"),
    );
    match (
        lock_after("is trying to acquire").or_else(|| lock_after("is trying to lock")),
        lock_after("already holding lock"),
    ) {
        (Some(new), Some(held)) => format!("{title}: acquiring {new} while holding {held}"),
        (Some(new), None) => format!("{title}: acquiring {new}"),
        _ => match after
            .iter()
            .find(|l| l.trim_start().starts_with("#0:"))
            .and_then(|l| lock_name(l))
        {
            Some(lock) => format!("{title}: {lock}"),
            None => title,
        },
    }
}

/// `ffff8880724887d0 (&oi->ip_io_mutex){+.+.}-{4:4}, at: …` → `&oi->ip_io_mutex`
/// (parentheses nest: `(&q->q_usage_counter(io)#24)`).
fn lock_name(line: &str) -> Option<String> {
    let start = line.find('(')?;
    let mut depth = 0usize;
    for (i, c) in line[start..].char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some(normalize(&line[start + 1..start + i]));
                }
            }
            _ => {}
        }
    }
    None
}

/// Where the CPU was when it crashed: the kernel-mode `RIP:`/`EIP:` line,
/// or arm's `pc :` / `PC is at`.
fn crash_site(after: &[&str]) -> Option<String> {
    after.iter().find_map(|l| {
        let l = l.trim();
        let place = l
            .strip_prefix("RIP: 0010:")
            .or_else(|| l.strip_prefix("EIP: "))
            .or_else(|| l.strip_prefix("pc : "))
            .or_else(|| l.strip_prefix("PC is at "))?;
        let name = frame_name(place)?;
        Some(normalize(&name))
    })
}

/// Frames that report a problem rather than cause it.
const REPORTING_FRAMES: &[&str] = &[
    "dump_stack",
    "__dump_stack",
    "show_stack",
    "__might_resched",
    "__might_sleep",
    "___might_sleep",
    "__might_fault",
    "might_sleep",
    "__cond_resched",
    "__schedule_bug",
    "refcount_",
    "__refcount_",
    "__list_",
    "list_",
    "check_data_corruption",
    "__warn",
    "warn_",
    "report_bug",
    "handle_bug",
    "exc_invalid_op",
    "asm_exc_",
    "mutex_lock",
    "__mutex_lock",
    "down",
    "__down",
    "rt_spin_lock",
    "kmem_cache_alloc",
    "__kmalloc",
    "kmalloc",
    "kzalloc",
    "slab_pre_alloc_hook",
    "might_alloc",
];

/// Frames a blocked task sits in whatever it waits for.
const WAIT_FRAMES: &[&str] = &[
    "context_switch",
    "__schedule",
    "schedule",
    "preempt_schedule",
    "io_schedule",
    "__mutex_lock",
    "mutex_lock",
    "__down",
    "down",
    "rwsem_",
    "__rwsem",
    "rt_mutex",
    "__rt_mutex",
    "wait_for_completion",
    "__wait_for_common",
    "wait_for_common",
    "do_wait_for_common",
    "dma_fence_wait",
    "dma_fence_default_wait",
    "__dma_fence_wait",
];

/// Frames of the allocator itself, above the caller that leaked.
const ALLOCATOR_FRAMES: &[&str] = &[
    "kmemleak",
    "slab_",
    "__slab",
    "kmem_cache",
    "__kmem_cache",
    "kmalloc",
    "__kmalloc",
    "__do_kmalloc",
    "kzalloc",
    "kcalloc",
    "krealloc",
    "kmemdup",
    "kvmalloc",
    "__kvmalloc",
    "kvzalloc",
    "vmalloc",
    "__vmalloc",
    "alloc_pages",
    "__alloc_pages",
];

/// The first frame of the first call trace that is not in `skip` (by
/// prefix). Unreliable frames (`? f+0x…`) are ignored.
fn guilty_frame(after: &[&str], skip: &[&str]) -> Option<String> {
    let start = after.iter().position(|l| {
        let l = l.trim().trim_start_matches("kmemleak: ").trim();
        l.starts_with("Call Trace:") || l.starts_with("Call trace:") || l.starts_with("backtrace")
    })?;
    after[start + 1..]
        .iter()
        .map(|l| l.trim().trim_start_matches("kmemleak: ").trim())
        .take_while(|l| !l.starts_with("RIP: 0033") && !l.starts_with("</TASK>"))
        .filter(|l| !l.starts_with('?') && !l.starts_with('<'))
        .filter_map(frame_name)
        .find(|name| !skip.iter().any(|s| name.starts_with(s)))
        .map(|name| normalize(&name))
}

/// The function of a stack frame line, in any of the forms the kernel and
/// the decoding scripts print: `f+0x1a/0x30 [mod]`, `[<ffffffff8123>] f+0x1a/0x30`,
/// `f include/linux/x.h:12 [inline]`, `f (lib/x.c:12)`, `f from g+0x…` (arm).
fn frame_name(line: &str) -> Option<String> {
    let mut line = line.trim();
    while let Some(rest) = line.strip_prefix("[<") {
        line = rest.split_once(">]").map_or("", |(_, r)| r).trim_start();
    }
    let name: String = line
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.'))
        .collect();
    let looks_like_symbol = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    looks_like_symbol.then(|| symbol(&name))
}

/// `f+0x2c/0x300 [module]` → `f`; compiler suffixes (`.cold`, `.isra.0`,
/// `.constprop.0`) are dropped too. Rust symbols (the kernel prints them
/// mangled) are demangled without their crate hashes:
/// `_RNvMs1_NtCs7kwb3qSsk5u_12fencelab_drm3gpuNtB5_8Timeline6submit` →
/// `<fencelab_drm::gpu::Timeline>::submit`.
fn symbol(place: &str) -> String {
    let place = place.trim();
    let end = place
        .find(|c: char| c == '+' || c.is_whitespace() || c == '(' || c == ',')
        .unwrap_or(place.len());
    let name = &place[..end];
    if let Ok(rust) = rustc_demangle::try_demangle(name) {
        return format!("{rust:#}");
    }
    name.split('.').next().unwrap_or(name).to_owned()
}

/// Takes out what varies between two hits of one bug: function offsets
/// (`+0x2c/0x300`), `[<addresses>]`, hexadecimal and decimal numbers that
/// stand alone (addresses, pids, CPU numbers, line numbers, sizes, times),
/// and runs of blanks. Digits inside identifiers (`ip6_send_skb`) stay.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text.trim();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("[<") {
            rest = after.split_once(">]").map_or("", |(_, r)| r);
            continue;
        }
        let c = rest.chars().next().unwrap_or(' ');
        if c == '+' && is_offset(&rest[1..]) {
            rest = skip_offset(&rest[1..]);
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.push_str(number_word(&rest[..end]));
            rest = &rest[end..];
            continue;
        }
        if c.is_whitespace() {
            if !out.ends_with(' ') {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    out.trim().trim_end_matches([' ', ':', '.', '!']).to_owned()
}

/// A word that is a number becomes `N` (decimal) or `X` (hexadecimal);
/// any other word is kept.
fn number_word(word: &str) -> &str {
    let hex_digits = word.strip_prefix("0x").or_else(|| word.strip_prefix("0X"));
    if let Some(digits) = hex_digits
        && !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_hexdigit())
    {
        return "X";
    }
    if word.chars().all(|c| c.is_ascii_digit()) {
        return "N";
    }
    if word.chars().all(|c| c.is_ascii_hexdigit()) && word.chars().any(|c| c.is_ascii_digit()) {
        return "X";
    }
    word
}

/// `0x2c/0x300` (what follows a `+` in a stack frame).
fn is_offset(s: &str) -> bool {
    s.starts_with("0x")
}

fn skip_offset(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_hexdigit() || c == 'x' || c == '/'))
        .unwrap_or(s.len());
    &s[end..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_takes_out_what_varies_and_keeps_names() {
        assert_eq!(
            normalize("BUG: KASAN: slab-use-after-free in dma_fence_signal+0x2c/0x300"),
            "BUG: KASAN: slab-use-after-free in dma_fence_signal"
        );
        assert_eq!(
            normalize("INFO: task kworker/0:1:23 blocked for more than 122 seconds."),
            "INFO: task kworker/N:N:N blocked for more than N seconds"
        );
        assert_eq!(
            normalize("BUG: Bad page state in process swapper/34  pfn:97fcd0"),
            "BUG: Bad page state in process swapper/N pfn:X"
        );
        assert_eq!(
            normalize("unable to handle page fault for address: ffff888003a1c2d8"),
            "unable to handle page fault for address: X"
        );
        assert_eq!(normalize("ip6_send_skb [ipv6]"), "ip6_send_skb [ipv6]");
        assert_eq!(normalize("[<ffffffff81b16052>] f+0x22/0x1c0"), "f");
        assert_eq!(normalize("addr 0xdead beef"), "addr X beef");
    }

    #[test]
    fn frame_names_in_every_trace_format() {
        for (line, name) in [
            (
                " dma_fence_signal+0x2c/0x300 [fencelab_drm]",
                "dma_fence_signal",
            ),
            (
                "[<ffffffff81b16052>] ntfs_init_fs_context+0x22/0x1c0",
                "ntfs_init_fs_context",
            ),
            (" __dump_stack lib/dump_stack.c:77 [inline]", "__dump_stack"),
            ("dump_stack_lvl (lib/dump_stack.c:107)", "dump_stack_lvl"),
            (" nmi_cpu_backtrace.cold+0x14/0x53", "nmi_cpu_backtrace"),
            (
                "unwind_backtrace from show_stack+0x10/0x14",
                "unwind_backtrace",
            ),
        ] {
            assert_eq!(frame_name(line).as_deref(), Some(name), "{line}");
        }
        assert_eq!(
            frame_name(
                " _RINvNtNtCs1EKtwoKEMO2_6kernel7dma_buf9dma_fence19callback_trampolineNtNtNtCs7kwb3qSsk5u_12fencelab_drm6inject20sleep_in_signal_path9SignalLogEB1a_+0x43/0xb0 [fencelab_drm]"
            )
            .as_deref(),
            Some("kernel::dma_buf::dma_fence::callback_trampoline::<fencelab_drm::inject::sleep_in_signal_path::SignalLog>")
        );
        assert_eq!(
            symbol("_RNvMs1_NtCs7kwb3qSsk5u_12fencelab_drm3gpuNtB5_8Timeline6submit+0x160/0x11a0"),
            "<fencelab_drm::gpu::Timeline>::submit"
        );
        assert_eq!(frame_name("</TASK>"), None);
        assert_eq!(frame_name("0xffffffffc14dd888"), None);
    }

    #[test]
    fn warning_formats_agree() {
        let old = warning(
            "WARNING: CPU: 1 PID: 1 at drivers/dma-buf/dma-fence.c:1042 dma_fence_set_deadline+0x5a/0x80",
        );
        let new = warning(
            "WARNING: drivers/dma-buf/dma-fence.c:1050 at dma_fence_set_deadline+0x5a/0x80, CPU#0: fence-hammer/80",
        );
        assert_eq!(
            old,
            "WARNING in dma_fence_set_deadline (drivers/dma-buf/dma-fence.c)"
        );
        assert_eq!(old, new);
        assert_eq!(
            warning("WARNING: at dma_fence_set_deadline+0x5a/0x80, CPU#3: kworker/3:1/45"),
            "WARNING in dma_fence_set_deadline"
        );
    }

    #[test]
    fn lock_names_nest() {
        assert_eq!(
            lock_name("ffff8880 (&q->q_usage_counter(io)#24){++++}-{0:0}, at: f+0x1/0x2")
                .as_deref(),
            Some("&q->q_usage_counter(io)#N")
        );
        assert_eq!(lock_name("no lock here"), None);
    }
}
