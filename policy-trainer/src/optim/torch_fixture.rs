//! RMSprop against PyTorch: replays the parameters and gradients of
//! `tests/fixtures/rmsprop_fixture.json` (written by `tests/fixtures/make_rmsprop_fixture.py`
//! with `torch.optim.RMSprop`) and compares every step's parameters.

use super::{GradAccumulator, RmsProp, RmsPropConfig};
use candle_core::{Device, Tensor, Var};
use serde_json::Value;

/// Flattened f32 values and shape of a nested JSON array.
fn flatten(v: &Value) -> (Vec<f32>, Vec<usize>) {
    match v {
        Value::Array(items) => {
            let mut data = Vec::new();
            let mut inner = Vec::new();
            for item in items {
                let (d, s) = flatten(item);
                data.extend(d);
                inner = s;
            }
            let mut shape = vec![items.len()];
            shape.extend(inner);
            (data, shape)
        }
        Value::Number(n) => (vec![n.as_f64().expect("number") as f32], vec![]),
        other => panic!("unexpected JSON value {other}"),
    }
}

#[test]
fn rmsprop_matches_torch() {
    let text = include_str!("../../tests/fixtures/rmsprop_fixture.json");
    let fixture: Value = serde_json::from_str(text).expect("fixture JSON");
    let cases = fixture["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 2);
    for (c, case) in cases.iter().enumerate() {
        let cfg = &case["config"];
        let cfg = RmsPropConfig {
            lr: cfg["lr"].as_f64().unwrap(),
            alpha: cfg["alpha"].as_f64().unwrap(),
            eps: cfg["eps"].as_f64().unwrap(),
            weight_decay: cfg["weight_decay"].as_f64().unwrap(),
            ..RmsPropConfig::default()
        };
        let vars: Vec<Var> = case["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let (data, shape) = flatten(p);
                Var::from_vec(data, shape, &Device::Cpu).unwrap()
            })
            .collect();
        let mut opt = RmsProp::new(&vars, cfg).unwrap();
        let steps = case["grads"].as_array().unwrap();
        for (s, (step_grads, expected)) in
            steps.iter().zip(case["expected"].as_array().unwrap()).enumerate()
        {
            // loss = Σ g·p has gradient exactly g.
            let mut acc = GradAccumulator::new(&vars, candle_core::DType::F32).unwrap();
            let mut loss = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu).unwrap();
            for (v, g) in vars.iter().zip(step_grads.as_array().unwrap()) {
                let (data, shape) = flatten(g);
                let g = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
                loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
            }
            acc.add(&loss.backward().unwrap()).unwrap();
            opt.step(&acc).unwrap();
            for (i, (v, want)) in vars.iter().zip(expected.as_array().unwrap()).enumerate() {
                let got = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let (want, _) = flatten(want);
                for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-6 * w.abs().max(1e-3);
                    assert!(
                        (g - w).abs() <= tol,
                        "case {c} step {s} param {i}[{k}]: ours {g}, torch {w}"
                    );
                }
            }
        }
    }
}
