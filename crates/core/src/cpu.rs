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

#[cfg(test)]
mod tests {
    use super::*;

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
