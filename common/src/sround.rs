//! Stochastic rounding from f32 to bf16: how a bf16 policy keeps the updates that
//! round-to-nearest would throw away.
//!
//! At lr 1e-6 an optimizer step moves a weight by about 1e-6, while bf16's spacing near a
//! typical weight of 0.01 is 2^-14 ≈ 6.1e-5: round-to-nearest returns the old weight every
//! time and training silently does nothing. Stochastic rounding rounds up with probability
//! equal to the fraction of the spacing covered, so the *expected* weight follows the f32
//! update exactly, without keeping an f32 master copy (+4 bytes per parameter).
//!
//! The trick on bit patterns: bf16 is the high half of an f32. Adding a uniform random
//! 16-bit number to the low half and truncating rounds away from zero with probability
//! `low / 2^16`, which is exactly unbiased (sign-magnitude makes it symmetric for negative
//! values; subnormals and the carry into the exponent need no special case). NaN stays NaN,
//! ±inf stays ±inf, and values already representable in bf16 are returned unchanged.
//!
//! The random bits come from our own counter-based generator (SplitMix64 of the seed and the
//! element index), so a result depends only on `(x, seed)`: not on threads, chunking or a
//! dependency's RNG. Compute runs on the CPU; tensors on another device make a round trip.

use candle_core::{DType, Device, Tensor};
use half::bf16;

use crate::error::{Error, Result};

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function (finalizer).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Stochastically rounds one f32 to bf16 with the 16 random bits `r`.
#[inline]
pub fn stochastic_round_one(x: f32, r: u16) -> bf16 {
    if x.is_nan() {
        // Truncation could clear every mantissa bit of a NaN and turn it into inf.
        return bf16::from_bits(((x.to_bits() >> 16) as u16) | 0x0040);
    }
    if x.is_infinite() {
        return bf16::from_f32(x);
    }
    // Carrying into the exponent is the correct rounding up (also to inf past the max).
    let bits = x.to_bits().wrapping_add(r as u32);
    bf16::from_bits((bits >> 16) as u16)
}

/// The random stream of `seed`. Pre-mixed so that nearby seeds (step, step + 1) give
/// unrelated streams.
fn stream(seed: u64) -> u64 {
    mix(seed ^ 0xA076_1D64_78BD_642F)
}

/// The 16 random bits of element `i`: a quarter of the `(i / 4)`-th hash of the stream.
#[inline]
fn bits(stream: u64, i: usize) -> u16 {
    let h = mix(stream.wrapping_add(((i / 4) as u64).wrapping_add(1).wrapping_mul(GAMMA)));
    (h >> (16 * (i % 4))) as u16
}

/// Rounds a slice whose first element is element `start` of the stream.
fn round_slice(xs: &[f32], out: &mut [bf16], start: usize, stream: u64) {
    debug_assert_eq!(xs.len(), out.len());
    for (j, (x, o)) in xs.iter().zip(out.iter_mut()).enumerate() {
        *o = stochastic_round_one(*x, bits(stream, start + j));
    }
}

/// Stochastic rounding of a whole f32 slice, deterministic in `seed`. Large slices are split
/// across threads; the result does not depend on how (bits are chosen by element index).
pub fn stochastic_round_slice(xs: &[f32], seed: u64) -> Vec<bf16> {
    let stream = stream(seed);
    let mut out = vec![bf16::ZERO; xs.len()];
    const CHUNK: usize = 1 << 16;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if xs.len() <= CHUNK || threads == 1 {
        round_slice(xs, &mut out, 0, stream);
        return out;
    }
    let per = xs.len().div_ceil(threads).max(CHUNK);
    std::thread::scope(|s| {
        for (k, (xc, oc)) in xs.chunks(per).zip(out.chunks_mut(per)).enumerate() {
            s.spawn(move || round_slice(xc, oc, k * per, stream));
        }
    });
    out
}

/// Stochastically rounds an f32 tensor to bf16 (same shape and device). Deterministic given
/// `seed`; use a different seed for every (step, parameter) so the rounding errors of
/// successive updates are independent.
pub fn stochastic_round_bf16(x: &Tensor, seed: u64) -> Result<Tensor> {
    if x.dtype() != DType::F32 {
        return Err(Error::Input(format!(
            "stochastic rounding to bf16 takes an f32 tensor, got {:?}",
            x.dtype()
        )));
    }
    let values = x.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
    let rounded = stochastic_round_slice(&values, seed);
    Ok(Tensor::from_vec(rounded, x.shape(), &Device::Cpu)?.to_device(x.device())?)
}

/// `param + update` for a bf16 parameter: the sum is formed in f32 and stochastically
/// rounded back to bf16 (see the module docs for why round-to-nearest is not enough).
/// `update` may be f32 or bf16 and must have the parameter's shape.
pub fn apply_update_bf16(param: &Tensor, update: &Tensor, seed: u64) -> Result<Tensor> {
    if param.dtype() != DType::BF16 {
        return Err(Error::Input(format!(
            "apply_update_bf16 takes a bf16 parameter, got {:?} (f32 parameters need no \
             stochastic rounding: add the update directly)",
            param.dtype()
        )));
    }
    if param.dims() != update.dims() {
        return Err(Error::Input(format!(
            "update of shape {:?} does not match the parameter's {:?}",
            update.dims(),
            param.dims()
        )));
    }
    let sum = (param.to_dtype(DType::F32)? + update.to_dtype(DType::F32)?)?;
    stochastic_round_bf16(&sum, seed)
}

/// A seed for the rounding of parameter `param_index` at optimizer step `step` of a run
/// seeded with `run_seed`: distinct for every (step, parameter), reproducible on resume.
pub fn update_seed(run_seed: u64, step: u64, param_index: u64) -> u64 {
    mix(mix(run_seed ^ mix(step.wrapping_add(1))).wrapping_add(param_index.wrapping_mul(GAMMA)))
}

/// Stochastically rounds an f32 tensor to bf16 where it lives: on the CPU exactly as
/// [`stochastic_round_bf16`] (deterministic in `seed`); on another device with the device's
/// own ops and uniform numbers ([`round_on_device`]), a chunk at a time, so that a GPU
/// tensor does not make the round trip through host memory (`seed` is then unused: the
/// device's generator, `Device::set_seed`, supplies the randomness).
pub fn to_bf16_stochastic(x: &Tensor, seed: u64) -> Result<Tensor> {
    if x.device().is_cpu() {
        return stochastic_round_bf16(x, seed);
    }
    if x.dtype() != DType::F32 {
        return Err(Error::Input(format!(
            "stochastic rounding to bf16 takes an f32 tensor, got {:?}",
            x.dtype()
        )));
    }
    let out = Tensor::zeros(x.elem_count(), DType::BF16, x.device())?;
    let flat = x.flatten_all()?;
    for start in (0..x.elem_count()).step_by(DEVICE_CHUNK) {
        let len = DEVICE_CHUNK.min(x.elem_count() - start);
        out.slice_set(&round_on_device(&flat.narrow(0, start, len)?)?, 0, start)?;
    }
    Ok(out.reshape(x.shape())?)
}

/// `acc += g` for a bf16 accumulator `acc`: each element's sum is formed in f32 and rounded
/// to bf16 stochastically, so the accumulated sum is right in expectation however small
/// each addend is against the running sum. (Round-to-nearest drops an addend smaller than
/// half a bf16 spacing of the sum, 2^-9 of it: after one large micro-batch gradient, every
/// smaller one that follows can vanish.) `g` (f32 or bf16, any device layout) must have
/// `acc`'s shape.
///
/// On the CPU, in place and deterministic in `seed`; elsewhere a chunk at a time with the
/// device's ops ([`to_bf16_stochastic`]), written back in place when `acc` is contiguous.
pub fn add_stochastic_bf16(acc: &mut Tensor, g: &Tensor, seed: u64) -> Result<()> {
    if acc.dtype() != DType::BF16 {
        return Err(Error::Input(format!(
            "add_stochastic_bf16 takes a bf16 accumulator, got {:?}",
            acc.dtype()
        )));
    }
    if acc.dims() != g.dims() {
        return Err(Error::Input(format!(
            "gradient of shape {:?} added to {:?}",
            g.dims(),
            acc.dims()
        )));
    }
    if !acc.is_contiguous() {
        *acc = acc.contiguous()?;
    }
    let g = match g.dtype() {
        DType::F32 | DType::BF16 => g.contiguous()?,
        _ => g.to_dtype(DType::F32)?.contiguous()?,
    };
    if acc.device().is_cpu() {
        acc.inplace_op2(&g, &AddStochastic { stream: stream(seed) })?;
        return Ok(());
    }
    let (a, g) = (acc.flatten_all()?, g.flatten_all()?);
    for start in (0..a.elem_count()).step_by(DEVICE_CHUNK) {
        let len = DEVICE_CHUNK.min(a.elem_count() - start);
        let (ac, gc) = (a.narrow(0, start, len)?, g.narrow(0, start, len)?);
        let sum = (ac.to_dtype(DType::F32)? + gc.to_dtype(DType::F32)?)?;
        a.slice_set(&round_on_device(&sum)?, 0, start)?;
    }
    Ok(())
}

/// Elements per chunk of the device path: its ~10 f32 temporaries stay at ~160 MB whatever
/// the tensor (8B's embedding gradient is 525 M elements).
const DEVICE_CHUNK: usize = 1 << 22;

/// `acc = sr(acc + g)` in place over a contiguous bf16 CPU `acc`; `g` f32 or bf16.
struct AddStochastic {
    stream: u64,
}

impl candle_core::InplaceOp2 for AddStochastic {
    fn name(&self) -> &'static str {
        "dpo-add-stochastic-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        let (Some((a, b)), Some((c, d))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("stochastic add expects contiguous tensors");
        };
        let dst = match s1 {
            CpuStorage::BF16(v) => &mut v[a..b],
            _ => candle_core::bail!("stochastic add expects a bf16 destination"),
        };
        if d - c != dst.len() {
            candle_core::bail!("stochastic add: {} elements into {}", d - c, dst.len());
        }
        match s2 {
            CpuStorage::F32(v) => add_slice(dst, &v[c..d], self.stream, |x| x),
            CpuStorage::BF16(v) => add_slice(dst, &v[c..d], self.stream, bf16::to_f32),
            _ => candle_core::bail!("stochastic add expects an f32 or bf16 source"),
        }
        Ok(())
    }
}

/// `dst[i] = sr(dst[i] + f(src[i]))`, element `i` with the bits of index `i` of `stream`,
/// threaded over chunks (the result does not depend on the chunking).
fn add_slice<T: Copy + Sync>(
    dst: &mut [bf16],
    src: &[T],
    stream: u64,
    f: impl Fn(T) -> f32 + Sync,
) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).enumerate().for_each(|(k, (d, s))| {
        for (j, (d, &s)) in d.iter_mut().zip(s).enumerate() {
            *d = stochastic_round_one(d.to_f32() + f(s), bits(stream, k * CHUNK + j));
        }
    });
}

/// Stochastic rounding of an f32 tensor to bf16 out of candle ops only, for devices without
/// our CPU kernel. Let `n` be the nearest bf16 and `d = x − n` (exact in f32). The neighbour
/// on `d`'s side is `m = n ± s`; rounding to `m` with probability `|d| / s` keeps `x` in
/// expectation. The spacing `s` comes from round-to-nearest too: `|n|·(1 ± (2^-8 + 2^-16))`
/// lies strictly between `|n|`'s neighbour and the half-way point (an 8-bit significand
/// moves by 0.502 to 0.99998 of a spacing), also where the spacing below a power of two
/// halves. Below bf16's normal range the spacing is the subnormal one, 2^-133. NaN and ±inf
/// stay as they are.
pub fn round_on_device(x: &Tensor) -> Result<Tensor> {
    let bf = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
    };
    let n = bf(x)?;
    let d = (x - &n)?;
    let a = n.abs()?;
    let k = 2f64.powi(-8) + 2f64.powi(-16);
    let away = (bf(&a.affine(1.0 + k, 0.0)?)? - &a)?;
    let toward = (&a - bf(&a.affine(1.0 - k, 0.0)?)?)?;
    // Compared as signs, not as d·n ≥ 0, which underflows for tiny values.
    let same_side = d.ge(0.0)?.eq(&n.ge(0.0)?)?;
    let spacing = same_side.where_cond(&away, &toward)?.maximum(2f64.powi(-133))?;
    let p = (d.abs()? / &spacing)?;
    let up = x.rand_like(0.0, 1.0)?.lt(&p)?;
    let step = d.ge(0.0)?.where_cond(&spacing, &spacing.neg()?)?;
    // `where_cond` rather than `n + up·step`: a NaN step (x = ±inf) must not reach n.
    Ok(up.where_cond(&(&n + step)?, &n)?.to_dtype(DType::BF16)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;

    fn bf16_tensor(v: f32, n: usize) -> Tensor {
        Tensor::full(v, n, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap()
    }

    fn mean_f64(t: &Tensor) -> f64 {
        let v = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
    }

    /// The two bf16 neighbours of `x` (toward and away from zero) and their spacing.
    fn neighbours(x: f32) -> (f32, f32, f64) {
        let lo = f32::from_bits(x.to_bits() & 0xFFFF_0000);
        let hi = f32::from_bits((x.to_bits() & 0xFFFF_0000) + 0x1_0000);
        (lo, hi, (hi as f64 - lo as f64).abs())
    }

    /// The bf16 policy's case: 10,000 updates of 1e-6 to 0.01 must move the mean by 1e-2,
    /// while round-to-nearest leaves every weight where it was.
    #[test]
    fn small_updates_accumulate_in_expectation_but_not_with_round_to_nearest() {
        const N: usize = 4096;
        const STEPS: u64 = 10_000;
        let u = 1e-6f32;
        let start = bf16_tensor(0.01, N);
        let p0 = mean_f64(&start);
        let update = Tensor::full(u, N, &Device::Cpu).unwrap();

        let mut sr = start.clone();
        let mut rtn = start.clone();
        for step in 0..STEPS {
            sr = apply_update_bf16(&sr, &update, update_seed(7, step, 0)).unwrap();
            rtn = (rtn.to_dtype(DType::F32).unwrap() + &update)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
        }
        assert_eq!(mean_f64(&rtn), p0, "round-to-nearest was expected to discard every update");

        let expected = STEPS as f64 * u as f64;
        let moved = mean_f64(&sr) - p0;
        // Each weight is p0 + Σu + Σe_k with e_k the rounding error of step k: martingale
        // differences with E[e_k²] ≤ ulp²/4, ulp ≤ 2^-13 on [0.0078, 0.031). So the mean of N
        // independent weights has sd ≤ sqrt(STEPS/4)·2^-13/sqrt(N). Forming p + u in f32
        // first is off by at most half an f32 ulp (2^-30 here) per step, deterministically.
        let sd = (STEPS as f64 / 4.0).sqrt() * 2f64.powi(-13) / (N as f64).sqrt();
        let f32_bias = STEPS as f64 * 2f64.powi(-30);
        let tol = 5.0 * sd + f32_bias;
        eprintln!(
            "SR: moved {moved:.6e}, expected {expected:.6e}, diff {:.3e}, tol {tol:.3e} \
             (5σ = {:.3e}); RTN moved 0",
            moved - expected,
            5.0 * sd
        );
        assert!((moved - expected).abs() < tol, "moved {moved}, expected {expected} ± {tol}");
    }

    /// E[sr(x)] = x for random x across magnitudes and signs.
    #[test]
    fn stochastic_rounding_is_unbiased() {
        const N: usize = 2048;
        const K: u64 = 256;
        let mut rng = SplitMix64::new(42);
        let xs: Vec<f32> = (0..N)
            .map(|_| {
                let mant = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                let exp = rng.below(40) as i32 - 30;
                (mant * 2f64.powi(exp)) as f32
            })
            .collect();
        let x = Tensor::from_vec(xs.clone(), N, &Device::Cpu).unwrap();
        let mut sums = vec![0f64; N];
        for k in 0..K {
            let r = stochastic_round_bf16(&x, 1000 + k).unwrap();
            let r = r.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            for (i, (&ri, &xi)) in r.iter().zip(&xs).enumerate() {
                let (lo, hi, _) = neighbours(xi);
                assert!(ri == lo || ri == hi, "{xi} rounded to {ri}, not to {lo} or {hi}");
                sums[i] += ri as f64;
            }
        }
        // Aggregate: Σ_i (mean_i − x_i)/ulp_i has variance Σ f_i(1−f_i)/K.
        let (mut z, mut var) = (0f64, 0f64);
        let mut worst = 0f64;
        for (i, &xi) in xs.iter().enumerate() {
            let (lo, _, ulp) = neighbours(xi);
            let f = (xi as f64 - lo as f64).abs() / ulp;
            let err = (sums[i] / K as f64 - xi as f64) / ulp;
            z += err * xi.signum() as f64;
            var += f * (1.0 - f) / K as f64;
            worst = f64::max(worst, err.abs());
        }
        eprintln!(
            "unbiasedness: Σ err/ulp = {z:.4}, sd {:.4}; worst element {worst:.3} ulp",
            var.sqrt()
        );
        assert!(z.abs() < 5.0 * var.sqrt(), "bias: Σ err/ulp = {z}, sd {}", var.sqrt());
        // Per element, Hoeffding: P(|mean − E| > 0.25 ulp) ≤ 2·exp(−2·K·0.0625) ≈ 2e-14.
        assert!(worst < 0.25, "an element's mean is {worst} ulp from its value");
    }

    #[test]
    fn representable_values_and_specials_are_unchanged() {
        let exact: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -2.5,
            0.009_765_625,
            f32::from_bits(0x0001_0000), // smallest bf16 subnormal
            f32::from_bits(0x7F7F_0000), // largest finite bf16
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        let t = Tensor::from_vec(exact.clone(), exact.len(), &Device::Cpu).unwrap();
        for seed in 0..64 {
            let r = stochastic_round_bf16(&t, seed).unwrap().to_vec1::<bf16>().unwrap();
            for (a, b) in exact.iter().zip(&r) {
                assert_eq!(a.to_bits() >> 16, b.to_bits() as u32, "{a} became {b}");
            }
        }
        for nan in [f32::NAN, f32::from_bits(0x7F80_0001), f32::from_bits(0xFF80_0001)] {
            for r in 0..=u16::MAX {
                assert!(stochastic_round_one(nan, r).is_nan());
            }
        }
    }

    #[test]
    fn deterministic_in_the_seed_and_independent_of_threading() {
        let mut rng = SplitMix64::new(3);
        let xs: Vec<f32> = (0..200_000).map(|_| (rng.next_u64() as f32) * 1e-20).collect();
        let a = stochastic_round_slice(&xs, 5);
        let b = stochastic_round_slice(&xs, 5);
        let c = stochastic_round_slice(&xs, 6);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // The single-threaded path gives the same bits as the threaded one.
        let mut single = vec![bf16::ZERO; xs.len()];
        round_slice(&xs, &mut single, 0, stream(5));
        assert_eq!(a, single);
    }

    #[test]
    fn wrong_dtypes_and_shapes_are_errors() {
        let p = bf16_tensor(1.0, 4);
        let f = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        assert!(stochastic_round_bf16(&p, 0).is_err());
        assert!(apply_update_bf16(&f, &f, 0).is_err());
        let wrong = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
        assert!(apply_update_bf16(&p, &wrong, 0).unwrap_err().to_string().contains("shape"));
        assert_eq!(apply_update_bf16(&p, &f, 0).unwrap().dims(), [4]);
    }

    /// A bf16 sum of one large addend and many small ones: round-to-nearest drops every small
    /// one, the stochastic add keeps them in expectation (and in place).
    #[test]
    fn stochastic_add_keeps_addends_that_round_to_nearest_drops() {
        const N: usize = 8192;
        let mut acc = Tensor::zeros(N, DType::BF16, &Device::Cpu).unwrap();
        let alias = acc.clone();
        let mut rtn = Tensor::zeros(N, DType::BF16, &Device::Cpu).unwrap();
        let big = Tensor::full(1.0f32, N, &Device::Cpu).unwrap();
        let small = Tensor::full(1e-3f32, N, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
        let small_f32 = small.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        add_stochastic_bf16(&mut acc, &big, 1).unwrap();
        rtn = (rtn.to_dtype(DType::F32).unwrap() + &big).unwrap().to_dtype(DType::BF16).unwrap();
        for k in 0..63 {
            add_stochastic_bf16(&mut acc, &small, 100 + k).unwrap();
            rtn = (rtn.to_dtype(DType::F32).unwrap() + small.to_dtype(DType::F32).unwrap())
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
        }
        let exact = 1.0 + 63.0 * small_f32;
        assert_eq!(mean_f64(&rtn), 1.0, "premise: round-to-nearest drops 1e-3 next to 1.0");
        // Per element: 63 rounding errors, each a martingale difference of at most one
        // spacing (2^-7 on [1, 2)): the mean of N has sd ≤ sqrt(63 / 4) · 2^-7 / sqrt(N).
        let sd = (63.0f64 / 4.0).sqrt() * 2f64.powi(-7) / (N as f64).sqrt();
        let got = mean_f64(&acc);
        assert!((got - exact).abs() < 5.0 * sd, "sum {got}, exact {exact}, 5σ {}", 5.0 * sd);
        assert_eq!(mean_f64(&alias), got, "the add is in place");
        // Deterministic in the seeds.
        let mut again = Tensor::zeros(N, DType::BF16, &Device::Cpu).unwrap();
        add_stochastic_bf16(&mut again, &big, 1).unwrap();
        for k in 0..63 {
            add_stochastic_bf16(&mut again, &small.to_dtype(DType::F32).unwrap(), 100 + k).unwrap();
        }
        assert_eq!(again.to_vec1::<bf16>().unwrap(), acc.to_vec1::<bf16>().unwrap());
    }

    #[test]
    fn stochastic_add_takes_views_and_refuses_mismatches() {
        let base = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        let mut acc = base.to_dtype(DType::BF16).unwrap().t().unwrap(); // not contiguous
        let g = Tensor::ones((4, 3), DType::F32, &Device::Cpu).unwrap();
        add_stochastic_bf16(&mut acc, &g, 0).unwrap();
        let want = (base.t().unwrap() + 1.0).unwrap();
        let got = acc.to_dtype(DType::F32).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
        assert!(add_stochastic_bf16(
            &mut acc,
            &Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
            0
        )
        .unwrap_err()
        .to_string()
        .contains("shape"));
        let mut f = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let g = f.clone();
        assert!(add_stochastic_bf16(&mut f, &g, 0).is_err());
    }

    /// The device path (candle ops, run here on the CPU) rounds every value to one of its two
    /// bf16 neighbours, without bias, across magnitudes, signs, powers of two (where the
    /// spacing below is half the spacing above) and subnormals.
    #[test]
    fn device_rounding_picks_a_neighbour_without_bias() {
        const K: usize = 256;
        let mut rng = SplitMix64::new(11);
        let mut xs: Vec<f32> = (0..1500)
            .map(|_| {
                let mant = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
                let exp = rng.below(60) as i32 - 40;
                (mant * 2f64.powi(exp)) as f32
            })
            .collect();
        // Just below and above powers of two, and values in bf16's subnormal range.
        for e in [-20, -1, 0, 3, 30] {
            let p = 2f32.powi(e);
            for f in [1.0 - 3e-4, 1.0 - 1e-3, 1.0 + 1e-3, 1.0 + 5e-3] {
                xs.push(p * f);
                xs.push(-p * f);
            }
        }
        for m in [0.3f32, 1.7, 77.2, 200.9] {
            xs.push(m * 2f32.powi(-133));
        }
        let n = xs.len();
        let x = Tensor::from_vec(xs.clone(), n, &Device::Cpu).unwrap();
        let mut sums = vec![0f64; n];
        for _ in 0..K {
            let r = round_on_device(&x).unwrap();
            assert_eq!(r.dtype(), DType::BF16);
            let r = r.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            for (i, (&ri, &xi)) in r.iter().zip(&xs).enumerate() {
                let (lo, hi, _) = neighbours(xi);
                assert!(ri == lo || ri == hi, "{xi:e} rounded to {ri:e}, not {lo:e} or {hi:e}");
                sums[i] += ri as f64;
            }
        }
        let (mut z, mut var) = (0f64, 0f64);
        for (i, &xi) in xs.iter().enumerate() {
            let (lo, _, ulp) = neighbours(xi);
            let f = (xi as f64 - lo as f64).abs() / ulp;
            z += (sums[i] / K as f64 - xi as f64) / ulp * xi.signum() as f64;
            var += f * (1.0 - f) / K as f64;
        }
        assert!(z.abs() < 5.0 * var.sqrt(), "bias: Σ err/ulp = {z}, sd {}", var.sqrt());
        // Representable values and specials are kept.
        let exact = [0.0f32, -0.0, 1.0, -2.5, 2f32.powi(-133), f32::INFINITY, f32::NEG_INFINITY];
        let t = Tensor::new(&exact, &Device::Cpu).unwrap();
        let r = round_on_device(&t).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>();
        assert_eq!(r.unwrap(), exact);
        let nan = Tensor::new(&[f32::NAN], &Device::Cpu).unwrap();
        let r = round_on_device(&nan).unwrap().to_dtype(DType::F32).unwrap();
        assert!(r.to_vec1::<f32>().unwrap()[0].is_nan());
    }

    #[test]
    fn to_bf16_stochastic_on_the_cpu_is_the_deterministic_rounding() {
        let x = Tensor::new(&[0.1f32, -3.3, 1e-5], &Device::Cpu).unwrap();
        let a = to_bf16_stochastic(&x, 9).unwrap().to_vec1::<bf16>().unwrap();
        assert_eq!(a, stochastic_round_bf16(&x, 9).unwrap().to_vec1::<bf16>().unwrap());
    }
}
