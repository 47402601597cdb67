//! Scenario files: `scenarios/<name>.toml`, one per scenario of DESIGN.md §4.
//!
//! A scenario says, in one place, what it hammers (the fence-hammer workload
//! and its arguments), the device plan it loads, and what must hold for each
//! driver — or why a driver cannot run it. The runner ([`super`]) turns it
//! into a `cargo xtask boot` and judges the result ([`super::judge`]).

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::boot::Driver;
use crate::paths;

/// The folder of scenario files, relative to the workspace root.
pub const SCENARIO_DIR: &str = "scenarios";

/// A scenario as written in its file (unknown keys are refused).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Filled in from the file name, never written in the file.
    #[serde(skip)]
    pub name: String,
    /// One line: what the scenario hammers.
    pub hammers: String,
    /// One line: what must hold.
    pub must_hold: String,
    pub workload: WorkloadSpec,
    /// The device's fault plan; no plan means every fence completes at once.
    #[serde(default)]
    pub plan: Option<PathBuf>,
    /// Keyed by driver (`virtio_gpu`, `fencelab`); a driver not listed
    /// cannot run the scenario.
    pub drivers: BTreeMap<String, DriverSpec>,
}

/// What fence-hammer runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// fence-hammer's `--workload`.
    pub name: String,
    pub fences: u32,
    /// Extra fence-hammer arguments, e.g. `--threads=4`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Give up on the guest after this long [default: boot's].
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// One driver's part of a scenario.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DriverSpec {
    /// `Some(reason)`: the driver cannot run this scenario, and why.
    #[serde(default)]
    pub unsupported: Option<String>,
    /// Extra fence-hammer arguments for this driver only.
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub expect: Expect,
}

/// What must hold beyond the boot's own verdict (no splat, counts that add
/// up, device and guest agreeing). Field paths name keys of the guest's
/// result line (`array_order.violations`) or the device's accounting
/// (`deadline_boosts`).
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Fence errors with these errno names are the scenario working, not a
    /// failure (a hung fence ends `ETIMEDOUT`, an unbound one `ENODEV`).
    #[serde(default)]
    pub errors_allowed: Vec<String>,
    /// Result-line fields that must be at least this.
    #[serde(default)]
    pub guest_min: BTreeMap<String, u64>,
    /// Result-line fields that must be at most this.
    #[serde(default)]
    pub guest_max: BTreeMap<String, u64>,
    /// Device accounting fields that must be at least this.
    #[serde(default)]
    pub device_min: BTreeMap<String, u64>,
    /// Finding kinds about the driver that this scenario is expected to
    /// show (reported, labelled as driver findings; they do not fail it).
    /// Any other finding fails the scenario.
    #[serde(default)]
    pub findings: Vec<String>,
}

impl Scenario {
    /// The spec for `driver`, or why the driver cannot run this scenario.
    pub fn for_driver(&self, driver: Driver) -> Result<&DriverSpec, String> {
        match self.drivers.get(driver_key(driver)) {
            None => Err(format!("the scenario lists no {} part", driver_key(driver))),
            Some(DriverSpec {
                unsupported: Some(reason),
                ..
            }) => Err(reason.clone()),
            Some(spec) => Ok(spec),
        }
    }

    /// The plan's path, resolved against the workspace root.
    pub fn plan_path(&self) -> Option<PathBuf> {
        self.plan.as_ref().map(|p| paths::workspace_root().join(p))
    }
}

/// The key of `driver` in a scenario's `[drivers]` table.
pub fn driver_key(driver: Driver) -> &'static str {
    match driver {
        Driver::VirtioGpu => "virtio_gpu",
        Driver::Fencelab => "fencelab",
    }
}

const DRIVER_KEYS: &[&str] = &["virtio_gpu", "fencelab"];

/// Reads and checks one scenario file; errors name the file.
pub fn load(path: &Path) -> Result<Scenario> {
    let text =
        fs::read_to_string(path).with_context(|| format!("reading scenario {}", path.display()))?;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{}: not a scenario file name", path.display()))?;
    parse(name, &text).with_context(|| format!("scenario {}", path.display()))
}

/// Parses and checks a scenario named `name`.
pub fn parse(name: &str, text: &str) -> Result<Scenario> {
    let mut scenario: Scenario = toml::from_str(text)?;
    scenario.name = name.to_owned();
    validate(&scenario)?;
    Ok(scenario)
}

fn validate(s: &Scenario) -> Result<()> {
    if s.drivers.is_empty() {
        bail!(
            "[drivers] lists no driver (known: {})",
            DRIVER_KEYS.join(", ")
        );
    }
    for (key, spec) in &s.drivers {
        if !DRIVER_KEYS.contains(&key.as_str()) {
            bail!(
                "[drivers.{key}]: unknown driver (known: {})",
                DRIVER_KEYS.join(", ")
            );
        }
        if spec.unsupported.as_deref().is_some_and(str::is_empty) {
            bail!("[drivers.{key}]: unsupported needs a reason");
        }
        if spec.unsupported.is_some() && (spec.expect != Expect::default() || !spec.args.is_empty())
        {
            bail!("[drivers.{key}]: an unsupported driver has no args or expectations");
        }
        for errno in &spec.expect.errors_allowed {
            if !(errno.len() > 1
                && errno.starts_with('E')
                && errno
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()))
            {
                bail!(
                    "[drivers.{key}.expect] errors_allowed: {errno:?} is not an errno name like \"ETIMEDOUT\""
                );
            }
        }
    }
    if s.workload.fences == 0 {
        bail!("workload.fences must be at least 1");
    }
    if let Some(plan) = s.plan_path() {
        if !plan.is_file() {
            bail!("plan {}: no such file", plan.display());
        }
        // The device's own parser: a broken plan is refused here, before
        // anything is built or booted.
        fencelab_device::plan::Plan::load(&plan).map_err(|e| anyhow::anyhow!("plan: {e}"))?;
    }
    Ok(())
}

/// Every scenario in `scenarios/`, sorted by name.
pub fn load_all() -> Result<Vec<Scenario>> {
    let dir = paths::workspace_root().join(SCENARIO_DIR);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("listing scenarios in {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("listing scenarios in {}", dir.display()))?;
    files.retain(|p| p.is_file() && p.extension().is_some_and(|e| e == "toml"));
    files.sort();
    files.iter().map(|p| load(p)).collect()
}

/// The scenario called `name`; an unknown name lists the known ones.
pub fn find(name: &str) -> Result<Scenario> {
    let all = load_all()?;
    let known: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    match all.iter().find(|s| s.name == name) {
        Some(s) => Ok(s.clone()),
        None => bail!("unknown scenario {name:?}; known: {}", known.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
hammers = "fences"
must_hold = "they signal"
[workload]
name = "smoke"
fences = 10
[drivers.fencelab]
[drivers.virtio_gpu]
unsupported = "because"
"#;

    #[test]
    fn a_minimal_scenario_parses_and_knows_its_drivers() {
        let s = parse("mini", MINIMAL).unwrap();
        assert_eq!(s.name, "mini");
        assert!(s.for_driver(Driver::Fencelab).is_ok());
        assert_eq!(s.for_driver(Driver::VirtioGpu).unwrap_err(), "because");
    }

    #[test]
    fn mistakes_are_refused_with_what_is_wrong() {
        let cases = [
            (
                MINIMAL.replace("fences = 10", "fences = 10\nfencse = 3"),
                "unknown field `fencse`",
            ),
            (
                MINIMAL.replace("[drivers.virtio_gpu]", "[drivers.nouveau]"),
                "[drivers.nouveau]: unknown driver",
            ),
            (
                MINIMAL.replace("fences = 10", "fences = 0"),
                "workload.fences must be at least 1",
            ),
            (
                MINIMAL.replace("unsupported = \"because\"", "unsupported = \"\""),
                "unsupported needs a reason",
            ),
            (
                MINIMAL.replace(
                    "[drivers.fencelab]",
                    "[drivers.fencelab]\nexpect = { errors_allowed = [\"timeout\"] }",
                ),
                "is not an errno name",
            ),
            (
                format!("plan = \"no/such/plan.toml\"\n{MINIMAL}"),
                "no such file",
            ),
            (
                format!("plan = \"device/plans/broken/unknown-key.toml\"\n{MINIMAL}"),
                "default.lateny: unknown field",
            ),
            (
                MINIMAL.replace(
                    "unsupported = \"because\"",
                    "unsupported = \"x\"\nargs = [\"--a\"]",
                ),
                "an unsupported driver has no args",
            ),
        ];
        for (text, want) in cases {
            let err = format!("{:#}", parse("bad", &text).unwrap_err());
            assert!(err.contains(want), "want {want:?} in {err:?}");
        }
    }

    #[test]
    fn every_scenario_file_loads_and_the_catalogue_is_complete() {
        let all = load_all().unwrap();
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        for wanted in [
            "smoke",
            "signal-storm",
            "ooo-irq",
            "hung-fence",
            "unload-live",
            "deadline-race",
            "callback-vs-release",
            "array-order",
            "reset",
            "backend-crash",
        ] {
            assert!(
                names.contains(&wanted),
                "scenario {wanted} missing: {names:?}"
            );
        }
        assert!(find("no-such").unwrap_err().to_string().contains("known: "));
    }
}
