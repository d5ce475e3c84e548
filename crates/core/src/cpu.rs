//! [`CpuPath`]: the compiled variants of the kernel, and which one a CPU gets. The choice
//! is a pure function of the CPU's features and of the environment variable
//! `ATTENTION_CPU_PATH`, so that the choice made for any CPU (baseline only, AVX2 without
//! AVX-512, AVX-512) is unit-tested on whatever machine runs the tests.
//! [`CpuPath::detect`], [`CpuPath::is_supported`] and the check of a forced path call
//! these functions with the features this CPU reports. The kernels (`kernel/simd.rs`)
//! compile one variant per path; this module, like the options and errors that name a
//! path, does not depend on them.

use std::sync::OnceLock;

use crate::AttentionError;

/// A compiled variant of the kernel, chosen by CPU features.
///
/// # Example
/// ```
/// use attention_core::CpuPath;
/// let best = CpuPath::detect();
/// assert!(best.is_supported());
/// assert!(CpuPath::supported().contains(&CpuPath::Portable));
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuPath {
    /// Plain Rust, compiled for the target's baseline (SSE2 on x86-64); runs everywhere.
    Portable,
    /// x86-64 with AVX2 and FMA (256-bit vectors, fused multiply-add).
    Avx2,
    /// x86-64 with AVX-512F (512-bit vectors).
    Avx512,
}

impl CpuPath {
    /// Whether this CPU can run the path.
    #[must_use]
    pub fn is_supported(self) -> bool {
        CpuFeatures::detect().supports(self)
    }

    /// Every path this CPU can run, slowest first.
    #[must_use]
    pub fn supported() -> Vec<CpuPath> {
        CpuFeatures::detect().supported()
    }

    /// The path calls use by default: the one `ATTENTION_CPU_PATH` names if it is set
    /// and supported, else the fastest supported. Read once per process.
    #[must_use]
    pub fn detect() -> CpuPath {
        static DETECTED: OnceLock<CpuPath> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let env = std::env::var(ENV_VAR).ok();
            choose(CpuFeatures::detect(), env.as_deref())
        })
    }

    /// Whether `ATTENTION_CPU_PATH` names a supported path, which [`CpuPath::detect`] then
    /// returns: calls then run that path's kernel at every size, as with a path forced
    /// through the options.
    pub(crate) fn forced_by_env() -> bool {
        static FORCED: OnceLock<bool> = OnceLock::new();
        *FORCED.get_or_init(|| {
            let env = std::env::var(ENV_VAR).ok();
            forced(CpuFeatures::detect(), env.as_deref())
        })
    }

    /// `Ok(self)` if supported, else the typed error.
    pub(crate) fn check(self) -> Result<CpuPath, AttentionError> {
        check(self, CpuFeatures::detect())
    }

    /// The path a call runs on and whether it was forced: the one its options name
    /// (checked: [`AttentionError::UnsupportedCpuPath`] if this CPU lacks it), else
    /// [`CpuPath::detect`]'s, forced if `ATTENTION_CPU_PATH` named it.
    pub(crate) fn for_call(requested: Option<CpuPath>) -> Result<(CpuPath, bool), AttentionError> {
        match requested {
            Some(path) => Ok((path.check()?, true)),
            None => Ok((CpuPath::detect(), CpuPath::forced_by_env())),
        }
    }
}

/// The environment variable that forces the default path (`portable`, `avx2`, `avx512`,
/// any case); read once per process by [`CpuPath::detect`].
pub(crate) const ENV_VAR: &str = "ATTENTION_CPU_PATH";

/// The CPU features the kernel paths need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CpuFeatures {
    /// AVX2 (256-bit integer and float vectors).
    pub avx2: bool,
    /// Fused multiply-add (FMA3).
    pub fma: bool,
    /// AVX-512 Foundation.
    pub avx512f: bool,
}

impl CpuFeatures {
    /// The features of this CPU (none on a target other than x86-64, where only the
    /// portable path exists).
    pub(crate) fn detect() -> CpuFeatures {
        #[cfg(target_arch = "x86_64")]
        {
            CpuFeatures {
                avx2: std::arch::is_x86_feature_detected!("avx2"),
                fma: std::arch::is_x86_feature_detected!("fma"),
                avx512f: std::arch::is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures::default()
        }
    }

    /// Whether a CPU with these features can run `path`. The SIMD paths exist only on
    /// x86-64; the AVX-512 kernels also use AVX2 and FMA instructions.
    ///
    /// Applied to [`CpuFeatures::detect`], this is [`CpuPath::is_supported`], on which the
    /// `unsafe` calls of `simd.rs` rely: a path may only be true here if the CPU has every
    /// feature its `#[target_feature]` kernels are compiled with.
    pub(crate) fn supports(self, path: CpuPath) -> bool {
        let x86 = cfg!(target_arch = "x86_64");
        match path {
            CpuPath::Portable => true,
            CpuPath::Avx2 => x86 && self.avx2 && self.fma,
            CpuPath::Avx512 => x86 && self.avx512f && self.avx2 && self.fma,
        }
    }

    /// Every path these features can run, slowest first.
    pub(crate) fn supported(self) -> Vec<CpuPath> {
        [CpuPath::Portable, CpuPath::Avx2, CpuPath::Avx512]
            .into_iter()
            .filter(|&p| self.supports(p))
            .collect()
    }
}

/// The path a name in `ATTENTION_CPU_PATH` stands for (any case), if any.
pub(crate) fn parse(name: &str) -> Option<CpuPath> {
    match name.to_ascii_lowercase().as_str() {
        "portable" => Some(CpuPath::Portable),
        "avx2" => Some(CpuPath::Avx2),
        "avx512" => Some(CpuPath::Avx512),
        _ => None,
    }
}

/// Whether `ATTENTION_CPU_PATH` (`env`) forces a path: it names one the CPU supports.
/// A forced path runs its own kernel at every size (no row path for small calls).
pub(crate) fn forced(features: CpuFeatures, env: Option<&str>) -> bool {
    env.and_then(parse).is_some_and(|p| features.supports(p))
}

/// The default path for a CPU with `features`, given the value of `ATTENTION_CPU_PATH`
/// (`None` if unset): the path it names if the CPU supports it, else the fastest the
/// CPU supports (an unknown name or an unsupported path is ignored).
pub(crate) fn choose(features: CpuFeatures, env: Option<&str>) -> CpuPath {
    match env.and_then(parse) {
        Some(p) if features.supports(p) => p,
        _ => *features
            .supported()
            .last()
            .expect("the portable path is always supported"),
    }
}

/// `Ok(path)` if a CPU with `features` can run it, else the typed error.
pub(crate) fn check(path: CpuPath, features: CpuFeatures) -> Result<CpuPath, AttentionError> {
    if features.supports(path) {
        Ok(path)
    } else {
        Err(AttentionError::UnsupportedCpuPath { path })
    }
}

/// Who made a CPU, from `cpuid` leaf 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vendor {
    /// "AuthenticAMD".
    Amd,
    /// "GenuineIntel".
    Intel,
    /// Anything else, or not x86-64.
    Other,
}

/// A CPU's vendor, family and model as `cpuid` reports them (family and model with their
/// extended fields added in, as the vendors' manuals define them): what the tuning table
/// is keyed by, since the number of FMA units or the behaviour of the memory system are
/// not CPU features a program can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CpuModel {
    pub vendor: Vendor,
    pub family: u32,
    pub model: u32,
}

impl CpuModel {
    /// This CPU's (`Other`, 0, 0 on a target other than x86-64).
    pub(crate) fn detect() -> CpuModel {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::__cpuid;
            let id = __cpuid(0);
            let vendor = match (id.ebx, id.edx, id.ecx) {
                // "Auth" "enti" "cAMD" and "Genu" "ineI" "ntel", little-endian.
                (0x6874_7541, 0x6974_6e65, 0x444d_4163) => Vendor::Amd,
                (0x756e_6547, 0x4965_6e69, 0x6c65_746e) => Vendor::Intel,
                _ => Vendor::Other,
            };
            let eax = __cpuid(1).eax;
            let (base_family, base_model) = ((eax >> 8) & 0xf, (eax >> 4) & 0xf);
            let family = if base_family == 0xf {
                base_family + ((eax >> 20) & 0xff)
            } else {
                base_family
            };
            let model = if base_family == 0x6 || base_family == 0xf {
                (((eax >> 16) & 0xf) << 4) | base_model
            } else {
                base_model
            };
            CpuModel {
                vendor,
                family,
                model,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuModel {
                vendor: Vendor::Other,
                family: 0,
                model: 0,
            }
        }
    }
}

/// How the decoding kernel asks for the next chunk of K and V while it computes one
/// (`kernel/decode.rs`, [`Ahead`](crate::kernel::decode)): a choice that depends on the
/// memory system, not on the instructions a CPU has, and that was measured the other way
/// round on two CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DecodePrefetch {
    /// Every cache line of the next chunk at the start of the current one: on the
    /// Sapphire Rapids Xeon, 1.5–1.6× the memory floor against 1.8× for requests spread
    /// over the score loop (`docs/ARCHITECTURE.md`, decisions).
    AtStart,
    /// Each column or value row of the next chunk as the loops read the same one of the
    /// current chunk: on Zen 5, 1.43–1.52× the floor against 1.64–1.76× at the start
    /// (`docs/PERFORMANCE.md`, "A Zen 5 core").
    AsRead,
}

/// The settings chosen by CPU model ([`tuning`]): one entry of [`TUNINGS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tuning {
    /// The entry's name, as `ATTENTION_TUNING` takes it.
    pub name: &'static str,
    pub decode_prefetch: DecodePrefetch,
}

/// The tuning table: the entries measured, and `default` for every other CPU (the
/// settings measured on the Xeon, the first CPU this library was tuned on). Tile shapes
/// are not in it: the same register tiles were the best measured and modelled on every
/// AVX-512 core (Zen 4, Zen 5, Sapphire Rapids; `docs/PERFORMANCE.md`, "Register tiles"),
/// so they follow the CPU path alone.
pub(crate) const TUNINGS: [Tuning; 3] = [DEFAULT, ZEN, ICE_LAKE];

/// Every CPU not named in the table.
const DEFAULT: Tuning = Tuning {
    name: "default",
    decode_prefetch: DecodePrefetch::AtStart,
};

/// AMD Zen 4 and Zen 5 (measured on both: `docs/PERFORMANCE.md`).
const ZEN: Tuning = Tuning {
    name: "zen",
    decode_prefetch: DecodePrefetch::AsRead,
};

/// Intel Ice Lake server cores: requests as read, as on Zen (`docs/PERFORMANCE.md`, "An Ice
/// Lake Xeon": five alternations, the decoding row at 1.04–1.26× the memory floor against
/// 1.16–1.57× at 131072 tokens). An entry of its own, not `zen`'s, so that either can
/// change without the other.
const ICE_LAKE: Tuning = Tuning {
    name: "icelake",
    decode_prefetch: DecodePrefetch::AsRead,
};

/// The environment variable that forces an entry of [`TUNINGS`] by name (any case),
/// whatever the CPU: so that tests run each entry on one machine. An unknown name is
/// ignored. Read once per process.
pub(crate) const TUNING_ENV: &str = "ATTENTION_TUNING";

/// The entry of [`TUNINGS`] for `model`, or the one `env` names: a pure function, so the
/// choice for every CPU is unit-tested on any machine. Zen 5 is AMD family 26 (0x1A); Zen 4
/// is family 25 (0x19) with models 0x10–0x1F (Genoa), 0x60–0x7F (Raphael, Phoenix) and
/// 0xA0–0xAF (Bergamo, Siena), the other models of family 25 being Zen 3 (not measured:
/// the default). Ice Lake's server cores are Intel family 6, models 0x6A (Xeon Scalable)
/// and 0x6C (Xeon D); its client models and every other Intel core get the default.
pub(crate) fn tuning_for(model: CpuModel, env: Option<&str>) -> Tuning {
    if let Some(forced) = env.and_then(|name| {
        TUNINGS
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name.trim()))
    }) {
        return *forced;
    }
    match model {
        CpuModel {
            vendor: Vendor::Amd,
            family: 26,
            ..
        } => ZEN,
        CpuModel {
            vendor: Vendor::Amd,
            family: 25,
            model: 0x10..=0x1F | 0x60..=0x7F | 0xA0..=0xAF,
        } => ZEN,
        CpuModel {
            vendor: Vendor::Intel,
            family: 6,
            model: 0x6A | 0x6C,
        } => ICE_LAKE,
        _ => DEFAULT,
    }
}

/// This CPU's tuning ([`tuning_for`] of its model and `ATTENTION_TUNING`), decided once
/// per process: results never depend on it (it changes only the order of memory
/// requests, never an operation on a value), and it is never chosen by timing.
pub(crate) fn tuning() -> Tuning {
    #[cfg(test)]
    if let Some(i) = forced_tuning::get() {
        return TUNINGS[i];
    }
    detected_tuning()
}

/// [`tuning`] as this CPU and the environment decide it.
fn detected_tuning() -> Tuning {
    static TUNING: OnceLock<Tuning> = OnceLock::new();
    *TUNING.get_or_init(|| {
        let env = std::env::var(TUNING_ENV).ok();
        tuning_for(CpuModel::detect(), env.as_deref())
    })
}

/// A unit test's choice of [`TUNINGS`] entry for the whole process (the environment
/// variable is read once): safe to set while other tests run, since the tuning never
/// changes a result.
#[cfg(test)]
pub(crate) mod forced_tuning {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static FORCED: AtomicUsize = AtomicUsize::new(usize::MAX);
    /// Forces entry `i` (`None`: back to this CPU's).
    pub(crate) fn set(i: Option<usize>) {
        FORCED.store(i.unwrap_or(usize::MAX), Ordering::SeqCst);
    }
    pub(super) fn get() -> Option<usize> {
        let i = FORCED.load(Ordering::SeqCst);
        (i != usize::MAX).then_some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZEN5_CPU: CpuModel = CpuModel {
        vendor: Vendor::Amd,
        family: 26,
        model: 2,
    };
    const ZEN4_CPU: CpuModel = CpuModel {
        vendor: Vendor::Amd,
        family: 25,
        model: 17,
    };
    const SAPPHIRE_RAPIDS: CpuModel = CpuModel {
        vendor: Vendor::Intel,
        family: 6,
        model: 143,
    };

    #[test]
    fn tuning_follows_the_model_and_the_environment() {
        let name = |m, env| tuning_for(m, env).name;
        let amd = |family, model| CpuModel {
            vendor: Vendor::Amd,
            family,
            model,
        };
        // Zen 5, and Zen 4's model ranges at both ends; Zen 3's models in between and
        // around them, and an Intel core, get the default.
        for m in [
            ZEN5_CPU,
            ZEN4_CPU,
            amd(25, 0x10),
            amd(25, 0x1F),
            amd(25, 0x61),
        ]
        .into_iter()
        .chain([amd(25, 0x74), amd(25, 0xA0), amd(25, 0xAF)])
        {
            assert_eq!(name(m, None), "zen", "{m:?}");
            assert_eq!(tuning_for(m, None).decode_prefetch, DecodePrefetch::AsRead);
        }
        let intel = |model| CpuModel {
            vendor: Vendor::Intel,
            family: 6,
            model,
        };
        // Ice Lake's server models; its client models (0x7D, 0x7E) and the neighbours of
        // 0x6A and 0x6C get the default.
        for m in [intel(0x6A), intel(0x6C)] {
            assert_eq!(name(m, None), "icelake", "{m:?}");
            assert_eq!(tuning_for(m, None).decode_prefetch, DecodePrefetch::AsRead);
        }
        for m in [SAPPHIRE_RAPIDS, amd(25, 0x01), amd(25, 0x21), amd(25, 0x50)]
            .into_iter()
            .chain([amd(25, 0x0F), amd(25, 0x20), amd(25, 0x80), amd(25, 0xB0)])
            .chain([
                amd(23, 0x31),
                intel(0x69),
                intel(0x6B),
                intel(0x6D),
                intel(0x7D),
            ])
            .chain([
                intel(0x7E),
                CpuModel {
                    family: 15,
                    ..intel(0x6A)
                },
            ])
        {
            assert_eq!(name(m, None), "default", "{m:?}");
        }
        assert_eq!(
            tuning_for(SAPPHIRE_RAPIDS, None).decode_prefetch,
            DecodePrefetch::AtStart
        );
        // Forced by name, any case; unknown names ignored.
        assert_eq!(name(SAPPHIRE_RAPIDS, Some("ZEN")), "zen");
        assert_eq!(name(ZEN5_CPU, Some("default")), "default");
        assert_eq!(name(ZEN5_CPU, Some("zen9")), "zen");
        assert_eq!(name(SAPPHIRE_RAPIDS, Some("")), "default");
        // Every entry can be forced, and names are distinct.
        for t in TUNINGS {
            assert_eq!(tuning_for(SAPPHIRE_RAPIDS, Some(t.name)), t);
        }
        let env = std::env::var(TUNING_ENV).ok();
        // (Not `tuning()`: another test may be forcing an entry meanwhile.)
        assert_eq!(
            detected_tuning(),
            tuning_for(CpuModel::detect(), env.as_deref())
        );
    }

    #[test]
    fn this_cpu_model_is_read() {
        let m = CpuModel::detect();
        if cfg!(target_arch = "x86_64") && m.vendor != Vendor::Other {
            // Every x86-64 CPU of these vendors has family 6 or more (AMD 0xF + extended).
            assert!(m.family >= 6, "{m:?}");
        }
    }

    const BASELINE: CpuFeatures = CpuFeatures {
        avx2: false,
        fma: false,
        avx512f: false,
    };
    /// E.g. Haswell to Alder Lake, Zen 1 to Zen 3.
    const AVX2_ONLY: CpuFeatures = CpuFeatures {
        avx2: true,
        fma: true,
        avx512f: false,
    };
    /// E.g. Skylake-SP and later Xeons, Zen 4.
    const AVX512: CpuFeatures = CpuFeatures {
        avx2: true,
        fma: true,
        avx512f: true,
    };
    /// AVX2 without FMA (some VMs mask FMA): the AVX2 kernels need both.
    const AVX2_NO_FMA: CpuFeatures = CpuFeatures {
        avx2: true,
        fma: false,
        avx512f: false,
    };
    /// AVX-512F reported without AVX2 (not real hardware, but a hypervisor can mask it).
    const AVX512_NO_AVX2: CpuFeatures = CpuFeatures {
        avx2: false,
        fma: true,
        avx512f: true,
    };

    /// On x86-64 the SIMD paths follow the features; elsewhere only portable exists.
    fn x86(p: CpuPath) -> CpuPath {
        if cfg!(target_arch = "x86_64") {
            p
        } else {
            CpuPath::Portable
        }
    }

    #[test]
    fn supported_paths_follow_the_features() {
        use CpuPath::*;
        let simd = cfg!(target_arch = "x86_64");
        assert_eq!(BASELINE.supported(), vec![Portable]);
        assert_eq!(AVX2_NO_FMA.supported(), vec![Portable]);
        assert_eq!(AVX512_NO_AVX2.supported(), vec![Portable]);
        let want = if simd {
            vec![Portable, Avx2]
        } else {
            vec![Portable]
        };
        assert_eq!(AVX2_ONLY.supported(), want);
        let want = if simd {
            vec![Portable, Avx2, Avx512]
        } else {
            vec![Portable]
        };
        assert_eq!(AVX512.supported(), want);
    }

    #[test]
    fn default_choice_is_the_fastest_supported_path() {
        assert_eq!(choose(BASELINE, None), CpuPath::Portable);
        assert_eq!(choose(AVX2_NO_FMA, None), CpuPath::Portable);
        assert_eq!(choose(AVX512_NO_AVX2, None), CpuPath::Portable);
        assert_eq!(choose(AVX2_ONLY, None), x86(CpuPath::Avx2));
        assert_eq!(choose(AVX512, None), x86(CpuPath::Avx512));
    }

    #[test]
    fn environment_forces_a_supported_path() {
        assert_eq!(choose(AVX512, Some("portable")), CpuPath::Portable);
        assert_eq!(choose(AVX512, Some("avx2")), x86(CpuPath::Avx2));
        assert_eq!(choose(AVX512, Some("AVX512")), x86(CpuPath::Avx512));
        assert_eq!(choose(AVX2_ONLY, Some("Portable")), CpuPath::Portable);
        assert_eq!(choose(AVX2_ONLY, Some("avx2")), x86(CpuPath::Avx2));
        assert_eq!(choose(BASELINE, Some("portable")), CpuPath::Portable);
    }

    #[test]
    fn environment_naming_an_unsupported_or_unknown_path_is_ignored() {
        // Unsupported: the fastest supported path instead.
        assert_eq!(choose(AVX2_ONLY, Some("avx512")), x86(CpuPath::Avx2));
        assert_eq!(choose(BASELINE, Some("avx512")), CpuPath::Portable);
        assert_eq!(choose(BASELINE, Some("avx2")), CpuPath::Portable);
        // Unknown names and empty values.
        for name in ["", "sse2", "avx-512", "AVX 2", "neon"] {
            assert_eq!(choose(AVX512, Some(name)), x86(CpuPath::Avx512), "{name:?}");
            assert_eq!(
                choose(AVX2_ONLY, Some(name)),
                x86(CpuPath::Avx2),
                "{name:?}"
            );
            assert_eq!(choose(BASELINE, Some(name)), CpuPath::Portable, "{name:?}");
        }
    }

    #[test]
    fn only_a_supported_named_path_counts_as_forced() {
        assert!(!forced(AVX512, None));
        assert!(forced(AVX512, Some("AVX2")) == cfg!(target_arch = "x86_64"));
        assert!(forced(BASELINE, Some("portable")));
        assert!(!forced(BASELINE, Some("avx2")));
        assert!(!forced(AVX2_ONLY, Some("avx512")));
        assert!(!forced(AVX512, Some("neon")));
    }

    #[test]
    fn forcing_an_unsupported_path_is_the_typed_error() {
        let err = |path| Err(AttentionError::UnsupportedCpuPath { path });
        assert_eq!(check(CpuPath::Portable, BASELINE), Ok(CpuPath::Portable));
        assert_eq!(check(CpuPath::Avx2, BASELINE), err(CpuPath::Avx2));
        assert_eq!(check(CpuPath::Avx512, BASELINE), err(CpuPath::Avx512));
        assert_eq!(check(CpuPath::Avx2, AVX2_NO_FMA), err(CpuPath::Avx2));
        assert_eq!(check(CpuPath::Avx512, AVX2_ONLY), err(CpuPath::Avx512));
        assert_eq!(check(CpuPath::Avx512, AVX512_NO_AVX2), err(CpuPath::Avx512));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(check(CpuPath::Avx2, AVX2_ONLY), Ok(CpuPath::Avx2));
            assert_eq!(check(CpuPath::Avx512, AVX512), Ok(CpuPath::Avx512));
        }
        // What the user of an AVX2-only CPU reads after forcing AVX-512.
        let message = check(CpuPath::Avx512, AVX2_ONLY).unwrap_err().to_string();
        assert_eq!(
            message,
            "the Avx512 kernel path needs CPU features this machine lacks"
        );
    }

    /// The public functions are these pure ones applied to this CPU's features and
    /// environment (which `ATTENTION_CPU_PATH=… cargo test` sets).
    #[test]
    fn public_detection_is_the_pure_choice_for_this_cpu() {
        let features = CpuFeatures::detect();
        let env = std::env::var(ENV_VAR).ok();
        assert_eq!(CpuPath::detect(), choose(features, env.as_deref()));
        assert_eq!(CpuPath::supported(), features.supported());
        for path in [CpuPath::Portable, CpuPath::Avx2, CpuPath::Avx512] {
            assert_eq!(path.is_supported(), features.supports(path), "{path:?}");
            assert_eq!(path.check(), check(path, features), "{path:?}");
        }
        // A forced path that this CPU has is the one calls use.
        if let Some(forced) = env.as_deref().and_then(parse)
            && features.supports(forced)
        {
            assert_eq!(CpuPath::detect(), forced);
        }
    }
}
