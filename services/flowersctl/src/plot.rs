//! `flowersctl plot`: training loss/accuracy and validation accuracy per epoch,
//! as SVG or PNG. Text is laid out (and, in PNGs, drawn) with a font compiled
//! into the binary, so it renders the same on machines without system fonts.
//! PNGs are drawn into an RGB buffer and encoded with the `png` crate: plotters' own
//! encoder would build the whole of an `image` crate for it (BENCHMARKS.md, "Build").

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use flowers_proto::v1 as pb;
use plotters::coord::Shift;
use plotters::prelude::*;

const SIZE: (u32, u32) = (1000, 800);

struct Series {
    name: &'static str,
    color: RGBColor,
    points: Vec<(f32, f32)>,
    /// Per-epoch values get markers; the dense training curve does not.
    markers: bool,
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    y_label: &str,
    x_max: f32,
    y_max: f32,
    series: &[Series],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f32..x_max, 0f32..y_max)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()?;
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(s.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if s.markers {
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    s: &pb::RunStatus,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(SIZE.1 / 2);
    let epochs = s.config.as_ref().map_or(1, |c| c.epochs.max(1));
    let trained: Vec<&pb::EpochStatus> = s.epochs.iter().filter(|e| e.trained).collect();
    // Per-epoch values sit at the epoch's end: epoch 0 spans 0..1. Interim evaluations sit
    // where they were taken, at their share of the epoch's training batches.
    let end = |e: &pb::EpochStatus| e.epoch as f32 + 1.0;
    let validated: Vec<(f32, f32, f32)> = s
        .epochs
        .iter()
        .flat_map(|e| {
            let interim = e.interim.iter().filter(|i| i.validated).map(|i| {
                let at = i.after_train_batches as f32 / e.train_batches_total.max(1) as f32;
                (e.epoch as f32 + at, i.val_loss, i.val_accuracy)
            });
            let end = e.validated.then_some((end(e), e.val_loss, e.val_accuracy));
            interim.chain(end)
        })
        .collect();
    let loss = [
        Series {
            name: "training loss (steps)",
            color: RGBColor(160, 190, 230),
            points: s
                .history
                .iter()
                .map(|p| (p.epoch_progress, p.loss))
                .collect(),
            markers: false,
        },
        Series {
            name: "training loss (epoch)",
            color: BLUE,
            points: trained.iter().map(|e| (end(e), e.train_loss)).collect(),
            markers: true,
        },
        Series {
            name: "validation loss",
            color: RED,
            points: validated.iter().map(|&(x, loss, _)| (x, loss)).collect(),
            markers: true,
        },
    ];
    let accuracy = [
        Series {
            name: "training accuracy (steps)",
            color: RGBColor(160, 190, 230),
            points: s
                .history
                .iter()
                .map(|p| (p.epoch_progress, p.accuracy * 100.0))
                .collect(),
            markers: false,
        },
        Series {
            name: "training accuracy (epoch)",
            color: BLUE,
            points: trained
                .iter()
                .map(|e| (end(e), e.train_accuracy * 100.0))
                .collect(),
            markers: true,
        },
        Series {
            name: "validation accuracy",
            color: RED,
            points: validated
                .iter()
                .map(|&(x, _, acc)| (x, acc * 100.0))
                .collect(),
            markers: true,
        },
    ];
    let x_max = loss
        .iter()
        .flat_map(|s| &s.points)
        .map(|p| p.0)
        .fold(epochs as f32, f32::max);
    let y_loss = loss
        .iter()
        .flat_map(|s| &s.points)
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(0.0f32, f32::max);
    draw_panel(
        &top,
        &format!("run {}: loss", s.run_id),
        "loss",
        x_max,
        (y_loss * 1.1).max(0.1),
        &loss,
    )?;
    draw_panel(&bottom, "accuracy", "accuracy (%)", x_max, 100.0, &accuracy)?;
    root.present()
}

/// Writes the run's curves to `output` (.svg or .png).
pub fn plot(status: &pb::RunStatus, output: &Path) -> anyhow::Result<()> {
    let ext = output
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    // Both backends lay text out with font metrics.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::UBUNTU_LIGHT,
    )
    .map_err(|_| anyhow!("the built-in font does not load"))?;
    match ext.as_deref() {
        Some("svg") => draw(SVGBackend::new(output, SIZE).into_drawing_area(), status)
            .map_err(|e| anyhow!("drawing {}: {e:?}", output.display())),
        Some("png") => {
            let mut rgb = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
            draw(
                BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area(),
                status,
            )
            .map_err(|e| anyhow!("drawing {}: {e:?}", output.display()))?;
            write_png(output, &rgb).with_context(|| format!("writing {}", output.display()))
        }
        _ => bail!(
            "{}: the plot file must end in .png or .svg",
            output.display()
        ),
    }
}

/// Writes a [`SIZE`] RGB image as an 8-bit PNG.
fn write_png(path: &Path, rgb: &[u8]) -> anyhow::Result<()> {
    let mut encoder = png::Encoder::new(BufWriter::new(File::create(path)?), SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(())
}
