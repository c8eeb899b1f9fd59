//! A vectorisable `exp` for the softmax and SwiGLU kernels.
//!
//! `f32::exp` is a libm call per element (`__expf_fma`), which keeps the loops around it
//! scalar: the attention softmax and the MLP's SiLU spent a noticeable share of a forward
//! there. Here exp is a branch-free range reduction and polynomial (Cephes' `expf`, ≤ 2 ulp
//! on the range that matters) that the compiler turns into SIMD code; the row kernels are
//! compiled twice, plain and with AVX2+FMA, and pick at run time.

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two so that `n * LN2_HI` is exact for the n that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this exp underflows f32's normal range: the result is 0 (so -inf, a mask, gives 0).
const MIN_ARG: f32 = -87.336_55;
/// Above this 2^n would overflow the exponent field; e^x saturates at ~2.4e38 (callers only
/// ever pass x ≤ 0 or, in SiLU, -x where the result no longer matters).
const MAX_ARG: f32 = 88.376_26;
/// Adding and subtracting 1.5 * 2^23 rounds an f32 of magnitude < 2^22 to an integer.
const ROUND: f32 = 12_582_912.0;

/// e^x, branch-free. NaN in gives an unspecified finite value: callers never pass NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let xc = x.clamp(MIN_ARG, MAX_ARG);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x >= MIN_ARG {
        y * scale
    } else {
        0.0
    }
}

const LANES: usize = 8;

/// Softmax of one row in place. Max and sum run in 8 independent lanes (vectorisable); the
/// lanes' sums are added in f64. Rows must hold at least one finite value.
#[inline(always)]
fn softmax_body(r: &mut [f32]) {
    let mut lane_max = [f32::NEG_INFINITY; LANES];
    let mut chunks = r.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in lane_max.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let m = chunks.remainder().iter().chain(&lane_max).copied().fold(f32::NEG_INFINITY, f32::max);
    let mut lane_sum = [0f32; LANES];
    let mut chunks = r.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, v) in lane_sum.iter_mut().zip(c) {
            *v = exp(*v - m);
            *s += *v;
        }
    }
    let mut sum: f64 = lane_sum.iter().map(|&s| s as f64).sum();
    for v in chunks.into_remainder() {
        *v = exp(*v - m);
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    r.iter_mut().for_each(|y| *y *= inv);
}

#[inline(always)]
fn swiglu_body(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((y, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *y = g / (1.0 + exp(-g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax(r: &mut [f32]) {
        super::softmax_body(r)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
        super::swiglu_body(out, gate, up)
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    // std caches the CPUID answer: this is an atomic load.
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Softmax of `r` in place (see [`softmax_body`]).
pub(crate) fn softmax_row(r: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { avx2::softmax(r) };
    }
    softmax_body(r)
}

/// `out = silu(gate) * up`, elementwise over equal-length rows.
pub(crate) fn swiglu_row(out: &mut [f32], gate: &[f32], up: &[f32]) {
    debug_assert!(out.len() == gate.len() && out.len() == up.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has the features the function is compiled for (checked above).
        return unsafe { avx2::swiglu(out, gate, up) };
    }
    swiglu_body(out, gate, up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_where_it_is_normal() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.3 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "max relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn softmax_matches_a_plain_f64_softmax_with_masks() {
        for n in [1usize, 5, 8, 13, 64, 93, 300] {
            let mut r: Vec<f32> = (0..n).map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.7).collect();
            // Mask every third entry (but never all of them).
            for i in (1..n).step_by(3) {
                r[i] = f32::NEG_INFINITY;
            }
            let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = r.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            let mut plain = r.clone();
            softmax_row(&mut r);
            softmax_body(&mut plain); // the same code without AVX2 (when the CPU has it)
            for (i, (&got, want)) in r.iter().zip(e.iter().map(|v| v / s)).enumerate() {
                assert!((got as f64 - want).abs() <= 1e-6 * want.max(1e-3), "n {n}, {i}");
                if want == 0.0 {
                    assert_eq!(got, 0.0, "a masked entry must be exactly 0");
                }
            }
            assert!((r.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-6);
            for (a, b) in r.iter().zip(&plain) {
                assert!((a - b).abs() <= 1e-7, "n {n}: dispatch changed the result");
            }
        }
    }

    #[test]
    fn swiglu_matches_the_formula() {
        let g: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 1.3).collect();
        let u: Vec<f32> = (0..37).map(|i| (i as f32) * 0.1 - 1.0).collect();
        let mut out = vec![0f32; 37];
        swiglu_row(&mut out, &g, &u);
        for i in 0..37 {
            let (gd, ud) = (g[i] as f64, u[i] as f64);
            let want = gd / (1.0 + (-gd).exp()) * ud;
            assert!((out[i] as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3), "{i}");
        }
    }
}
