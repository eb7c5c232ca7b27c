//! What the CPU kernels choose by the processor they run on, not only by its instruction set:
//! from how many tiles each Winograd variant is the fastest way to run a 3x3 convolution
//! (see [`super::conv`]). The cut-offs depend on how fast a core multiplies next to how
//! fast it moves the transforms' data, which differs between processors with the same
//! instructions: F(4x4) paid from 1024 tiles on a Zen 5 with AVX-512 (on a Xeon, starting
//! from 32 made the UNet's convolutions 25% slower), from 32 on AVX2-only EPYC cores of
//! family 25 (over im2col; on the Zen 3 of 2026-12-08 F(2x2) was about as fast there), and
//! a Zen 4 runs AVX-512 on 256-bit units.
//!
//! The built-in table ([`WinogradCutoffs::table`]) holds what was measured per vector
//! level. `--cpu-tuning auto` (the binary's and the bench's default) instead times the three
//! algorithms at Stable Diffusion's own layer shapes on this processor when a model with
//! such layers loads on the CPU (7.6-9.7 s on 2 Zen 3 cores), moves a cut-off from the
//! table only where the times clearly say so, and remembers the result in
//! `$XDG_CACHE_HOME/sd-wgpu/cpu-tuning.json` (else `~/.cache/sd-wgpu/`), keyed by the
//! processor's name, the vector level, the products' precision and this measurement's
//! version. The measured cut-offs apply to layers of at least [`MEASURED_MIN_CHANNELS`]
//! channels each way, the sizes they were measured at; smaller layers (the tests' tiny
//! models) keep the table, so they run the same everywhere.
//!
//! The algorithms round differently (all within what the images' tests allow). Once the
//! cut-offs are remembered, a request gives the same image on any number of cores and
//! across restarts; where they cannot be remembered (no home folder, a read-only one) each
//! start measures again, and a close call may then go the other way; two processors may
//! differ by a level here and there. `--cpu-tuning table` is the choice where images must
//! be the same on every machine with the same instructions.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::conv::Algorithm;
use super::simd;
use crate::error::{Error, Result};
use crate::tensor::params::Conv2dParams;

/// The fewest tiles (over the whole batch) from which each Winograd variant is the fastest;
/// `usize::MAX` for never (`null` in JSON, "never" in logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinogradCutoffs {
    /// 4x4 output tiles for F(4x4) (over F(2x2) and im2col).
    #[serde(with = "never_as_null")]
    pub f4_tiles: usize,
    /// 2x2 output tiles for F(2x2) (over im2col).
    #[serde(with = "never_as_null")]
    pub f2_tiles: usize,
}

impl std::fmt::Display for WinogradCutoffs {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let from = |tiles: usize| match tiles {
            usize::MAX => "never".to_string(),
            n => format!("from {n} tiles"),
        };
        write!(
            f,
            "F(4x4) {}, F(2x2) {}",
            from(self.f4_tiles),
            from(self.f2_tiles)
        )
    }
}

/// A cut-off of `usize::MAX` (never) as JSON `null`: exact for JavaScript clients of
/// /health (numbers past 2^53 are not) and readable by a 32-bit build.
mod never_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(tiles: &usize, s: S) -> Result<S::Ok, S::Error> {
        match *tiles {
            usize::MAX => s.serialize_none(),
            n => s.serialize_some(&n),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        Ok(Option::<usize>::deserialize(d)?.unwrap_or(usize::MAX))
    }
}

impl WinogradCutoffs {
    /// The built-in cut-offs per vector level: the fewer multiplies F(4x4) saves are worth
    /// more where multiplies are slower next to the transforms' memory traffic.
    pub fn table(level: simd::Level) -> Self {
        match level {
            // Measured on 2 Zen 5 cores (c7dce4d): F(2x2) from one 32x32 image's tiles,
            // F(4x4) from 1024 tiles (a 128x128 image: the VAE, not the 512x512 UNet).
            // On a Xeon (Sapphire Rapids) F(4x4) from 32 tiles made the UNet step's 3x3
            // convolutions 25% slower.
            simd::Level::Avx512 => Self {
                f4_tiles: 1024,
                f2_tiles: 256,
            },
            // Measured 2026-12-06 on 2 family-25 EPYC cores with AVX2 only (recorded as Zen
            // 4; probably a Zen 3, see the README), median of 7 calls at
            // SD 1.5's UNet shapes, batch 2: F(4x4) over F(2x2) 30% faster at 64x64 (512
            // tiles; 320 and 640 channels), over im2col 30-40% at 16x16 (32 tiles; 1280 and
            // 2560 channels), no faster at 16 (batch 1) and slower at 8 (8x8): the guided
            // UNet step's 3x3 convolutions 4.9-5.5 s -> 3.7 s. The baseline level (SSE2, four
            // lanes) multiplies slower still, so it takes AVX2's cut-offs (not measured).
            simd::Level::Avx2 | simd::Level::Baseline => Self {
                f4_tiles: 32,
                f2_tiles: 256,
            },
        }
    }
}

/// Layers with at least this many input and output channels use the measured cut-offs:
/// the probes have 256 to 1280, the sizes of every real SD model's UNet and VAE layers but
/// the VAE's outermost (128).
pub const MEASURED_MIN_CHANNELS: usize = 256;

/// Part of the remembered entries' key: raised when the probes, [`MARGIN`], the table or
/// the convolutions' speed change, so that what was measured before is measured again.
const MEASUREMENT_VERSION: u32 = 3;

/// Where the convolution cut-offs come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TuningMode {
    /// The built-in table per vector level: the same choices on every processor with the
    /// same instructions.
    #[default]
    Table,
    /// Measured on this processor, once, and remembered on disk.
    Auto,
    /// Measured again now (overwriting what is remembered).
    Measure,
}

/// Where the cut-offs in use came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The built-in table (`--cpu-tuning table`, or no model with layers of the measured
    /// sizes has loaded).
    Table,
    /// Measured in this process.
    Measured,
    /// Measured before on this processor, read from the cache file.
    Remembered,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Source::Table => "table",
            Source::Measured => "measured",
            Source::Remembered => "remembered",
        })
    }
}

/// The cut-offs layers of the measured sizes use, and where they came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tuned {
    pub mode: TuningMode,
    pub source: Source,
    pub cutoffs: WinogradCutoffs,
    /// The processor, vector level and precision they hold for.
    pub machine: String,
}

static MODE: OnceLock<TuningMode> = OnceLock::new();
static MEASURED: OnceLock<Tuned> = OnceLock::new();

/// Chooses where the cut-offs come from for the whole process, before a model loads (the
/// binary and the bench call it at start; elsewhere, as in the tests, it is the table).
/// Asking again for what is set is fine; asking for another mode once one is set is an
/// error, and the first CPU model's load or a call of [`current`] sets the default.
pub fn set_mode(mode: TuningMode) -> Result<()> {
    let set = *MODE.get_or_init(|| mode);
    if set != mode {
        return Err(Error::InvalidArgument(format!(
            "the CPU tuning is already set to {set:?}"
        )));
    }
    Ok(())
}

fn mode() -> TuningMode {
    *MODE.get_or_init(TuningMode::default)
}

/// The cut-offs for convolution `p`: the measured ones for layers of the measured sizes
/// once [`prepare`] has them, the table's otherwise.
pub(crate) fn winograd_cutoffs(p: &Conv2dParams) -> WinogradCutoffs {
    cutoffs_for(p, MEASURED.get().map(|t| t.cutoffs), simd::level())
}

/// [`winograd_cutoffs`] given what was measured and the vector level.
fn cutoffs_for(
    p: &Conv2dParams,
    measured: Option<WinogradCutoffs>,
    level: simd::Level,
) -> WinogradCutoffs {
    match measured {
        Some(cutoffs) if p.c.min(p.oc) >= MEASURED_MIN_CHANNELS => cutoffs,
        _ => WinogradCutoffs::table(level),
    }
}

/// What the convolutions of layers of the measured sizes use now (for /health and logs).
pub fn current() -> Tuned {
    MEASURED.get().cloned().unwrap_or_else(|| Tuned {
        mode: mode(),
        source: Source::Table,
        cutoffs: WinogradCutoffs::table(simd::level()),
        machine: machine(),
    })
}

/// Called when a model loads on the CPU, with its widest layer's channels: under
/// `auto` or `measure`, and if the model has layers the measurement applies to, reads the
/// cut-offs remembered for this processor or measures them (once per process). Not while
/// `SD_CPU_WINOGRAD` overrides the choice anyway.
pub fn prepare(widest_channels: usize) {
    let mode = mode();
    let overridden = super::conv::winograd_setting().is_some();
    if mode == TuningMode::Table || widest_channels < MEASURED_MIN_CHANNELS || overridden {
        return;
    }
    MEASURED.get_or_init(|| {
        let file = crate::user_dirs::cache_home_from(&crate::user_dirs::env_var)
            .map(|dir| dir.join("sd-wgpu").join("cpu-tuning.json"));
        if file.is_none() {
            tracing::warn!(
                "no home folder (HOME, XDG_CACHE_HOME) to remember the CPU tuning in: it is \
                 measured at every start"
            );
        }
        resolve(mode, &PROBES, file.as_deref(), &machine())
    });
}

/// The cut-offs for `machine` from `file` (unless `mode` is `Measure`), else measured at
/// `probes` and written there. Failing to read or write the file is logged, not fatal.
fn resolve(mode: TuningMode, probes: &[Probe], file: Option<&Path>, machine: &str) -> Tuned {
    let tuned = |source, cutoffs| Tuned {
        mode,
        source,
        cutoffs,
        machine: machine.into(),
    };
    let threads = rayon::current_num_threads();
    let mut remembered = file.map(read_file).unwrap_or_default();
    if mode == TuningMode::Auto {
        if let Some(entry) = remembered.machines.get(machine) {
            tracing::info!(
                "CPU convolutions: {} (measured for this CPU {} days ago with {} threads, \
                 remembered in {}; --cpu-tuning measure measures again)",
                entry.cutoffs,
                since_1970().as_secs().saturating_sub(entry.measured_at) / 86_400,
                entry.threads,
                file.map_or(String::new(), |f| f.display().to_string()),
            );
            if entry.threads != threads {
                tracing::info!(
                    "this process runs {threads} threads; the cut-offs are kept (they hold \
                     for the processor, and the same image on any number of cores needs the \
                     same choice)"
                );
            }
            return tuned(Source::Remembered, entry.cutoffs);
        }
    }
    tracing::info!("measuring the CPU convolutions on this processor (about 10 s, once)");
    let started = Instant::now();
    let times = measure(probes);
    let cutoffs = cutoffs_from(probes, &times, WinogradCutoffs::table(simd::level()));
    tracing::info!(
        "CPU convolutions: {cutoffs} (measured in {:.1} s with {threads} threads; medians of \
         {ROUNDS} rounds in ms, im2col / F(2x2) / F(4x4): {}){}",
        started.elapsed().as_secs_f64(),
        describe_times(probes, &times),
        file.map_or(String::new(), |f| format!(
            "; remembered in {}",
            f.display()
        )),
    );
    let entry = Remembered {
        cutoffs,
        measured_at: since_1970().as_secs(),
        threads,
        milliseconds: times.iter().map(median_ms).collect(),
    };
    remembered.machines.insert(machine.into(), entry);
    if let Some(file) = file {
        if let Err(e) = write_file(file, &remembered) {
            tracing::warn!(
                "could not remember the CPU tuning in {}: {e} (it will be measured again at the next start)",
                file.display()
            );
        }
    }
    tuned(Source::Measured, cutoffs)
}

/// One timed layer: a 3x3 convolution of `channels` to `channels` on `n` images of
/// `side x side`.
#[derive(Clone, Copy, Debug)]
struct Probe {
    n: usize,
    channels: usize,
    side: usize,
}

impl Probe {
    fn params(self) -> Conv2dParams {
        Conv2dParams {
            n: self.n,
            c: self.channels,
            h: self.side,
            w: self.side,
            oc: self.channels,
            kh: 3,
            kw: 3,
            stride: 1,
            pad_top: 1,
            pad_left: 1,
            oh: self.side,
            ow: self.side,
        }
    }

    /// Output tiles of `m x m` over the batch.
    fn tiles(self, m: usize) -> usize {
        self.n * self.side.div_ceil(m).pow(2)
    }
}

/// SD 1.5's UNet levels in a guided step (batch 2), then 1024 tiles at 256 channels (the
/// VAE's layers from 128x128 up have 256 or 512), by growing tile counts (F(4x4): 8, 32,
/// 128, 512, 1024; F(2x2) four times as many). 1280 channels make the transformed weight
/// of the 16x16 level larger than any cache, as in the model.
const PROBES: [Probe; 5] = [
    Probe {
        n: 2,
        channels: 1280,
        side: 8,
    },
    Probe {
        n: 2,
        channels: 1280,
        side: 16,
    },
    Probe {
        n: 2,
        channels: 640,
        side: 32,
    },
    Probe {
        n: 2,
        channels: 320,
        side: 64,
    },
    Probe {
        n: 1,
        channels: 256,
        side: 128,
    },
];

/// The algorithms in the order of [`ProbeTimes`].
const ALGORITHMS: [Algorithm; 3] = [
    Algorithm::Im2col,
    Algorithm::WinogradF2,
    Algorithm::WinogradF4,
];

/// One probe's times: per round, one call of each algorithm (im2col, F(2x2), F(4x4)),
/// run back to back.
type ProbeTimes = Vec<[Duration; 3]>;

/// Rounds per probe after a warm-up round. Algorithms are compared round by round and the
/// median taken, so that one slow round cannot decide: on 2 Zen 3 cores (KVM guest,
/// 2026-12-08), whose speed drifts by 10-30% over minutes, comparing each algorithm's
/// fastest of 3 calls once put F(2x2) at 0.87 of im2col's time at 8x8 (25-35 ms calls),
/// where six other measurements put it at 1.00-1.10. Five rounds keep the whole measurement
/// at 7.6-9.7 s there.
const ROUNDS: usize = 5;

/// How many times as long `mine` took as the fastest of `others` (slots of
/// [`ProbeTimes`]): the median over the rounds, so that one slow round does not decide.
fn slowdown(times: &ProbeTimes, mine: usize, others: &[usize]) -> f64 {
    let mut ratios: Vec<f64> = times
        .iter()
        .map(|round| {
            let best_other = others
                .iter()
                .map(|&o| round[o])
                .min()
                .unwrap_or(Duration::MAX);
            round[mine].as_secs_f64() / best_other.as_secs_f64()
        })
        .collect();
    median(&mut ratios)
}

/// The median of `values` (NaN when empty).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Each algorithm's median time at one probe, in ms: for the log and the file.
fn median_ms(times: &ProbeTimes) -> [f64; 3] {
    std::array::from_fn(|slot| {
        let mut ms: Vec<f64> = times.iter().map(|r| r[slot].as_secs_f64() * 1e3).collect();
        (median(&mut ms) * 10.0).round() / 10.0
    })
}

/// Times each algorithm at each probe, the algorithms alternating so that a drift in the
/// machine's speed falls on all of them alike.
fn measure(probes: &[Probe]) -> Vec<ProbeTimes> {
    // Outside any job's interrupt: both load paths run outside one today, but a library
    // caller may load a model within a job, and a cancelled call would return early and
    // look fast.
    crate::tensor::interrupt::unscoped(|| {
        probes
            .iter()
            .map(|probe| {
                let p = probe.params();
                // Any normal values do: a convolution's time does not depend on them.
                let x = vec![0.1; p.n * p.c * p.h * p.w];
                let w = vec![0.01; p.oc * p.c * 9];
                let bias = vec![0.5; p.oc];
                let mut rounds = Vec::with_capacity(ROUNDS);
                for round in 0..=ROUNDS {
                    let times = ALGORITHMS.map(|algorithm| {
                        let started = Instant::now();
                        std::hint::black_box(algorithm.run(&x, &w, Some(&bias), &p));
                        started.elapsed()
                    });
                    // The first round warms the caches and the allocator up.
                    if round > 0 {
                        rounds.push(times);
                    }
                }
                rounds
            })
            .collect()
    })
}

/// How much faster the measurement must find an algorithm than the table's choice (by the
/// median of the rounds' ratios) to choose it instead, and how much slower to drop the
/// table's. A choice that flips with the machine's noise would change the images' rounding
/// from one start to the next for little speed. On 2 Zen 3 cores (KVM guest, 2026-12-08)
/// F(2x2)'s time over im2col's at 8x8, a memory-bound layer, measured 0.83-1.10 in seven
/// measurements (medians of 5 rounds), F(4x4)'s over F(2x2)'s at 16x16 0.94-1.14. The
/// differences the table is blind to are larger: F(4x4) over the others at 16x16 and 64x64
/// took 0.6-0.7 of the time on AVX2 cores (see the table).
const MARGIN: f64 = 0.2;

/// The cut-offs the times say, starting from the table's. At each probe the answer to
/// "is this variant the fastest?" is the table's unless the times say otherwise by more
/// than [`MARGIN`]; each variant then runs from the fewest tiles from which the answer is
/// yes at every probe (the table's own cut-off where the table's answers turn at the same
/// probe). F(2x2) is asked only against im2col, and only at the probes below F(4x4)'s
/// cut-off (above it F(4x4) runs). A variant the times reject at the largest probe it is
/// judged at is not used at all (`usize::MAX`, "never"), unless the table does not use it
/// there either: then the table's cut-off, beyond the probes, stands.
fn cutoffs_from(probes: &[Probe], times: &[ProbeTimes], table: WinogradCutoffs) -> WinogradCutoffs {
    assert_eq!(probes.len(), times.len(), "a time per probe");
    debug_assert!(
        probes.windows(2).all(|w| w[0].tiles(4) < w[1].tiles(4)),
        "probes by growing tile counts"
    );
    let [im2col, f2, f4] = [0, 1, 2];
    let f4_tiles = cutoff(probes, times, (f4, &[im2col, f2]), 4, table.f4_tiles);
    let below_f4 = probes.partition_point(|p| p.tiles(4) < f4_tiles);
    let f2_tiles = cutoff(
        &probes[..below_f4],
        &times[..below_f4],
        (f2, &[im2col]),
        2,
        table.f2_tiles,
    );
    WinogradCutoffs { f4_tiles, f2_tiles }
}

/// [`cutoffs_from`]'s cut-off for the algorithm `contest.0` against those in `contest.1`
/// (slots of [`ProbeTimes`]), counted in `m x m` tiles, whose table value is `table_tiles`.
fn cutoff(
    probes: &[Probe],
    times: &[ProbeTimes],
    contest: (usize, &[usize]),
    m: usize,
    table_tiles: usize,
) -> usize {
    let (mine, others) = contest;
    let answers: Vec<bool> = probes
        .iter()
        .zip(times)
        .map(|(probe, t)| {
            let slowdown = slowdown(t, mine, others);
            if probe.tiles(m) >= table_tiles {
                slowdown <= 1.0 + MARGIN
            } else {
                slowdown < 1.0 - MARGIN
            }
        })
        .collect();
    let first = answers.iter().rposition(|yes| !yes).map_or(0, |i| i + 1);
    let table_first = probes.iter().position(|p| p.tiles(m) >= table_tiles);
    if table_first.unwrap_or(probes.len()) == first {
        table_tiles
    } else {
        probes.get(first).map_or(usize::MAX, |probe| probe.tiles(m))
    }
}

/// Each probe's median times, for the log: `1280x16x16 111/72/73, ...`.
fn describe_times(probes: &[Probe], times: &[ProbeTimes]) -> String {
    probes
        .iter()
        .zip(times)
        .map(|(p, t)| {
            let [im2col, f2, f4] = median_ms(t);
            format!(
                "{}x{}x{} {im2col:.0}/{f2:.0}/{f4:.0}",
                p.channels, p.side, p.side
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The processor's name, the vector level the kernels run at, the products' precision and
/// the version of this program and measurement: what the cut-offs hold for. The thread
/// count is left out, so that a request gives the same image on any number of cores.
fn machine() -> String {
    format!(
        "{} | {:?} | {} | sd-wgpu {} measurement {MEASUREMENT_VERSION}",
        processor_name(),
        simd::level(),
        super::precision::current(),
        env!("CARGO_PKG_VERSION"),
    )
}

/// The CPU's brand string, family and model (CPUID) on x86-64; the architecture elsewhere.
fn processor_name() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // Leaves 0x8000_0002..4 are read only where leaf 0x8000_0000 reports them.
        let (brand, signature) = {
            let mut brand = Vec::with_capacity(48);
            if __cpuid(0x8000_0000).eax >= 0x8000_0004 {
                for leaf in 0x8000_0002..=0x8000_0004u32 {
                    let r = __cpuid(leaf);
                    for word in [r.eax, r.ebx, r.ecx, r.edx] {
                        brand.extend_from_slice(&word.to_le_bytes());
                    }
                }
            }
            (brand, __cpuid(1).eax)
        };
        let brand = String::from_utf8_lossy(&brand);
        let brand = brand.trim_matches(|c: char| c == '\0' || c.is_whitespace());
        // Family and model as Linux's /proc/cpuinfo reports them.
        let base_family = (signature >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((signature >> 20) & 0xff)
        } else {
            base_family
        };
        let model = ((signature >> 4) & 0xf) | (((signature >> 16) & 0xf) << 4);
        format!("{brand} (family {family}, model {model})")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.to_string()
    }
}

/// The file's contents: measured cut-offs per machine.
#[derive(Default, Serialize, Deserialize)]
struct RememberedFile {
    machines: std::collections::BTreeMap<String, Remembered>,
}

#[derive(Serialize, Deserialize)]
struct Remembered {
    cutoffs: WinogradCutoffs,
    /// When, in seconds since 1970 (UTC).
    measured_at: u64,
    /// The threads the probes ran on.
    threads: usize,
    /// Per probe, the median time of im2col, F(2x2) and F(4x4), in ms (the cut-offs were
    /// read from the rounds' ratios).
    milliseconds: Vec<[f64; 3]>,
}

/// The remembered cut-offs; an empty set (logged) if the file is missing or unreadable.
fn read_file(file: &Path) -> RememberedFile {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return RememberedFile::default(),
        Err(e) => {
            tracing::warn!("cannot read {}: {e}; measuring again", file.display());
            return RememberedFile::default();
        }
    };
    serde_json::from_str(&text).unwrap_or_else(|e| {
        tracing::warn!(
            "{} is not a CPU tuning file ({e}); measuring again",
            file.display()
        );
        RememberedFile::default()
    })
}

/// Writes `contents` to `file` through a temporary file and a rename, so that a process
/// reading it meanwhile (two servers starting at once) sees the old or the new whole.
fn write_file(file: &Path, contents: &RememberedFile) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(contents).map_err(std::io::Error::other)?;
    // Unique to this process and moment: two containers sharing the folder may both be
    // process 1.
    let nanos = since_1970().subsec_nanos();
    let temporary = dir.join(format!(".cpu-tuning.{}.{nanos}.tmp", std::process::id()));
    let written = std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, file));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

/// The time since 1970 (UTC); zero on a clock set before it.
fn since_1970() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FEW: [Probe; 3] = [
        Probe {
            n: 1,
            channels: 16,
            side: 4,
        },
        Probe {
            n: 1,
            channels: 16,
            side: 8,
        },
        Probe {
            n: 2,
            channels: 16,
            side: 8,
        },
    ];

    /// Times (im2col, F(2x2), F(4x4)) in ms.
    /// One round per probe.
    fn times(ms: &[[u64; 3]]) -> Vec<ProbeTimes> {
        ms.iter()
            .map(|t| vec![t.map(Duration::from_millis)])
            .collect()
    }

    /// Rounds are compared one by one: a round slow for one algorithm does not decide.
    #[test]
    fn one_slow_round_does_not_decide() {
        let rounds = |ms: &[[u64; 3]]| -> ProbeTimes {
            ms.iter().map(|t| t.map(Duration::from_millis)).collect()
        };
        // im2col slow in one round of three (as measured once at 8x8 on Zen 3).
        let t = rounds(&[[25, 27, 40], [36, 31, 48], [24, 26, 41]]);
        assert!((slowdown(&t, 1, &[0]) - 27.0 / 25.0).abs() < 1e-9);
        // Drift that slows a whole round leaves the ratio (even rounds: the middle two).
        let t = rounds(&[[25, 27, 40], [50, 54, 80], [26, 28, 42], [25, 26, 40]]);
        let expected = (27.0 / 25.0 + 28.0 / 26.0) / 2.0;
        assert!((slowdown(&t, 1, &[0]) - expected).abs() < 1e-9);
        assert_eq!(median_ms(&t), [25.5, 27.5, 41.0]);
        // F(4x4) against the faster of the other two, round by round.
        let t = rounds(&[[30, 20, 25], [20, 30, 25], [30, 20, 25]]);
        assert!((slowdown(&t, 2, &[0, 1]) - 1.25).abs() < 1e-9);
    }

    #[test]
    fn cutoffs_move_from_the_table_where_the_times_clearly_say_so() {
        use simd::Level::{Avx2, Avx512};
        // F(4x4) tiles 8, 32, 128, 512, 1024; F(2x2) 32, 128, 512, 2048, 4096.
        let cases = [
            // An AVX2 core where F(4x4) wins from 16x16: the table's cut-offs (F(2x2) is
            // asked at 8x8 only, where im2col wins).
            (
                Avx2,
                [
                    [20, 22, 25],
                    [90, 70, 60],
                    [90, 60, 55],
                    [90, 70, 55],
                    [110, 60, 45],
                ],
                (32, 256),
            ),
            // As on Zen 5: the table's own cut-offs.
            (
                Avx512,
                [
                    [10, 12, 15],
                    [40, 45, 50],
                    [40, 30, 35],
                    [40, 25, 30],
                    [50, 30, 28],
                ],
                (1024, 256),
            ),
            // AVX-512 on a core that multiplies like AVX2 (Zen 4): F(4x4) from 16x16.
            (
                Avx512,
                [
                    [20, 22, 25],
                    [90, 70, 55],
                    [90, 60, 45],
                    [90, 70, 50],
                    [110, 60, 45],
                ],
                (32, 256),
            ),
            // Within the margin the table's answer stands (F(4x4) at 16x16, 1.7% slower).
            (
                Avx2,
                [
                    [20, 22, 25],
                    [90, 58, 59],
                    [90, 60, 55],
                    [90, 70, 55],
                    [110, 60, 45],
                ],
                (32, 256),
            ),
            // A win that does not last (F(4x4) at 16x16, not at 32x32) does not count;
            // F(2x2) 22% faster than im2col at 16x16 moves its cut-off there.
            (
                Avx512,
                [
                    [20, 22, 25],
                    [90, 70, 50],
                    [60, 65, 70],
                    [90, 70, 55],
                    [110, 60, 45],
                ],
                (512, 128),
            ),
            // F(4x4) never fastest: never used; F(2x2) from the smallest probe.
            (
                Avx2,
                [
                    [20, 10, 25],
                    [90, 70, 90],
                    [90, 60, 75],
                    [90, 70, 85],
                    [110, 60, 75],
                ],
                (usize::MAX, 32),
            ),
            // F(2x2) 33% faster than im2col at 8x8; its loss at 1024 tiles, where F(4x4)
            // runs, does not count.
            (
                Avx2,
                [
                    [30, 20, 25],
                    [90, 70, 60],
                    [90, 60, 55],
                    [90, 70, 55],
                    [50, 60, 45],
                ],
                (32, 32),
            ),
        ];
        for (level, ms, (f4, f2)) in cases {
            let want = WinogradCutoffs {
                f4_tiles: f4,
                f2_tiles: f2,
            };
            let table = WinogradCutoffs::table(level);
            assert_eq!(
                cutoffs_from(&PROBES, &times(&ms), table),
                want,
                "{level:?} {ms:?}"
            );
        }
    }

    #[test]
    fn measured_cutoffs_apply_to_layers_of_the_measured_sizes() {
        let measured = WinogradCutoffs {
            f4_tiles: 7,
            f2_tiles: 9,
        };
        for level in [simd::Level::Avx2, simd::Level::Avx512] {
            let table = WinogradCutoffs::table(level);
            for (channels, want) in [(320, measured), (256, measured), (255, table), (64, table)] {
                let p = Probe {
                    n: 2,
                    channels,
                    side: 16,
                }
                .params();
                assert_eq!(cutoffs_for(&p, Some(measured), level), want, "{channels}");
                assert_eq!(cutoffs_for(&p, None, level), table, "{channels}");
            }
        }
    }

    /// Measures into a missing file, then reads it back; `Measure` measures again, and a
    /// file that is not one is measured over.
    #[test]
    fn measurements_are_remembered_per_machine() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub").join("cpu-tuning.json");
        let first = resolve(TuningMode::Auto, &FEW, Some(&file), "cpu A");
        assert_eq!(first.source, Source::Measured);
        let text = std::fs::read_to_string(&file).unwrap();
        let stored: serde_json::Value = serde_json::from_str(&text).unwrap();
        let entry = &stored["machines"]["cpu A"];
        assert_eq!(entry["cutoffs"]["f4_tiles"], first.cutoffs.f4_tiles);
        assert_eq!(entry["milliseconds"].as_array().unwrap().len(), FEW.len());
        assert_eq!(entry["threads"], rayon::current_num_threads());

        let again = resolve(TuningMode::Auto, &FEW, Some(&file), "cpu A");
        assert_eq!(
            (again.source, again.cutoffs),
            (Source::Remembered, first.cutoffs)
        );
        // Another machine is measured and kept beside the first.
        let other = resolve(TuningMode::Auto, &FEW, Some(&file), "cpu B");
        assert_eq!(other.source, Source::Measured);
        let both = read_file(&file);
        assert_eq!(both.machines.len(), 2);
        let remeasured = resolve(TuningMode::Measure, &FEW, Some(&file), "cpu A");
        assert_eq!(remeasured.source, Source::Measured);

        std::fs::write(&file, "{ not json").unwrap();
        let over = resolve(TuningMode::Auto, &FEW, Some(&file), "cpu A");
        assert_eq!(over.source, Source::Measured);
        assert_eq!(read_file(&file).machines.len(), 1);

        // An unwritable place: measured all the same.
        let blocked = dir.path().join("a-file");
        std::fs::write(&blocked, "").unwrap();
        let unwritable = resolve(
            TuningMode::Auto,
            &FEW,
            Some(&blocked.join("x.json")),
            "cpu A",
        );
        assert_eq!(unwritable.source, Source::Measured);
    }

    /// Never is `null` in the file and in /health, and reads back as never.
    #[test]
    fn never_is_null_in_json() {
        let cutoffs = WinogradCutoffs {
            f4_tiles: usize::MAX,
            f2_tiles: 32,
        };
        let json = serde_json::to_value(cutoffs).unwrap();
        assert_eq!(json, serde_json::json!({"f4_tiles": null, "f2_tiles": 32}));
        assert_eq!(
            serde_json::from_value::<WinogradCutoffs>(json).unwrap(),
            cutoffs
        );
        assert_eq!(cutoffs.to_string(), "F(4x4) never, F(2x2) from 32 tiles");
    }

    #[test]
    fn the_machine_names_the_processor_and_level() {
        let name = machine();
        assert!(name.contains(&format!("{:?}", simd::level())), "{name}");
        assert!(!processor_name().is_empty());
    }
}
