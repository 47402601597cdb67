//! Kernel splats on the console: which line starts one, which lines belong
//! to it, where it ends.
//!
//! The classes follow the ones syzkaller's `pkg/report/linux.go` and LKFT's
//! log parser recognise. A splat's lines are the lines of its printk caller
//! (`[  T123]`, `[    C1]`) when the kernel prints caller ids, so that two
//! CPUs reporting at once give two clean splats; without caller ids every
//! kernel line counts. A splat ends at the kernel's own terminator
//! (`---[ end trace … ]---`, a KASAN report's closing `=====` line), when the
//! same caller starts another splat, or after [`MAX_SPLAT_LINES`] lines.

use super::prefix::ConsoleLine;
use super::signature;
use serde::Serialize;
use std::collections::HashMap;

/// When, relative to the workload, a splat appeared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Boot,
    Workload,
    Shutdown,
}

/// One kernel splat found on the console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Splat {
    pub class: &'static str,
    pub phase: Phase,
    /// The line that says what happened, without console prefixes.
    pub title: String,
    /// The console line number (1-based) where the splat's block starts:
    /// its `cut here` or `=====` banner when it has one, else its title.
    pub line: usize,
    /// The printk caller id the splat was printed from, when the kernel
    /// prints them.
    pub context: Option<String>,
    /// Up to [`EXCERPT_LINES`] lines of the splat, from its first line on,
    /// without console prefixes.
    pub excerpt: Vec<String>,
    /// Class and normalised title: equal for two hits of one bug, different
    /// for different bugs (see [`signature`]).
    pub signature: String,
}

impl Splat {
    /// One-line description used in the `splats` list of the summary.
    pub fn summary(&self) -> String {
        format!(
            "[{}] {} ({}, console line {})",
            self.class,
            self.title,
            phase_name(self.phase),
            self.line
        )
    }

    /// What findings are deduplicated by: the class and the title with
    /// addresses, pids, numbers and offsets taken out.
    pub fn signature(&self) -> &str {
        &self.signature
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Boot => "before workload",
        Phase::Workload => "during workload",
        Phase::Shutdown => "after workload",
    }
}

pub const EXCERPT_LINES: usize = 40;
/// An unterminated splat (lockdep, RCU stall, hung task) stops here.
const MAX_SPLAT_LINES: usize = 200;
/// Lines after `cut here` within which the line that names the report
/// (`WARNING:`, `kernel BUG at`, `refcount_t:` …) must come.
const CUT_HERE_WINDOW: usize = 3;

/// How a class's first line is recognised (on the message, console
/// prefixes removed and blanks trimmed).
enum Needle {
    Contains(&'static str),
    Prefix(&'static str),
    /// Starts with the first, contains the second.
    PrefixAndContains(&'static str, &'static str),
}

impl Needle {
    fn matches(&self, text: &str) -> bool {
        match self {
            Needle::Contains(n) => text.contains(n),
            Needle::Prefix(p) => text.starts_with(p),
            Needle::PrefixAndContains(p, n) => text.starts_with(p) && text.contains(n),
        }
    }
}

/// A class of kernel splat and a text that introduces it.
struct Class {
    name: &'static str,
    needle: Needle,
    /// A header the next line of the same class replaces as the title
    /// (syzkaller's `BUG: memory leak` before kmemleak's object line).
    provisional: bool,
}

const fn class(name: &'static str, needle: Needle) -> Class {
    Class {
        name,
        needle,
        provisional: false,
    }
}

use Needle::{Contains, Prefix, PrefixAndContains};

/// Ordered so that the more specific class wins (KASAN before generic `BUG:`).
const CLASSES: &[Class] = &[
    class("kasan", Contains("BUG: KASAN:")),
    class("ubsan", Contains("UBSAN:")),
    class(
        "lockdep-circular",
        Contains("possible circular locking dependency detected"),
    ),
    class(
        "lockdep-recursive",
        Contains("possible recursive locking detected"),
    ),
    class("lockdep-inconsistent", Contains("inconsistent lock state")),
    class(
        "lockdep-irq-unsafe",
        Contains("-unsafe lock order detected"),
    ),
    class(
        "lockdep-bad-unlock",
        Contains("bad unlock balance detected"),
    ),
    class(
        "lockdep-held-at-exit",
        Contains("lock held when returning to user space"),
    ),
    class(
        "lockdep-wait-context",
        Contains("BUG: Invalid wait context"),
    ),
    class("suspicious-rcu", Contains("suspicious RCU usage")),
    class(
        "sleep-in-atomic",
        Contains("BUG: sleeping function called from invalid context"),
    ),
    class(
        "scheduling-while-atomic",
        Contains("BUG: scheduling while atomic"),
    ),
    class("soft-lockup", Contains("BUG: soft lockup")),
    class("rcu-stall", Contains("rcu: INFO: rcu_")),
    class("rcu-stall", Contains("self-detected stall on CPU")),
    class("rcu-stall", Contains("detected stalls on CPUs")),
    class(
        "hung-task",
        PrefixAndContains("INFO: task ", " for more than "),
    ),
    Class {
        name: "kmemleak",
        needle: Prefix("BUG: memory leak"),
        provisional: true,
    },
    class("kmemleak", Contains("unreferenced object")),
    class("refcount", Contains("refcount_t: ")),
    class("list-corruption", Contains("list_add corruption")),
    class("list-corruption", Contains("list_del corruption")),
    class("list-corruption", Contains("list_add double add")),
    class("kernel-bug", Contains("kernel BUG at")),
    class("page-fault", Contains("BUG: unable to handle")),
    class(
        "page-fault",
        Contains("BUG: kernel NULL pointer dereference"),
    ),
    class("page-fault", Contains("Unable to handle kernel")),
    class("gpf", Contains("general protection fault")),
    class("rust-panic", Contains("rust_kernel: panicked")),
    class("oops", Contains("Internal error: Oops")),
    class("oops", Prefix("Oops:")),
    class("bug", Prefix("BUG: ")),
    class("warning", Prefix("WARNING: ")),
    class("panic", Prefix("Kernel panic - not syncing")),
];

/// The class names, each once, most specific first.
#[cfg(test)]
pub fn class_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for class in CLASSES {
        if !names.contains(&class.name) {
            names.push(class.name);
        }
    }
    names
}

fn class_named(name: &str) -> &'static Class {
    CLASSES
        .iter()
        .find(|c| c.name == name)
        .expect("a class of that name is in CLASSES")
}

/// Classifies one message (prefixes removed) as the start of a splat.
fn classify(text: &str) -> Option<&'static Class> {
    CLASSES.iter().find(|c| c.needle.matches(text))
}

/// What a line opens.
#[derive(Clone, Copy)]
enum Start {
    /// `------------[ cut here ]------------`: the next few lines say what.
    CutHere,
    Class(&'static Class),
}

fn start_of(text: &str) -> Option<Start> {
    if is_terminator(text) {
        None
    } else if text.contains("[ cut here ]") {
        Some(Start::CutHere)
    } else {
        classify(text).map(Start::Class)
    }
}

fn is_terminator(text: &str) -> bool {
    text.starts_with("---[ end")
}

/// The `=====` lines around KASAN and lockdep reports.
fn is_banner(text: &str) -> bool {
    text.len() >= 10 && text.bytes().all(|b| b == b'=')
}

/// Reports framed by `=====` lines: everything up to the closing one is theirs.
fn is_bracketed(class: &Class) -> bool {
    matches!(class.name, "kasan" | "ubsan")
}

/// What an open splat does with a line that would start another one.
enum Absorb {
    /// It is part of this splat (the `Oops:` after `BUG: unable to handle…`).
    Keep,
    /// It is part of this splat and says better what it is.
    Retitle(&'static Class),
    /// It starts a new splat.
    No,
}

fn absorb(open: &Open, class: &'static Class, new: Start) -> Absorb {
    if open.bracketed {
        return Absorb::Keep;
    }
    let new_name = match new {
        Start::CutHere => "cut-here",
        Start::Class(c) => c.name,
    };
    match (class.name, new_name) {
        ("page-fault" | "gpf" | "kernel-bug", "oops") => Absorb::Keep,
        // CONFIG_BUG_ON_DATA_CORRUPTION: the message, then BUG().
        ("list-corruption" | "rust-panic", "cut-here" | "kernel-bug" | "oops" | "warning") => {
            Absorb::Keep
        }
        ("refcount", "warning") => Absorb::Keep,
        // Older kernels print WARN()'s message after the WARNING line.
        ("warning", "refcount" | "list-corruption") if open.lines_since_title() <= 2 => {
            Absorb::Retitle(match new {
                Start::Class(c) => c,
                Start::CutHere => class,
            })
        }
        (a, b) if a == b && class.provisional && open.lines.len() == 1 => match new {
            Start::Class(c) => Absorb::Retitle(c),
            Start::CutHere => Absorb::No,
        },
        _ => Absorb::No,
    }
}

/// A splat being read.
struct Open {
    /// `None`: a `cut here` block whose title has not come yet.
    class: Option<&'static Class>,
    phase: Phase,
    caller: Option<String>,
    /// Console index (0-based) of the first line.
    first_line: usize,
    /// Index in `lines` of the title.
    title: usize,
    lines: Vec<String>,
    /// Waiting for its closing `=====` line.
    bracketed: bool,
    /// Its lines carry printk timestamps: untimestamped lines printed
    /// meanwhile are user space's, not the splat's.
    timestamped: bool,
}

impl Open {
    fn new(
        start: Start,
        phase: Phase,
        index: usize,
        banner: Option<String>,
        line: ConsoleLine<'_>,
    ) -> Self {
        let mut open = Open {
            class: None,
            phase,
            caller: line.caller.map(str::to_owned),
            first_line: index - usize::from(banner.is_some()),
            title: 0,
            lines: banner.into_iter().collect(),
            bracketed: false,
            timestamped: line.timestamped,
        };
        match start {
            Start::CutHere => open.lines.push(line.body.to_owned()),
            Start::Class(class) => open.retitle(class, line.body),
        }
        open
    }

    /// Makes `body` (appended) the title and `class` the class.
    fn retitle(&mut self, class: &'static Class, body: &str) {
        self.class = Some(class);
        self.title = self.lines.len();
        self.bracketed = is_bracketed(class);
        self.lines.push(body.to_owned());
    }

    fn lines_since_title(&self) -> usize {
        self.lines.len() - 1 - self.title
    }

    fn into_splat(self) -> Splat {
        let (class, title) = match self.class {
            Some(class) => (class.name, self.title),
            // The log ended right after a `cut here`.
            None => ("warning", usize::from(self.lines.len() > 1)),
        };
        let title_text = self.lines[title].trim().to_owned();
        let following: Vec<&str> = self.lines[title + 1..].iter().map(String::as_str).collect();
        let signature = signature::signature(class, &title_text, &following);
        Splat {
            class,
            phase: self.phase,
            title: title_text,
            line: self.first_line + 1,
            context: self.caller,
            excerpt: self.lines.into_iter().take(EXCERPT_LINES).collect(),
            signature,
        }
    }
}

/// Reads console lines one at a time and collects the splats.
#[derive(Default)]
pub struct Scanner {
    open: Vec<Open>,
    done: Vec<Splat>,
    /// Per caller: a `=====` line just printed outside any splat, which the
    /// splat that follows (KASAN, lockdep) starts with.
    /// Whether the banner had a timestamp: user-space lines (none) printed
    /// after a timestamped banner do not separate it from its splat.
    banner: HashMap<Option<String>, (String, bool)>,
}

impl Scanner {
    /// Feeds the console line at `index` (0-based), printed during `phase`.
    pub fn feed(&mut self, index: usize, line: ConsoleLine<'_>, phase: Phase) {
        let text = line.body.trim();
        let start = start_of(text);
        let mut carried_banner = None;
        if let Some(at) = self
            .open
            .iter()
            .position(|o| o.caller.as_deref() == line.caller)
        {
            if self.open[at].timestamped && !line.timestamped {
                return; // user space on the console, amid the kernel's report
            }
            if self.continue_open(at, line.body, text, start) {
                return;
            }
            // A new splat starts: the open one ends, and a `=====` it just
            // printed belongs to the new one.
            let mut closed = self.open.swap_remove(at);
            if closed.lines.last().is_some_and(|l| is_banner(l.trim())) && closed.lines.len() > 1 {
                carried_banner = closed.lines.pop();
            }
            self.done.push(closed.into_splat());
        }
        let key = line.caller.map(str::to_owned);
        match start {
            Some(start) => {
                let banner =
                    carried_banner.or_else(|| self.banner.remove(&key).map(|(text, _)| text));
                self.open.push(Open::new(start, phase, index, banner, line));
            }
            None if is_banner(text) => {
                self.banner
                    .insert(key, (line.body.to_owned(), line.timestamped));
            }
            None => {
                if self
                    .banner
                    .get(&key)
                    .is_some_and(|&(_, stamped)| stamped == line.timestamped)
                {
                    self.banner.remove(&key);
                }
            }
        }
    }

    /// Gives the line to the open splat at `at`. `false`: the line starts a
    /// new splat, which the caller opens after closing this one.
    fn continue_open(&mut self, at: usize, body: &str, text: &str, start: Option<Start>) -> bool {
        let open = &mut self.open[at];
        if is_terminator(text) || (open.bracketed && is_banner(text) && open.lines.len() > 1) {
            open.lines.push(body.to_owned());
            let closed = self.open.swap_remove(at);
            self.done.push(closed.into_splat());
            return true;
        }
        match (open.class, start) {
            (None, Some(Start::Class(class))) => open.retitle(class, body),
            (Some(class), Some(new)) => match absorb(open, class, new) {
                Absorb::Keep => open.lines.push(body.to_owned()),
                Absorb::Retitle(class) => open.retitle(class, body),
                Absorb::No => return false,
            },
            (None, Some(Start::CutHere)) => return false,
            (_, None) => open.lines.push(body.to_owned()),
        }
        if open.class.is_none() && open.lines.len() > CUT_HERE_WINDOW + 1 {
            // Nothing named it: a WARN() whose message is its first line.
            open.class = Some(class_named("warning"));
            open.title = 1;
        }
        if open.lines.len() >= MAX_SPLAT_LINES {
            let closed = self.open.swap_remove(at);
            self.done.push(closed.into_splat());
        }
        true
    }

    /// Ends the splats still open and returns all of them in console order.
    pub fn finish(mut self) -> Vec<Splat> {
        self.done.extend(self.open.drain(..).map(Open::into_splat));
        self.done.sort_by_key(|s| s.line);
        self.done
    }
}
