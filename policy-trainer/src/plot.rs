//! The training chart ([`CHART_FILE`] in the output directory), redrawn after every
//! evaluation from the metrics log ([`METRICS_FILE`](crate::metrics::METRICS_FILE)): validation reward and log-prob accuracy against steps
//! (best point marked) above, training and validation loss, named by its `--loss` (with its
//! step-0 value, where the policy is the reference: ln 2 for DPO), below.
//!
//! Text is drawn with a DejaVu Sans subset compiled into the binary (`assets/`), so the chart
//! renders the same on a machine without fontconfig or any system font.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::metrics::{read_metrics, EvalRecord, TrainRecord};

/// File name of the chart in the run's output directory.
pub const CHART_FILE: &str = "accuracy.png";

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 1000;
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");

const REWARD_COLOR: RGBColor = RGBColor(31, 119, 180);
const LOGP_COLOR: RGBColor = RGBColor(255, 127, 14);
const TRAIN_COLOR: RGBColor = RGBColor(150, 150, 150);
const TRAIN_SMOOTH_COLOR: RGBColor = RGBColor(44, 160, 44);
const EVAL_COLOR: RGBColor = RGBColor(214, 39, 40);
const GUIDE_COLOR: RGBColor = RGBColor(90, 90, 90);

/// Registers the embedded font as plotters' "sans-serif" once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    ok.then_some(()).ok_or_else(|| anyhow!("the embedded chart font could not be loaded"))
}

/// Reads `metrics` (a [`METRICS_FILE`](crate::metrics::METRICS_FILE)) and draws the chart to `png`.
pub fn render_from_file(metrics: &Path, png: &Path) -> Result<()> {
    let (train, eval) = read_metrics(metrics)?;
    render(&train, &eval, png)
}

/// Draws the chart to `png`, atomically (a temporary file in the same directory, then a
/// rename), so a viewer never sees half a picture.
pub fn render(train: &[TrainRecord], eval: &[EvalRecord], png: &Path) -> Result<()> {
    ensure_font()?;
    let name = png.file_name().context("chart path has no file name")?.to_string_lossy();
    // The bitmap backend picks the encoder from the extension: keep `.png` last.
    let tmp = png.with_file_name(format!(".{name}.tmp-{}.png", std::process::id()));
    let drawn = draw(train, eval, &tmp).and_then(|()| {
        std::fs::rename(&tmp, png).with_context(|| format!("renaming into {}", png.display()))
    });
    if drawn.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    drawn.with_context(|| format!("drawing {}", png.display()))
}

fn draw(train: &[TrainRecord], eval: &[EvalRecord], path: &Path) -> Result<()> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let examples =
        train.iter().map(|r| r.examples_seen).chain(eval.iter().map(|r| r.examples_seen)).max();
    // The loss in the title: `sigmoid` (the default, and older runs without a loss_type) is
    // DPO itself.
    let loss = train
        .iter()
        .map(|r| r.loss_type.as_str())
        .chain(eval.iter().map(|r| r.loss_type.as_str()))
        .find(|l| !l.is_empty() && *l != "sigmoid");
    let what = loss.map_or("DPO training".to_string(), |l| format!("Preference training, {l}"));
    let title = match examples {
        Some(n) => format!("{what} — {n} examples seen"),
        None => format!("{what} — no steps yet"),
    };
    let root = root.titled(&title, ("sans-serif", 30)).map_err(plot_err)?;
    let (top, bottom) = root.split_vertically(HEIGHT / 2 - 20);
    let last_step =
        train.iter().map(|r| r.step).chain(eval.iter().map(|r| r.step)).max().unwrap_or(0).max(1);
    let x_range = 0f64..last_step as f64 * 1.02;
    accuracy_panel(&top, eval, x_range.clone())?;
    loss_panel(&bottom, train, eval, x_range)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn accuracy_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    eval: &[EvalRecord],
    x_range: std::ops::Range<f64>,
) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption("Validation accuracy", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range.clone(), 0f64..1.0)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("accuracy")
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(plot_err)?;
    // Chance level.
    chart
        .draw_series(DashedLineSeries::new(
            [(x_range.start, 0.5), (x_range.end, 0.5)],
            8,
            6,
            GUIDE_COLOR.stroke_width(1),
        ))
        .map_err(plot_err)?
        .label("chance (0.5)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GUIDE_COLOR));

    let reward: Vec<(f64, f64)> =
        finite(eval.iter().map(|r| (r.step as f64, r.result.reward_accuracy)));
    let logp: Vec<(f64, f64)> =
        finite(eval.iter().map(|r| (r.step as f64, r.result.logp_accuracy)));
    for (points, color, label) in [
        (&reward, REWARD_COLOR, "implicit-reward accuracy"),
        (&logp, LOGP_COLOR, "log-prob accuracy (π_c > π_r)"),
    ] {
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(plot_err)?;
    }
    // The best reward accuracy after training started (step 0 is the untrained model and is
    // never saved as best/); the first such point on ties, as the trainer keeps the first.
    let best =
        reward.iter().filter(|p| p.0 > 0.0).fold(None::<(f64, f64)>, |best, &p| match best {
            Some(b) if b.1 >= p.1 => Some(b),
            _ => Some(p),
        });
    if let Some((step, acc)) = best {
        // Keep the note inside the plot when the best point is near the right edge.
        let dx =
            if step > x_range.start + 0.75 * (x_range.end - x_range.start) { -230 } else { -60 };
        chart
            .draw_series([EmptyElement::at((step, acc))
                + Circle::new((0, 0), 9, REWARD_COLOR.stroke_width(3))
                + Text::new(
                    format!("best {acc:.3} @ step {step}"),
                    (dx, -32),
                    ("sans-serif", 17).into_font().color(&BLACK),
                )])
            .map_err(plot_err)?
            .label(format!("best reward accuracy ({acc:.3}, step {step})"))
            .legend(|(x, y)| Circle::new((x + 10, y), 6, REWARD_COLOR.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

fn loss_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    train: &[TrainRecord],
    eval: &[EvalRecord],
    x_range: std::ops::Range<f64>,
) -> Result<()> {
    let train_pts = finite(train.iter().map(|r| (r.step as f64, r.loss)));
    let eval_pts = finite(eval.iter().map(|r| (r.step as f64, r.result.loss)));
    let smooth = moving_average(&train_pts, 20);
    let loss_type = loss_name(train, eval);
    // Where every curve starts: the step-0 validation loss (policy = reference), or for DPO
    // without one, ln 2.
    let start = eval
        .iter()
        .find(|r| r.step == 0 && r.result.loss.is_finite())
        .map(|r| r.result.loss)
        .or((loss_type == "sigmoid").then_some(std::f64::consts::LN_2));
    let (lo, hi) = train_pts
        .iter()
        .chain(&eval_pts)
        .map(|p| p.1)
        .chain(start)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.08).max(0.02);
    // Most losses are ≥ 0; a few (robust, sppo-free mixes) can go below, so only clamp at 0
    // what never went below it.
    let y_range = if lo >= 0.0 { (lo - pad).max(0.0)..hi + pad } else { lo - pad..hi + pad };

    let mut chart = ChartBuilder::on(area)
        .caption(format!("loss ({loss_type})"), ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range.clone(), y_range)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("loss")
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(plot_err)?;
    if let Some(start) = start {
        chart
            .draw_series(DashedLineSeries::new(
                [(x_range.start, start), (x_range.end, start)],
                8,
                6,
                GUIDE_COLOR.stroke_width(1),
            ))
            .map_err(plot_err)?
            .label(format!("step 0: {start:.4} (policy = reference)"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], GUIDE_COLOR));
    }
    chart
        .draw_series(LineSeries::new(train_pts.iter().copied(), TRAIN_COLOR.stroke_width(1)))
        .map_err(plot_err)?
        .label("train loss (per step)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], TRAIN_COLOR));
    if train_pts.len() > 20 {
        chart
            .draw_series(LineSeries::new(smooth, TRAIN_SMOOTH_COLOR.stroke_width(2)))
            .map_err(plot_err)?
            .label("train loss (20-step mean)")
            .legend(|(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], TRAIN_SMOOTH_COLOR.stroke_width(2))
            });
    }
    chart
        .draw_series(LineSeries::new(eval_pts.iter().copied(), EVAL_COLOR.stroke_width(2)))
        .map_err(plot_err)?
        .label("validation loss")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], EVAL_COLOR.stroke_width(2)));
    chart
        .draw_series(eval_pts.iter().map(|&p| Circle::new(p, 3, EVAL_COLOR.filled())))
        .map_err(plot_err)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// The `--loss` the records name (the latest); older logs name none and were DPO's.
fn loss_name<'a>(train: &'a [TrainRecord], eval: &'a [EvalRecord]) -> &'a str {
    let mut named = train.iter().map(|r| &r.loss_type).chain(eval.iter().map(|r| &r.loss_type));
    named.rfind(|t| !t.is_empty()).map_or("sigmoid", |t| t.as_str())
}

/// Drops points with a non-finite value (a NaN would break the axis range).
fn finite(points: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    points.filter(|p| p.0.is_finite() && p.1.is_finite()).collect()
}

/// Trailing mean over up to `window` points.
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

fn plot_err<E: std::fmt::Display>(err: E) -> anyhow::Error {
    anyhow!("plotting failed: {err}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{EvalResult, MetricsLog, METRICS_FILE};

    /// A plausible run: loss falling from ln 2 with noise, accuracy rising then flattening.
    fn synthetic_run(log: &mut MetricsLog, steps: usize) {
        let eval_at = |s: usize| {
            let t = s as f64 / steps as f64;
            let wobble = ((s * 7919) % 13) as f64 / 13.0 - 0.5;
            let result = EvalResult {
                loss: std::f64::consts::LN_2 - 0.12 * t + 0.01 * wobble,
                loss_min: Some(0.3),
                loss_max: Some(1.1),
                reward_accuracy: if s == 0 {
                    0.0
                } else {
                    0.5 + 0.2 * (1.0 - (-4.0 * t).exp()) + 0.03 * wobble
                },
                logp_accuracy: 0.45 + 0.1 * t + 0.02 * wobble,
                chosen_reward: 0.01 * t,
                rejected_reward: -0.05 * t,
                margin: 0.06 * t,
                pairs: 200,
                chosen_logp: -40.0,
                rejected_logp: -42.0,
                chosen_logits: 4.4,
                rejected_logits: 4.2,
            };
            EvalRecord::new(s, s * 64, result, 10.0, "sigmoid".into())
        };
        log.log_eval(&eval_at(0)).unwrap();
        for s in 1..=steps {
            let noise = ((s * 104_729) % 97) as f64 / 97.0 - 0.5;
            let loss = std::f64::consts::LN_2 - 0.15 * s as f64 / steps as f64 + 0.06 * noise;
            log.log_train(&train_record(s, loss, "sigmoid")).unwrap();
            if s % 25 == 0 {
                log.log_eval(&eval_at(s)).unwrap();
            }
        }
    }

    fn train_record(step: usize, loss: f64, loss_type: &str) -> TrainRecord {
        TrainRecord {
            step,
            epoch: 0,
            examples_seen: step * 64,
            loss,
            reward_accuracy: 0.6,
            margin: 0.05,
            grad_norm: 3.0,
            lr: 1e-6,
            examples_per_second: 2.0,
            loss_type: loss_type.into(),
            rewards_chosen: 0.02,
            rewards_rejected: -0.03,
            rewards_accuracies: 0.6,
            rewards_margins: 0.05,
            logps_chosen: -40.0,
            logps_rejected: -42.0,
            logits_chosen: 4.4,
            logits_rejected: 4.2,
            learning_rate: 1e-6,
            num_tokens: step as u64 * 9000,
        }
    }

    /// The loss panel names the loss of the run (the records' `loss_type`), DPO's for logs
    /// that predate it.
    #[test]
    fn the_loss_panel_names_the_loss() {
        let ipo = [train_record(1, 6.0, "ipo"), train_record(2, 5.0, "ipo")];
        assert_eq!(loss_name(&ipo, &[]), "ipo");
        assert_eq!(loss_name(&[train_record(1, 0.6, "")], &[]), "sigmoid");
        // A loss above 1 and one below 0 both fit the panel.
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join(CHART_FILE);
        render(&ipo, &[], &png).unwrap();
        render(&[train_record(1, -0.5, "robust"), train_record(2, 0.3, "robust")], &[], &png)
            .unwrap();
        assert!(Chart::read(&png).count_in(TRAIN_COLOR.rgb(), Half::Bottom) > 0);
    }

    #[test]
    fn renders_a_png_from_a_metrics_file() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = dir.path().join(METRICS_FILE);
        let mut log = MetricsLog::open(&metrics, None).unwrap();
        synthetic_run(&mut log, 200);
        let png = dir.path().join(CHART_FILE);
        render_from_file(&metrics, &png).unwrap();
        let chart = Chart::read(&png);
        assert_eq!((chart.width, chart.height), (WIDTH, HEIGHT));
        let white = chart.count(|p| p == [255, 255, 255]);
        assert!(white < chart.pixels.len() * 98 / 100, "not a blank image: {white} white");
        assert!(chart.count(|p| p == [0, 0, 0]) > 2_000, "text and axes");
        // Each curve in its panel: the accuracies above, the losses below.
        for (color, half, what) in [
            (REWARD_COLOR, Half::Top, "reward accuracy"),
            (LOGP_COLOR, Half::Top, "log-prob accuracy"),
            (TRAIN_SMOOTH_COLOR, Half::Bottom, "smoothed train loss"),
            (EVAL_COLOR, Half::Bottom, "validation loss"),
        ] {
            let here = chart.count_in(color.rgb(), half);
            let there = chart.count_in(color.rgb(), half.other());
            assert!(here > 300, "{what}: only {here} pixels of its colour in its panel");
            assert_eq!(there, 0, "{what} drawn in the wrong panel");
        }
        // Only the chart is left: the temporary file was renamed into place.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        if let Ok(copy) = std::env::var("CHART_CHECK_COPY") {
            std::fs::copy(&png, copy).unwrap();
        }
        // Redrawing replaces the file.
        render_from_file(&metrics, &png).unwrap();
    }

    #[test]
    fn renders_empty_and_degenerate_runs() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join(CHART_FILE);
        render(&[], &[], &png).unwrap();
        let empty = Chart::read(&png);
        assert!(empty.count(|p| p == [0, 0, 0]) > 500, "the title and axes are drawn");
        let reward = empty.count_in(REWARD_COLOR.rgb(), Half::Top);
        assert!(reward < 100, "the legend's sample only, no accuracy curve: {reward} pixels");
        let nan_result = EvalResult {
            loss: f64::NAN,
            loss_min: None,
            loss_max: None,
            reward_accuracy: f64::NAN,
            logp_accuracy: f64::NAN,
            chosen_reward: 0.0,
            rejected_reward: 0.0,
            margin: 0.0,
            pairs: 0,
            chosen_logp: f64::NAN,
            rejected_logp: f64::NAN,
            chosen_logits: f64::NAN,
            rejected_logits: f64::NAN,
        };
        let mut nan_eval = EvalRecord::new(0, 0, nan_result, 0.0, "sigmoid".into());
        render(&[], std::slice::from_ref(&nan_eval), &png).unwrap();
        nan_eval.result.loss = 0.69;
        render(&[], &[nan_eval], &png).unwrap();
        let one_point = Chart::read(&png);
        assert_eq!((one_point.width, one_point.height), (WIDTH, HEIGHT));
        assert!(
            one_point.count_in(EVAL_COLOR.rgb(), Half::Bottom) > 0,
            "the one validation loss is drawn"
        );
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_file() {
        let err = render(&[], &[], &Path::new("/nonexistent-dir").join(CHART_FILE)).unwrap_err();
        assert!(format!("{err:#}").contains(CHART_FILE), "{err:#}");
    }

    /// A decoded chart: its size and RGB pixels, row by row.
    struct Chart {
        width: u32,
        height: u32,
        pixels: Vec<[u8; 3]>,
    }

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Half {
        Top,
        Bottom,
    }

    impl Half {
        fn other(self) -> Half {
            match self {
                Half::Top => Half::Bottom,
                Half::Bottom => Half::Top,
            }
        }
    }

    impl Chart {
        fn read(path: &Path) -> Chart {
            let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
            let mut reader = decoder.read_info().unwrap();
            let mut buf = vec![0; reader.output_buffer_size()];
            let info = reader.next_frame(&mut buf).unwrap();
            assert_eq!(info.bit_depth, png::BitDepth::Eight);
            let channels = match info.color_type {
                png::ColorType::Rgb => 3,
                png::ColorType::Rgba => 4,
                other => panic!("unexpected PNG colour type {other:?}"),
            };
            let pixels = buf[..info.buffer_size()]
                .chunks_exact(channels)
                .map(|p| [p[0], p[1], p[2]])
                .collect::<Vec<_>>();
            assert_eq!(pixels.len(), (info.width * info.height) as usize);
            Chart { width: info.width, height: info.height, pixels }
        }

        fn count(&self, pred: impl Fn([u8; 3]) -> bool) -> usize {
            self.pixels.iter().filter(|&&p| pred(p)).count()
        }

        /// Pixels of exactly `rgb` in the top or bottom half of the image.
        fn count_in(&self, rgb: (u8, u8, u8), half: Half) -> usize {
            let rgb = [rgb.0, rgb.1, rgb.2];
            let middle = (self.width * self.height / 2) as usize;
            let (from, to) = match half {
                Half::Top => (0, middle),
                Half::Bottom => (middle, self.pixels.len()),
            };
            self.pixels[from..to].iter().filter(|&&p| p == rgb).count()
        }
    }

    #[test]
    fn moving_average_is_trailing() {
        let pts: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, i as f64)).collect();
        let m = moving_average(&pts, 2);
        assert_eq!(m.iter().map(|p| p.1).collect::<Vec<_>>(), [0.0, 0.5, 1.5, 2.5, 3.5]);
    }
}
