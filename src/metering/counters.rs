//! Cumulative energy counters: one per way of knowing how many joules this machine used.
//!
//! Every counter returns a monotonic total in joules since it was opened, already corrected for
//! hardware wrap-around, so the attribution above it only ever subtracts two readings. Which
//! counter produced a figure travels with the figure ([`EnergySource`]): a measurement and an
//! estimate are never added together silently.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{EnergyMeterKind, MeteringConfig};

/// Where an energy figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnergySource {
    /// NVIDIA GPUs' own counters (measured).
    Nvml,
    /// CPU package counters from Linux powercap (measured).
    Rapl,
    /// CPU time x configured watts (a model, not a measurement).
    Estimate,
    /// Cloud energy: tokens x configured J/token x PUE (always a model).
    CloudEstimate,
}

impl EnergySource {
    /// The label used in metrics, the ledger and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            EnergySource::Nvml => "nvml",
            EnergySource::Rapl => "rapl",
            EnergySource::Estimate => "estimate",
            EnergySource::CloudEstimate => "cloud_estimate",
        }
    }

    /// Whether figures from this source were measured by hardware.
    pub fn is_measured(self) -> bool {
        matches!(self, EnergySource::Nvml | EnergySource::Rapl)
    }

    /// `measured` or `estimated`, as reports print it.
    pub fn kind(self) -> &'static str {
        if self.is_measured() {
            "measured"
        } else {
            "estimated"
        }
    }

    /// The source a label (as stored in the ledger) names.
    pub fn from_label(label: &str) -> Option<Self> {
        [Self::Nvml, Self::Rapl, Self::Estimate, Self::CloudEstimate]
            .into_iter()
            .find(|s| s.as_str() == label)
    }
}

/// A cumulative energy counter.
pub trait EnergyCounter: Send + Sync {
    /// Which kind of figure this counter produces.
    fn source(&self) -> EnergySource;
    /// Joules since the counter was opened; never decreases.
    fn read_joules(&self) -> Result<f64, String>;
}

/// Opens the counter the config asks for. `auto` tries NVML, then RAPL, then the estimate, and
/// logs which one it got; an explicit choice that is unavailable is an error, not a fallback.
pub fn open(config: &MeteringConfig) -> Result<Box<dyn EnergyCounter>, String> {
    let estimate = || -> Box<dyn EnergyCounter> {
        Box::new(CpuTimeEstimate::new(
            config.cpu_watts_per_core,
            config.idle_watts,
        ))
    };
    match config.energy_meter {
        EnergyMeterKind::Estimate => Ok(estimate()),
        EnergyMeterKind::Rapl => Rapl::open(Path::new(POWERCAP)).map(|c| Box::new(c) as _),
        EnergyMeterKind::Nvml => Nvml::open().map(|c| Box::new(c) as _),
        EnergyMeterKind::Auto => {
            let nvml = Nvml::open();
            if let Ok(c) = nvml {
                return Ok(Box::new(c));
            }
            let rapl = Rapl::open(Path::new(POWERCAP));
            if let Ok(c) = rapl {
                return Ok(Box::new(c));
            }
            tracing::info!(
                nvml = %nvml.err().unwrap_or_default(),
                rapl = %rapl.err().unwrap_or_default(),
                "no energy counter readable; local energy is estimated from CPU time \
                 (metering.cpu_watts_per_core) and labeled `estimate`"
            );
            Ok(estimate())
        }
    }
}

/// Where Linux exposes RAPL.
const POWERCAP: &str = "/sys/class/powercap";

/// The difference between two readings of a counter that wraps to zero after `range`.
pub fn wrapping_delta(previous: u64, current: u64, range: u64) -> u64 {
    if current >= previous {
        current - previous
    } else if range > previous {
        // Wrapped once: up to the top, then from zero.
        (range - previous) + current
    } else {
        // A range smaller than a reading: the counter was reset, not wrapped; count from zero.
        current
    }
}

/// An accumulator over raw wrapping counters: keeps the last raw value of each and the total.
struct Unwrapped {
    last: Vec<u64>,
    total: u64,
}

impl Unwrapped {
    fn update(&mut self, raw: &[u64], ranges: &[u64]) -> u64 {
        for ((last, &now), &range) in self.last.iter_mut().zip(raw).zip(ranges) {
            self.total = self.total.saturating_add(wrapping_delta(*last, now, range));
            *last = now;
        }
        self.total
    }
}

/// RAPL package domains (`intel-rapl:N`, or `amd-rapl` on newer kernels) under powercap.
pub struct Rapl {
    files: Vec<PathBuf>,
    ranges: Vec<u64>,
    state: Mutex<Unwrapped>,
}

impl Rapl {
    /// Opens every readable package domain under `root` (sub-zones such as `intel-rapl:0:0`
    /// are parts of a package and would be counted twice).
    pub fn open(root: &Path) -> Result<Self, String> {
        let entries = std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let mut zones: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(is_package_zone)
            })
            .collect();
        zones.sort();
        zones.dedup();
        if zones.is_empty() {
            return Err(format!("no RAPL package zones under {}", root.display()));
        }
        let mut files = Vec::new();
        let mut ranges = Vec::new();
        let mut raw = Vec::new();
        for zone in zones {
            let file = zone.join("energy_uj");
            let value = read_u64(&file)?;
            let range = read_u64(&zone.join("max_energy_range_uj"))?;
            files.push(file);
            ranges.push(range);
            raw.push(value);
        }
        Ok(Self {
            files,
            ranges,
            state: Mutex::new(Unwrapped {
                last: raw,
                total: 0,
            }),
        })
    }
}

/// `intel-rapl:N` / `amd-rapl:N` with exactly one colon: a package, not a sub-zone.
fn is_package_zone(name: &str) -> bool {
    let Some((prefix, index)) = name.split_once(':') else {
        return false;
    };
    prefix.ends_with("-rapl") && !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit())
}

fn read_u64(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|e| format!("{}: not a number ({e})", path.display()))
}

impl EnergyCounter for Rapl {
    fn source(&self) -> EnergySource {
        EnergySource::Rapl
    }

    fn read_joules(&self) -> Result<f64, String> {
        let raw = self
            .files
            .iter()
            .map(|f| read_u64(f))
            .collect::<Result<Vec<_>, _>>()?;
        let mut state = self.state.lock().map_err(|_| "RAPL state poisoned")?;
        let micro = state.update(&raw, &self.ranges);
        Ok(micro as f64 / 1e6)
    }
}

/// NVIDIA GPUs through NVML: the total-energy counter (mJ) where the GPU has one (Volta and
/// later), power x time otherwise.
pub struct Nvml {
    nvml: nvml_wrapper::Nvml,
    devices: u32,
    state: Mutex<NvmlState>,
}

struct NvmlState {
    counters: Unwrapped,
    /// Per GPU: integrated millijoules and the last power sample, for GPUs without a counter.
    integrated: Vec<(f64, Option<(Instant, f64)>)>,
}

impl Nvml {
    /// Loads the NVML library and counts the GPUs; fails where there is no NVIDIA driver.
    pub fn open() -> Result<Self, String> {
        let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML: {e}"))?;
        let devices = nvml
            .device_count()
            .map_err(|e| format!("NVML device count: {e}"))?;
        if devices == 0 {
            return Err("NVML: no GPUs".to_owned());
        }
        let counter = Self {
            nvml,
            devices,
            state: Mutex::new(NvmlState {
                counters: Unwrapped {
                    last: Vec::new(),
                    total: 0,
                },
                integrated: vec![(0.0, None); devices as usize],
            }),
        };
        // Establish the starting raw values.
        let raw = counter.raw()?;
        if let Ok(mut s) = counter.state.lock() {
            s.counters.last = raw.iter().map(|r| r.unwrap_or(0)).collect();
        }
        Ok(counter)
    }

    /// Per GPU, the total-energy counter in mJ, or None when the GPU has none.
    fn raw(&self) -> Result<Vec<Option<u64>>, String> {
        (0..self.devices)
            .map(|i| {
                let device = self
                    .nvml
                    .device_by_index(i)
                    .map_err(|e| format!("NVML GPU {i}: {e}"))?;
                Ok(device.total_energy_consumption().ok())
            })
            .collect()
    }
}

impl EnergyCounter for Nvml {
    fn source(&self) -> EnergySource {
        EnergySource::Nvml
    }

    fn read_joules(&self) -> Result<f64, String> {
        let raw = self.raw()?;
        let mut state = self.state.lock().map_err(|_| "NVML state poisoned")?;
        let counted: Vec<u64> = raw.iter().map(|r| r.unwrap_or(0)).collect();
        // The counter is a u64 of millijoules: it does not wrap in practice; a driver reload
        // resets it, which wrapping_delta treats as counting from zero.
        let ranges = vec![u64::MAX; counted.len()];
        let mut millijoules = state.counters.update(&counted, &ranges) as f64;
        let now = Instant::now();
        for (i, r) in raw.iter().enumerate() {
            if r.is_some() {
                continue;
            }
            let watts = self
                .nvml
                .device_by_index(i as u32)
                .and_then(|d| d.power_usage())
                .map_err(|e| format!("NVML GPU {i} power: {e}"))? as f64
                / 1000.0;
            let (total, last) = &mut state.integrated[i];
            if let Some((t, w)) = *last {
                // Trapezoid between two power samples.
                *total += (w + watts) / 2.0 * now.duration_since(t).as_secs_f64() * 1000.0;
            }
            *last = Some((now, watts));
            millijoules += *total;
        }
        Ok(millijoules / 1000.0)
    }
}

/// The estimate: this process's CPU time (user + system, from the OS) x watts per busy core,
/// plus idle watts x wall time. Labeled [`EnergySource::Estimate`] wherever it appears.
pub struct CpuTimeEstimate {
    watts_per_core: f64,
    idle_watts: f64,
    opened: Instant,
    cpu_at_open: f64,
}

impl CpuTimeEstimate {
    /// An estimate with these constants (from `[metering]`).
    pub fn new(watts_per_core: f64, idle_watts: f64) -> Self {
        Self {
            watts_per_core,
            idle_watts,
            opened: Instant::now(),
            cpu_at_open: process_cpu_seconds().unwrap_or(0.0),
        }
    }
}

impl EnergyCounter for CpuTimeEstimate {
    fn source(&self) -> EnergySource {
        EnergySource::Estimate
    }

    fn read_joules(&self) -> Result<f64, String> {
        let cpu = (process_cpu_seconds()? - self.cpu_at_open).max(0.0);
        let wall = self.opened.elapsed().as_secs_f64();
        Ok(cpu * self.watts_per_core + wall * self.idle_watts)
    }
}

/// User + system CPU seconds of this process, all threads (getrusage).
pub fn process_cpu_seconds() -> Result<f64, String> {
    // SAFETY: getrusage writes a plain C struct that we own; zeroed is a valid initial value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to our struct.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Err(format!(
            "getrusage failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    Ok(t(usage.ru_utime) + t(usage.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_is_counted_once() {
        assert_eq!(wrapping_delta(10, 25, 100), 15);
        // 90 -> wrap at 100 -> 5: 10 + 5.
        assert_eq!(wrapping_delta(90, 5, 100), 15);
        // A reset (range smaller than the previous reading) counts from zero.
        assert_eq!(wrapping_delta(500, 7, 100), 7);
    }

    #[test]
    fn rapl_reads_packages_not_subzones_and_survives_a_wrap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let zone = |name: &str, energy: u64| {
            let p = dir.path().join(name);
            std::fs::create_dir_all(&p).expect("mkdir");
            std::fs::write(p.join("energy_uj"), format!("{energy}\n")).expect("write");
            std::fs::write(p.join("max_energy_range_uj"), "1000000\n").expect("write");
        };
        zone("intel-rapl:0", 900_000);
        zone("intel-rapl:1", 100_000);
        zone("intel-rapl:0:0", 50_000);
        let rapl = Rapl::open(dir.path()).expect("opens");
        assert_eq!(rapl.read_joules().expect("read"), 0.0);
        // Package 0 wraps: 900,000 -> 1,000,000 -> 200,000 = 300,000 uJ; package 1 +50,000.
        zone("intel-rapl:0", 200_000);
        zone("intel-rapl:1", 150_000);
        zone("intel-rapl:0:0", 990_000);
        let j = rapl.read_joules().expect("read");
        assert!((j - 0.35).abs() < 1e-12, "{j}");
    }

    #[test]
    fn rapl_without_zones_is_an_error_naming_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = Rapl::open(dir.path()).err().unwrap_or_default();
        assert!(e.contains("no RAPL package zones"), "{e}");
    }

    #[test]
    fn estimate_grows_with_cpu_work() {
        let meter = CpuTimeEstimate::new(10.0, 0.0);
        let before = meter.read_joules().expect("read");
        let mut x = 0u64;
        let start = Instant::now();
        while start.elapsed().as_millis() < 50 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = meter.read_joules().expect("read");
        assert!(after > before, "{before} -> {after}");
    }
}
