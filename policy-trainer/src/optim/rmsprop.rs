//! RMSprop exactly as `torch.optim.RMSprop` computes it with `momentum=0, centered=False`
//! (the DPO recipe's optimizer):
//!
//! ```text
//! g  = grad + weight_decay · p
//! v  = α · v + (1 − α) · g²
//! p  = p − lr · g / (sqrt(v) + eps)
//! ```
//!
//! The square averages `v` are f32 by default whatever the parameters' dtype, or bf16
//! (`--optim-state-dtype bf16`, half the memory). Either way each update is computed in f32
//! (a bf16 `v` is read in f32, updated, and the new average both divides this step's
//! gradient and is stored back, rounded stochastically: `v` moves by 1% of the gap to g² per
//! step, which round-to-nearest at 8 bits would often drop, leaving `v` stuck). The update
//! is written back in the parameter's dtype: bf16 parameters are rounded stochastically
//! (`dpo_common::sround`), since at lr 1e-6 round-to-nearest would discard every update.
//! The state serializes to safetensors (`square_avg.{i}` per parameter in the state's dtype,
//! the step count in the metadata) for `--resume`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, Var};
use dpo_common::sround::{apply_update_bf16, to_bf16_stochastic, update_seed};
use safetensors::{Dtype, SafeTensors};

use super::config::RmsPropConfig;
use super::GradAccumulator;

/// Format tag in the saved state's metadata, so a file of another kind is refused clearly.
const FORMAT: &str = "rmsprop-v1";

/// Mixed into the rounding seed of a bf16 state, so that its rounding is independent of the
/// parameters' (same step and index).
const STATE_ROUNDING: u64 = 0x5EED_57A7_E000_0001;

pub struct RmsProp {
    vars: Vec<Var>,
    /// Per parameter, same shape, in `cfg.state_dtype`.
    square_avg: Vec<Tensor>,
    steps: u64,
    cfg: RmsPropConfig,
}

impl RmsProp {
    /// An optimizer over `vars` (cloned handles: the same storage the model reads).
    pub fn new(vars: &[Var], cfg: RmsPropConfig) -> Result<Self> {
        cfg.validate()?;
        let square_avg = vars
            .iter()
            .map(|v| Tensor::zeros(v.shape(), cfg.state_dtype, v.device()))
            .collect::<candle_core::Result<Vec<_>>>()
            .context("allocating the RMSprop state")?;
        Ok(RmsProp { vars: vars.to_vec(), square_avg, steps: 0, cfg })
    }

    pub fn config(&self) -> &RmsPropConfig {
        &self.cfg
    }

    /// Optimizer steps taken (restored by [`load`](Self::load)).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update from the accumulated gradients (used as they are: scale them to a mean
    /// before). The accumulator must have been made for these same parameters.
    pub fn step(&mut self, grads: &GradAccumulator) -> Result<()> {
        ensure!(
            grads.ids().len() == self.vars.len()
                && grads.ids().iter().zip(&self.vars).all(|(id, v)| *id == v.id()),
            "RMSprop: the gradient accumulator was made for other parameters ({} tensors, the \
             optimizer has {})",
            grads.ids().len(),
            self.vars.len()
        );
        ensure!(grads.count() > 0, "RMSprop: no gradients were accumulated since the last step");
        let (alpha, cfg) = (self.cfg.alpha, self.cfg);
        for (i, ((var, v), g)) in
            self.vars.iter().zip(&mut self.square_avg).zip(grads.grads()).enumerate()
        {
            // bf16 sums are read in f32 (an f32 tensor is returned as it is).
            let g = g.to_dtype(DType::F32)?;
            if super::fused::applies(var.as_tensor(), v, &g) {
                // f32 weights and state on a CPU: in place, no parameter-sized temporaries
                // (same arithmetic).
                super::fused::step(var.as_tensor(), v, &g, &cfg)
                    .with_context(|| format!("RMSprop: updating parameter {i}"))?;
                continue;
            }
            let p = var.as_tensor().detach().to_dtype(DType::F32)?;
            let g =
                if cfg.weight_decay != 0.0 { (g + p.affine(cfg.weight_decay, 0.0)?)? } else { g };
            let g = g.detach();
            // A bf16 `v` is read in f32 for this expression only (as few parameter-sized f32
            // tensors alive at once as with f32 state).
            let new_v = (v.to_dtype(DType::F32)?.affine(alpha, 0.0)?
                + g.sqr()?.affine(1.0 - alpha, 0.0)?)?
            .detach();
            let avg = (new_v.sqrt()? + cfg.eps)?;
            let update = (g / avg)?.affine(-cfg.lr, 0.0)?;
            *v = match cfg.state_dtype {
                // This step used the f32 average; the stored one is rounded stochastically
                // (round-to-nearest would drop every move of v under half a spacing, i.e.
                // whenever g² is within 20-40% of v, and v would stop following g²).
                DType::BF16 => {
                    let seed =
                        update_seed(cfg.rounding_seed ^ STATE_ROUNDING, self.steps, i as u64);
                    to_bf16_stochastic(&new_v, seed)?
                }
                _ => new_v,
            };
            let new = match var.dtype() {
                // Round-to-nearest would drop every update smaller than half a bf16 spacing
                // (at lr 1e-6 that is all of them): round stochastically, unbiased.
                DType::BF16 => apply_update_bf16(
                    var.as_tensor(),
                    &update,
                    update_seed(cfg.rounding_seed, self.steps, i as u64),
                )?,
                dtype => (p + update)?.to_dtype(dtype)?,
            };
            var.set(&new).with_context(|| format!("RMSprop: updating parameter {i}"))?;
        }
        self.steps += 1;
        Ok(())
    }

    /// The state as safetensors tensors (`square_avg.{i}` per parameter, in the state's
    /// dtype) and metadata (the step count).
    fn safetensors_parts(&self) -> (Vec<(String, &Tensor)>, HashMap<String, String>) {
        let tensors = self
            .square_avg
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("square_avg.{i}"), t))
            .collect();
        let metadata = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("step".to_string(), self.steps.to_string()),
            ("parameters".to_string(), self.vars.len().to_string()),
        ]);
        (tensors, metadata)
    }

    /// The state as a safetensors file in memory (what [`save`](Self::save) writes): as
    /// large as the parameters in the state's dtype. For tests and small models.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let (tensors, metadata) = self.safetensors_parts();
        Ok(safetensors::serialize(tensors, Some(metadata))?)
    }

    /// Writes the state as a safetensors file at `path` (the file
    /// [`to_bytes`](Self::to_bytes) returns) and flushes it to disk. One tensor at a time is copied
    /// out: building the whole file in memory first would add twice the state's size to the
    /// trainer's peak (the bytes of every tensor, then the file), at the end of a step when
    /// weights, gradient sums and state are all resident.
    pub fn save(&self, path: &Path) -> Result<()> {
        let (tensors, metadata) = self.safetensors_parts();
        safetensors::serialize_to_file(tensors, Some(metadata), path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::fs::File::open(path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {}", path.display()))
    }

    /// Restores the state saved by [`to_bytes`](Self::to_bytes) from a file.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        self.load_bytes(&bytes).with_context(|| format!("in {}", path.display()))
    }

    /// Restores the state saved by [`to_bytes`](Self::to_bytes). Every tensor's shape must
    /// match its parameter and its dtype this optimizer's state dtype: a state saved in
    /// another dtype is refused, not converted (a resumed run replays the uninterrupted one
    /// only with the same `--optim-state-dtype`). On any error the current state is left
    /// unchanged.
    pub fn load_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let st = SafeTensors::deserialize(bytes).context("not a safetensors optimizer state")?;
        let (_, header) = SafeTensors::read_metadata(bytes)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let format = meta.get("format").map(String::as_str).unwrap_or("none");
        ensure!(format == FORMAT, "optimizer state has format {format:?}, expected {FORMAT:?}");
        let steps: u64 = meta
            .get("step")
            .context("optimizer state has no step count")?
            .parse()
            .context("optimizer state has an invalid step count")?;
        ensure!(
            st.len() == self.vars.len(),
            "optimizer state holds {} parameters, the model has {}",
            st.len(),
            self.vars.len()
        );
        let mut square_avg = Vec::with_capacity(self.vars.len());
        for (i, var) in self.vars.iter().enumerate() {
            let name = format!("square_avg.{i}");
            let view =
                st.tensor(&name).with_context(|| format!("optimizer state has no {name}"))?;
            ensure!(
                view.shape() == var.dims(),
                "optimizer state for parameter {i} has shape {:?}, the parameter has {:?}",
                view.shape(),
                var.dims()
            );
            let want = st_dtype(self.cfg.state_dtype)?;
            if view.dtype() != want {
                bail!(
                    "optimizer state for parameter {i} is {:?}, this run keeps it in {want:?}: \
                     resume with the --optim-state-dtype the run was started with",
                    view.dtype()
                );
            }
            square_avg.push(Tensor::from_raw_buffer(
                view.data(),
                self.cfg.state_dtype,
                view.shape(),
                var.device(),
            )?);
        }
        self.square_avg = square_avg;
        self.steps = steps;
        Ok(())
    }
}

/// The safetensors dtype of a state dtype.
fn st_dtype(dtype: DType) -> Result<Dtype> {
    match dtype {
        DType::F32 => Ok(Dtype::F32),
        DType::BF16 => Ok(Dtype::BF16),
        other => bail!("RMSprop: no saved form for a {other:?} state"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn params() -> Vec<Var> {
        vec![
            Var::from_vec(vec![0.5f32, -1.0, 2.0, 0.0], (2, 2), &Device::Cpu).unwrap(),
            Var::from_vec(vec![3.0f32, -0.25], 2, &Device::Cpu).unwrap(),
        ]
    }

    /// Accumulates the gradient of Σ c·p² (grad 2c·p) for a step-dependent c.
    fn grads(vars: &[Var], step: usize) -> GradAccumulator {
        let mut acc = GradAccumulator::new(vars, DType::F32).unwrap();
        let c = 1.0 + step as f64 * 0.5;
        let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        for v in vars {
            let v = v.as_tensor().to_dtype(DType::F32).unwrap();
            loss = (loss + v.sqr().unwrap().sum_all().unwrap().affine(c, 0.0).unwrap()).unwrap();
        }
        acc.add(&loss.backward().unwrap()).unwrap();
        acc
    }

    /// Two safetensors files hold the same tensors (names, dtypes, shapes, bytes) and
    /// metadata (whose order in the header follows a `HashMap`'s, so it differs per call).
    fn assert_same_file(a: &[u8], b: &[u8]) {
        let (sa, sb) = (SafeTensors::deserialize(a).unwrap(), SafeTensors::deserialize(b).unwrap());
        let mut names = sa.names();
        names.sort();
        let mut names_b = sb.names();
        names_b.sort();
        assert_eq!(names, names_b);
        for name in names {
            let (ta, tb) = (sa.tensor(name).unwrap(), sb.tensor(name).unwrap());
            assert_eq!((ta.dtype(), ta.shape(), ta.data()), (tb.dtype(), tb.shape(), tb.data()));
        }
        let meta = |x: &[u8]| SafeTensors::read_metadata(x).unwrap().1.metadata().clone();
        assert_eq!(meta(a), meta(b));
    }

    fn values(vars: &[Var]) -> Vec<f32> {
        vars.iter()
            .flat_map(|v| {
                let t = v.as_tensor().to_dtype(DType::F32).unwrap();
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect()
    }

    #[test]
    fn first_step_matches_the_formula() {
        let vars = params();
        let cfg = RmsPropConfig { lr: 0.01, ..Default::default() };
        let mut opt = RmsProp::new(&vars, cfg).unwrap();
        let before = values(&vars);
        opt.step(&grads(&vars, 0)).unwrap();
        for (p0, p1) in before.iter().zip(values(&vars)) {
            let g = 2.0 * *p0 as f64;
            let v = 0.01 * g * g;
            let expected = *p0 as f64 - 0.01 * g / (v.sqrt() + 1e-8);
            assert!((p1 as f64 - expected).abs() < 1e-6, "{p1} vs {expected}");
        }
        assert_eq!(opt.steps(), 1);
    }

    #[test]
    fn bf16_parameters_keep_the_expected_update_at_tiny_learning_rates() {
        // 4096 weights at 0.01 (bf16 spacing there: 6.1e-5) under lr 1e-6 with a constant
        // gradient: after 300 steps the f32 run has moved each weight by ~3.3e-4. The bf16 run
        // must move the mean by the same (stochastic rounding), not stay put (round-to-nearest).
        let n = 4096;
        let run = |dtype: DType| -> f64 {
            let p = Tensor::full(0.01f32, n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let var = Var::from_tensor(&p).unwrap();
            let mean = |v: &Var| {
                let t = v.as_tensor().to_dtype(DType::F64).unwrap();
                t.mean_all().unwrap().to_scalar::<f64>().unwrap()
            };
            let start = mean(&var);
            let vars = [var.clone()];
            let cfg = RmsPropConfig { lr: 1e-6, rounding_seed: 3, ..Default::default() };
            let mut opt = RmsProp::new(&vars, cfg).unwrap();
            let mut acc = GradAccumulator::new(&vars, DType::F32).unwrap();
            for _ in 0..300 {
                acc.zero().unwrap();
                let loss = var.as_tensor().to_dtype(DType::F32).unwrap().sum_all().unwrap();
                acc.add(&loss.backward().unwrap()).unwrap();
                opt.step(&acc).unwrap();
            }
            start - mean(&var)
        };
        let moved_f32 = run(DType::F32);
        let moved_bf16 = run(DType::BF16);
        assert!(moved_f32 > 3e-4, "f32 moved {moved_f32}");
        // Each weight's rounding error is at most one spacing (6.1e-5) per step, independent
        // across weights: the mean's standard deviation is far below 1% of the move.
        assert!(
            (moved_bf16 - moved_f32).abs() < 0.05 * moved_f32,
            "bf16 moved {moved_bf16}, f32 {moved_f32}"
        );
    }

    /// A toy problem (loss Σ c·p², c spread over two decades, 4096 f32 weights) for 60
    /// steps at lr 1e-2, with the RMSprop state in f32 and in bf16: the weights follow the
    /// same trajectory to a small fraction of how far they move, and the stored averages
    /// agree without bias.
    #[test]
    fn bf16_state_tracks_f32_state() {
        const N: usize = 4096;
        let c: Vec<f32> = (0..N).map(|i| 10f32.powf((i % 97) as f32 / 48.0 - 1.0)).collect();
        let p0: Vec<f32> = (0..N).map(|i| ((i * 37 % 101) as f32 + 0.5) / 50.0 - 1.0).collect();
        let c = Tensor::new(c, &Device::Cpu).unwrap();
        let run = |state_dtype: DType| {
            let var = Var::new(p0.as_slice(), &Device::Cpu).unwrap();
            let vars = [var.clone()];
            let cfg =
                RmsPropConfig { lr: 1e-2, state_dtype, rounding_seed: 5, ..Default::default() };
            let mut opt = RmsProp::new(&vars, cfg).unwrap();
            for _ in 0..60 {
                let mut acc = GradAccumulator::new(&vars, DType::F32).unwrap();
                let loss = (var.as_tensor().sqr().unwrap() * &c).unwrap().sum_all().unwrap();
                acc.add(&loss.backward().unwrap()).unwrap();
                opt.step(&acc).unwrap();
            }
            assert_eq!(opt.square_avg[0].dtype(), state_dtype);
            let v = opt.square_avg[0].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            (values(&vars), v)
        };
        let (p32, v32) = run(DType::F32);
        let (p16, v16) = run(DType::BF16);
        let moved: f64 = p32.iter().zip(&p0).map(|(a, b)| (a - b).abs() as f64).sum();
        let apart: f64 = p32.iter().zip(&p16).map(|(a, b)| (a - b).abs() as f64).sum();
        let worst = p32.iter().zip(&p16).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!(
            "weights: moved {moved:.3e} in all, bf16 state apart by {apart:.3e}, worst {worst:.2e}"
        );
        assert!(apart < 1e-3 * moved, "bf16 state drifted: {apart} vs a move of {moved}");
        assert!(worst < 0.6e-2, "a weight drifted by {worst} (lr 1e-2 moves it ≤ ~0.1 a step)");
        // The averages differ by rounding noise (bf16 spacing: 2^-8 relative) and, where a
        // weight oscillates around 0 (lr 1e-2 against |p| of ~1e-2), by the different
        // gradients of slightly different weights (measured: rms 1.8%); but not by a bias.
        let rels: Vec<f64> = v32.iter().zip(&v16).map(|(a, b)| ((b - a) / a) as f64).collect();
        let bias = rels.iter().sum::<f64>() / N as f64;
        let rms = (rels.iter().map(|r| r * r).sum::<f64>() / N as f64).sqrt();
        eprintln!("state: relative bias {bias:.2e}, rms {rms:.2e}");
        assert!(bias.abs() < 1e-3, "the bf16 state is biased by {bias}");
        assert!(rms < 5e-2, "the bf16 state is off by {rms} (rms, relative)");
    }

    /// Under a constant gradient v climbs toward g² by 1% of the gap per step: after a few
    /// hundred steps that move is under half a bf16 spacing, and a state rounded to nearest
    /// stops short. The stochastically rounded state keeps following, as f32 does.
    #[test]
    fn bf16_state_keeps_climbing_where_round_to_nearest_stalls() {
        const N: usize = 2048;
        const STEPS: usize = 500;
        let run = |state_dtype: DType| {
            let var = Var::zeros(N, DType::F32, &Device::Cpu).unwrap();
            let vars = [var.clone()];
            let cfg = RmsPropConfig { lr: 0.0, state_dtype, ..Default::default() };
            let mut opt = RmsProp::new(&vars, cfg).unwrap();
            let mut acc = GradAccumulator::new(&vars, DType::F32).unwrap();
            let loss = var.as_tensor().sum_all().unwrap(); // gradient 1 everywhere
            acc.add(&loss.backward().unwrap()).unwrap();
            for _ in 0..STEPS {
                opt.step(&acc).unwrap();
            }
            let v = opt.square_avg[0].to_dtype(DType::F64).unwrap();
            v.mean_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let (f32_v, bf16_v) = (run(DType::F32), run(DType::BF16));
        // The same recursion rounded to nearest.
        let mut rtn = half::bf16::ZERO;
        for _ in 0..STEPS {
            rtn = half::bf16::from_f32(rtn.to_f32() * 0.99 + 0.01);
        }
        let rtn = rtn.to_f64();
        eprintln!(
            "mean v after {STEPS} steps: f32 {f32_v:.5}, bf16 stochastic {bf16_v:.5}, \
             nearest {rtn:.5}"
        );
        assert!((f32_v - (1.0 - 0.99f64.powi(STEPS as i32))).abs() < 1e-4);
        assert!((bf16_v - f32_v).abs() < 2e-3, "stochastic {bf16_v} vs f32 {f32_v}");
        assert!(f32_v - rtn > 1e-2, "premise: nearest stalls ({rtn} vs {f32_v})");
    }

    /// bf16 parameters and bf16 state saved after 3 steps and loaded into a fresh optimizer
    /// continue exactly as the uninterrupted run (the roundings are seeded by step and
    /// parameter); the file holds BF16 tensors; an f32-state optimizer refuses it, and the
    /// other way round.
    #[test]
    fn bf16_state_saves_and_resumes_identically() {
        let cfg = RmsPropConfig {
            lr: 0.05,
            weight_decay: 0.1,
            state_dtype: DType::BF16,
            rounding_seed: 7,
            ..Default::default()
        };
        let bf = |vars: Vec<Var>| -> Vec<Var> {
            vars.iter()
                .map(|v| Var::from_tensor(&v.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap())
                .collect()
        };
        let a = bf(params());
        let mut opt_a = RmsProp::new(&a, cfg).unwrap();
        for s in 0..3 {
            opt_a.step(&grads(&a, s)).unwrap();
        }
        let saved = opt_a.to_bytes().unwrap();
        let dir = tempfile::tempdir().unwrap();
        opt_a.save(&dir.path().join("state")).unwrap();
        assert_same_file(&std::fs::read(dir.path().join("state")).unwrap(), &saved);
        let st = SafeTensors::deserialize(&saved).unwrap();
        assert_eq!(st.tensor("square_avg.0").unwrap().dtype(), Dtype::BF16);
        assert_eq!(st.tensor("square_avg.0").unwrap().data().len(), 4 * 2);
        let weights: Vec<Tensor> = a.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
        for s in 3..5 {
            opt_a.step(&grads(&a, s)).unwrap();
        }
        let b: Vec<Var> = weights.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let mut opt_b = RmsProp::new(&b, cfg).unwrap();
        opt_b.load_bytes(&saved).unwrap();
        assert_eq!(opt_b.steps(), 3);
        assert_eq!(opt_b.square_avg[1].dtype(), DType::BF16);
        for s in 3..5 {
            opt_b.step(&grads(&b, s)).unwrap();
        }
        assert_eq!(values(&a), values(&b));
        for (x, y) in opt_a.square_avg.iter().zip(&opt_b.square_avg) {
            let (x, y) = (x.to_dtype(DType::F32).unwrap(), y.to_dtype(DType::F32).unwrap());
            assert_eq!(
                x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
        // Another dtype is refused, naming the flag, and leaves the state as it was.
        let mut f32_state =
            RmsProp::new(&b, RmsPropConfig { state_dtype: DType::F32, ..cfg }).unwrap();
        let err = f32_state.load_bytes(&saved).unwrap_err().to_string();
        assert!(err.contains("BF16") && err.contains("--optim-state-dtype"), "{err}");
        assert_eq!(f32_state.steps(), 0);
        let f32_saved = f32_state.to_bytes().unwrap();
        let err = opt_b.load_bytes(&f32_saved).unwrap_err().to_string();
        assert!(err.contains("F32") && err.contains("--optim-state-dtype"), "{err}");
        assert_eq!(opt_b.steps(), 5);
        assert!(RmsProp::new(&b, RmsPropConfig { state_dtype: DType::F16, ..cfg }).is_err());
    }

    #[test]
    fn state_holds_values_not_the_graph() {
        let vars = params();
        let mut opt =
            RmsProp::new(&vars, RmsPropConfig { lr: 0.01, ..Default::default() }).unwrap();
        opt.step(&grads(&vars, 0)).unwrap();
        opt.step(&grads(&vars, 1)).unwrap();
        assert!(opt.square_avg.iter().all(|v| !v.track_op()));
    }

    #[test]
    fn saved_state_resumes_identically() {
        let cfg = RmsPropConfig { lr: 0.05, weight_decay: 0.1, ..Default::default() };
        // Run A: 3 steps, save, 2 more.
        let a = params();
        let mut opt_a = RmsProp::new(&a, cfg).unwrap();
        for s in 0..3 {
            opt_a.step(&grads(&a, s)).unwrap();
        }
        let saved = opt_a.to_bytes().unwrap();
        // The trainer's save streams the same file to disk.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        opt_a.save(&path).unwrap();
        assert_same_file(&std::fs::read(&path).unwrap(), &saved);
        let weights: Vec<Tensor> = a.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
        for s in 3..5 {
            opt_a.step(&grads(&a, s)).unwrap();
        }
        // Run B: fresh optimizer and the saved weights, state loaded from the file.
        let b: Vec<Var> = weights.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let mut opt_b = RmsProp::new(&b, cfg).unwrap();
        opt_b.load(&path).unwrap();
        assert_eq!(opt_b.steps(), 3);
        for s in 3..5 {
            opt_b.step(&grads(&b, s)).unwrap();
        }
        assert_eq!(values(&a), values(&b));
        // Without the state the trajectory differs (the test above is not vacuous).
        let c: Vec<Var> = weights.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let mut opt_c = RmsProp::new(&c, cfg).unwrap();
        opt_c.step(&grads(&c, 3)).unwrap();
        assert_ne!(values(&c), values(&b));
    }

    #[test]
    fn load_refuses_mismatched_state() {
        let vars = params();
        let opt = RmsProp::new(&vars, RmsPropConfig::default()).unwrap();
        let saved = opt.to_bytes().unwrap();
        let other = vec![
            Var::from_vec(vec![0.0f32; 6], (2, 3), &Device::Cpu).unwrap(),
            Var::from_vec(vec![0.0f32; 2], 2, &Device::Cpu).unwrap(),
        ];
        let mut opt2 = RmsProp::new(&other, RmsPropConfig::default()).unwrap();
        let err = opt2.load_bytes(&saved).unwrap_err();
        assert!(err.to_string().contains("parameter 0 has shape [2, 2]"), "{err}");
        let mut opt3 = RmsProp::new(&vars[..1], RmsPropConfig::default()).unwrap();
        let err = opt3.load_bytes(&saved).unwrap_err();
        assert!(err.to_string().contains("holds 2 parameters, the model has 1"), "{err}");
        assert!(opt3.load_bytes(b"garbage").is_err());
    }

    #[test]
    fn bf16_parameters_keep_their_dtype() {
        let v = Var::from_tensor(
            &Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap(),
        )
        .unwrap();
        let mut opt =
            RmsProp::new(std::slice::from_ref(&v), RmsPropConfig { lr: 0.1, ..Default::default() })
                .unwrap();
        let mut acc = GradAccumulator::new(std::slice::from_ref(&v), DType::F32).unwrap();
        let loss = v.as_tensor().to_dtype(DType::F32).unwrap().sum_all().unwrap();
        acc.add(&loss.backward().unwrap()).unwrap();
        opt.step(&acc).unwrap();
        assert_eq!(v.dtype(), DType::BF16);
        let p = v.as_tensor().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        // g = 1, v = 0.01, update = lr · 1/(0.1 + eps) ≈ 1.0 (up to f32/bf16 rounding).
        assert!(p[0].abs() < 1e-6 && p[1] == -3.0, "{p:?}");
    }

    #[test]
    fn invalid_config_and_empty_accumulator_are_errors() {
        let vars = params();
        assert!(RmsProp::new(&vars, RmsPropConfig { lr: -1.0, ..Default::default() }).is_err());
        assert!(RmsProp::new(&vars, RmsPropConfig { alpha: 1.5, ..Default::default() }).is_err());
        let mut opt = RmsProp::new(&vars, RmsPropConfig::default()).unwrap();
        let acc = GradAccumulator::new(&vars, DType::F32).unwrap();
        assert!(opt.step(&acc).unwrap_err().to_string().contains("no gradients"));
        let other = GradAccumulator::new(&params(), DType::F32).unwrap();
        assert!(opt.step(&other).unwrap_err().to_string().contains("other parameters"));
    }
}
